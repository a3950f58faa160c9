//! What generated code calls: the macros' interface, nothing else. Not
//! public API: names and signatures change without notice.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::Instrument;

pub use crate::key::KeyBuilder;
pub use crate::read::outcome::{
    Answer, BatchMap, BatchOutcome, BatchValueOf, Completion, OptionShape, Outcome, PlainShape,
    ResultOptionShape, ResultShape, ValueOf,
};
pub use crate::read::site::{SingleFlight, Site};
pub use crate::stats::Function;
use crate::{Cache, CacheKey};

/// The body of every `#[redis_cached]` function: serve `key` from `cache`
/// (or the installed cache) or run `body`, failing open on any cache trouble.
pub async fn cached<S, R, V, F>(cache: Option<&Cache>, key: CacheKey<V>, body: F) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    match resolve_key(cache, key) {
        Some((site, cache, redis_key)) => {
            let span = cache.call_span(site, &redis_key);
            let call = cache.get_or_compute::<S, R, F>(site, redis_key, body);
            observed(site, span, call).await
        }
        None => body.await,
    }
}

/// The body of every `#[redis_cached(..., local = "...")]` function:
/// [`cached`], with a copy of the value kept in process memory. The value
/// must be `Clone` (a local hit returns a clone of the copy).
pub async fn cached_local<S, R, V, F>(cache: Option<&Cache>, key: CacheKey<V>, body: F) -> R
where
    S: Outcome<R>,
    S::Value: Clone + Send + Sync + 'static,
    F: Future<Output = R>,
{
    let Some((site, cache, redis_key)) = resolve_key(cache, key) else {
        return body.await;
    };
    let span = cache.call_span(site, &redis_key);
    let timer = CallTimer::start(site);
    // A local hit awaits nothing: it is answered here, and the future of
    // the path that reads Redis, boxed, is built only on a miss (moving
    // a future as large as that one on every hit costs a local hit
    // about a tenth of its time).
    if let Some(answer) = span.in_scope(|| cache.local_hit::<S, R>(site, &redis_key)) {
        timer.finish();
        crate::key::recycle(redis_key);
        return answer;
    }
    let call = cache.get_or_compute_local::<S, R, F>(site, redis_key, body);
    Box::pin(observed_with(span, timer, call)).await
}

/// Runs a cached call in its span (boxed only when the span is enabled,
/// so that a call without tracing keeps its small future), timed for
/// `metrics`.
async fn observed<R>(site: &'static Site, span: tracing::Span, call: impl Future<Output = R>) -> R {
    observed_with(span, CallTimer::start(site), call).await
}

/// [`observed`] with the timer started already.
async fn observed_with<R>(
    span: tracing::Span,
    timer: CallTimer,
    call: impl Future<Output = R>,
) -> R {
    let result = if span.is_disabled() {
        call.await
    } else {
        Box::pin(call).instrument(span).await
    };
    timer.finish();
    result
}

/// With the `metrics` feature, how long a cached call took
/// (`cache_call_duration_seconds`); nothing without it.
struct CallTimer {
    #[cfg(feature = "metrics")]
    started: (&'static Site, std::time::Instant),
}

impl CallTimer {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn start(site: &'static Site) -> CallTimer {
        CallTimer {
            #[cfg(feature = "metrics")]
            started: (site, std::time::Instant::now()),
        }
    }

    /// The call completed (a cancelled one is not observed).
    fn finish(self) {
        #[cfg(feature = "metrics")]
        {
            let (site, started) = self.started;
            let function = site.function();
            function
                .metrics
                .observe(function, started.elapsed().as_secs_f64());
        }
    }
}

/// A key's function, the cache to use and the Redis key; `None` without a
/// cache installed (or a key without its function's site, which generated
/// keys always have).
fn resolve_key<'c, V>(
    cache: Option<&'c Cache>,
    key: CacheKey<V>,
) -> Option<(&'static Site, Cow<'c, Cache>, String)> {
    let site = key.site()?;
    let cache = resolve(cache, site.function())?;
    let redis_key = cache.redis_key_of(key);
    Some((site, cache, redis_key))
}

/// The ids of a batch call, each with its key: `ids` is the batch
/// parameter (a slice, a `Vec`, any `IntoIterator` of ids or of references
/// to them), `key` the generated key function for one id.
pub fn batch_keys<T, V, I, F>(ids: I, mut key: F) -> Vec<(T, CacheKey<V>)>
where
    T: Clone,
    I: IntoIterator,
    I::Item: std::borrow::Borrow<T>,
    F: FnMut(&T) -> CacheKey<V>,
{
    ids.into_iter()
        .map(|id| {
            let id: T = std::borrow::Borrow::<T>::borrow(&id).clone();
            let key = key(&id);
            (id, key)
        })
        .collect()
}

/// The body of every `#[redis_cached(..., batch)]` function: serve the ids
/// of `keys` from `cache` (or the installed cache) and run `body` once with
/// the ids it did not have; see the `batch` module.
pub async fn cached_batch<S, R, T, V, B, Fut>(
    cache: Option<&Cache>,
    keys: Vec<(T, CacheKey<V>)>,
    body: B,
) -> R
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = T, Value = V>,
    V: serde::Serialize + serde::de::DeserializeOwned,
    T: Clone,
    B: FnOnce(Vec<T>) -> Fut,
    Fut: Future<Output = R>,
{
    match batch_entries(cache, keys) {
        Ok((site, cache, entries)) => {
            let span = cache.batch_span(site, entries.len());
            cache
                .get_or_compute_batch::<S, R, T, V, B, Fut>(site, entries, body)
                .instrument(span)
                .await
        }
        Err(ids) => body(ids).await,
    }
}

/// A batch's function, cache and Redis keys; or, without a cache (or a
/// site), its ids for the body to run uncached.
#[allow(clippy::type_complexity)]
fn batch_entries<'c, T, V>(
    cache: Option<&'c Cache>,
    keys: Vec<(T, CacheKey<V>)>,
) -> Result<(&'static Site, Cow<'c, Cache>, Vec<(T, String)>), Vec<T>> {
    let site = keys.first().and_then(|(_, key)| key.site());
    let (Some(site), Some(cache)) = (site, site.and_then(|site| resolve(cache, site.function())))
    else {
        return Err(keys.into_iter().map(|(id, _)| id).collect());
    };
    let entries = keys
        .into_iter()
        .map(|(id, key)| (id, cache.redis_key_of(key)))
        .collect();
    Ok((site, cache, entries))
}

/// The body of every `#[redis_cached(..., batch, local = "...")]`
/// function: [`cached_batch`], answering first the ids whose copies this
/// process holds. The value must be `Clone`.
pub async fn cached_batch_local<S, R, T, V, B, Fut>(
    cache: Option<&Cache>,
    keys: Vec<(T, CacheKey<V>)>,
    body: B,
) -> R
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = T, Value = V>,
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    T: Clone,
    B: FnOnce(Vec<T>) -> Fut,
    Fut: Future<Output = R>,
{
    match batch_entries(cache, keys) {
        Ok((site, cache, entries)) => {
            let span = cache.batch_span(site, entries.len());
            cache
                .get_or_compute_batch_local::<S, R, T, V, B, Fut>(site, entries, body)
                .instrument(span)
                .await
        }
        Err(ids) => body(ids).await,
    }
}

/// The body of every `#[invalidates]` function: run `body`, then, if it
/// succeeded, delete `keys` (rendered before `body` ran).
pub async fn invalidating<S, R, F, const N: usize>(
    cache: Option<&Cache>,
    writer: &'static Function,
    keys: [CacheKey; N],
    body: F,
) -> R
where
    S: Completion<R>,
    F: Future<Output = R>,
{
    let result = body.await;
    if S::succeeded(&result)
        && let Some(cache) = resolve(cache, writer)
    {
        let keys = keys
            .into_iter()
            .map(|key| cache.redis_key_of(key))
            .collect();
        cache.invalidate_after_write(writer, keys).await;
    }
    result
}

/// The body of every `#[cache_put]` function: run `body`, then store the
/// value it returns under `key`, the target function's key; an answer of
/// nothing (`None`) deletes the entry instead. `key`'s type parameter must
/// be the value type: that is how rustc rejects a writer that returns
/// something else than the target caches.
pub async fn put<S, R, F>(
    cache: Option<&Cache>,
    writer: &'static Function,
    key: CacheKey<S::Value>,
    body: F,
) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    let result = body.await;
    let answer = S::answer(&result);
    if !matches!(answer, Answer::Failed)
        && let Some(cache) = resolve(cache, writer)
    {
        match answer {
            Answer::Value(value) => cache.put_after_write(writer, key, value).await,
            _ => {
                let keys = vec![cache.redis_key_of(key)];
                cache.invalidate_after_write(writer, keys).await;
            }
        }
    }
    result
}

/// The target's key, checked against the writer's return type `R`: a
/// `#[cache_put]` whose value type differs from the target's fails here with
/// `expected CacheKey<A>, found CacheKey<B>`, at the target.
pub fn put_key<S: ValueOf<R>, R>(key: CacheKey<S::Value>) -> CacheKey<S::Value> {
    key
}

/// The given cache, else the installed one, else `None` (warned once).
fn resolve<'a>(cache: Option<&'a Cache>, function: &Function) -> Option<Cow<'a, Cache>> {
    if let Some(cache) = cache {
        return Some(Cow::Borrowed(cache));
    }
    let installed = Cache::installed();
    if installed.is_none() {
        warn_not_installed(function);
    }
    installed.map(Cow::Owned)
}

fn warn_not_installed(function: &Function) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            function = function.name(),
            "no cache installed: #[redis_cached] functions run uncached; \
             call `Cache::connect(url).await?.install()` at start-up"
        );
    }
}
