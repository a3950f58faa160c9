//! What generated code calls: the macros' interface, nothing else. Not
//! public API: names and signatures change without notice.

use std::borrow::Cow;
use std::future::Future;
use std::pin::pin;

use tracing::Instrument;

pub use crate::key::KeyBuilder;
use crate::outcome::Encoded;
pub use crate::outcome::{
    Answer, BatchMap, BatchOutcome, BatchValueOf, Completion, OptionShape, Outcome, PlainShape,
    ResultOptionShape, ResultShape, ValueOf,
};
use crate::read::batch::{ErasedBatch, TypedBatch};
use crate::read::call::Lookup;
use crate::read::call::{Erased, SoftBody, Typed};
use crate::scope::Mode;
pub use crate::site::{SingleFlight, Site};
use crate::stats::Event;
pub use crate::stats::Function;
use crate::tag::{Tagging, Tags};
use crate::{Cache, CacheKey};
use std::collections::HashMap;

pub use crate::behind::Rejectable;
pub use crate::outcome::ByValue;

/// `key`, carrying what its function's values decide (`ttl_from`,
/// `unless`), for a `#[cache_put]` that names it.
pub fn ruled<V>(key: CacheKey<V>, rules: ByValue<V>) -> CacheKey<V> {
    key.with_rules(rules)
}

/// The body of every `#[redis_cached]` function: serve `key` from `cache`
/// (or the installed cache) or run `body`, failing open on any cache
/// trouble. `rules` are what a value decides (`tags_from`, `ttl_from`,
/// `unless`).
///
/// Only this shell is compiled for each cached function: the read path
/// behind it is compiled once (see `read::call`).
pub async fn cached<S, R, V, F>(
    cache: Option<&Cache>,
    key: CacheKey<V>,
    body: F,
    rules: ByValue<S::Value>,
) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    let mut call = pin!(Typed::<S, S::Value, R, F>::new(body, rules));
    let answered = Lookup::run(cache, key.untyped(), Erased::new(call.as_mut())).await;
    call.answer(answered)
}

/// The body of every `#[redis_cached(..., local = "...")]` function:
/// [`cached`], with a copy of the value kept in process memory. The value
/// must be `Clone` (a local hit returns a clone of the copy).
pub async fn cached_local<S, R, V, F>(
    cache: Option<&Cache>,
    key: CacheKey<V>,
    body: F,
    rules: ByValue<S::Value>,
) -> R
where
    S: Outcome<R>,
    S::Value: Clone + Send + Sync + 'static,
    F: Future<Output = R>,
{
    let Some(lookup) = Lookup::new(cache, key.untyped()) else {
        return body.await;
    };
    // A local hit awaits nothing: it is answered here, and the future of
    // the path that reads Redis, boxed, is built only on a miss (moving
    // a future as large as that one on every hit costs a local hit
    // about a tenth of its time).
    let lookup = match lookup.local_hit(Cache::local_hit::<S, R>) {
        Ok(answer) => return answer,
        Err(lookup) => lookup,
    };
    let mut call = pin!(Typed::<S, S::Value, R, F>::with_local(body, rules));
    let answered = lookup.run_local(Erased::new(call.as_mut())).await;
    call.answer(answered)
}

/// The body of a `#[redis_cached(..., soft_timeout = "...")]` function
/// whose arguments are owned: [`cached`], with a body that can finish in
/// the background when it is slower than the soft timeout.
pub async fn cached_detached<S, R, V, F>(
    cache: Option<&Cache>,
    key: CacheKey<V>,
    body: F,
    rules: ByValue<S::Value>,
) -> R
where
    S: Outcome<R> + 'static,
    S::Value: 'static,
    R: Send + 'static,
    F: Future<Output = R> + Send + 'static,
{
    let body: SoftBody<R> = Box::pin(body);
    let mut call = pin!(Typed::<S, S::Value, R, SoftBody<R>>::detachable(
        body, rules
    ));
    let answered = Lookup::run(cache, key.untyped(), Erased::new(call.as_mut())).await;
    call.answer(answered)
}

/// [`cached_detached`] with a local tier (see [`cached_local`]).
pub async fn cached_detached_local<S, R, V, F>(
    cache: Option<&Cache>,
    key: CacheKey<V>,
    body: F,
    rules: ByValue<S::Value>,
) -> R
where
    S: Outcome<R> + 'static,
    S::Value: Clone + Send + Sync + 'static,
    R: Send + 'static,
    F: Future<Output = R> + Send + 'static,
{
    let Some(lookup) = Lookup::new(cache, key.untyped()) else {
        return body.await;
    };
    let lookup = match lookup.local_hit(Cache::local_hit::<S, R>) {
        Ok(answer) => return answer,
        Err(lookup) => lookup,
    };
    let body: SoftBody<R> = Box::pin(body);
    let mut call = pin!(Typed::<S, S::Value, R, SoftBody<R>>::detachable(body, rules).local());
    let answered = lookup.run_local(Erased::new(call.as_mut())).await;
    call.answer(answered)
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
    rules: ByValue<V>,
) -> R
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = T, Value = V>,
    V: serde::Serialize + serde::de::DeserializeOwned,
    T: Clone,
    B: FnOnce(Vec<T>) -> Fut,
    Fut: Future<Output = R>,
{
    batch::<S, R, T, V, B, Fut>(cache, keys, body, None, rules).await
}

/// The body of every `#[redis_cached(..., batch, local = "...")]`
/// function: [`cached_batch`], answering first the ids whose copies this
/// process holds. The value must be `Clone`.
pub async fn cached_batch_local<S, R, T, V, B, Fut>(
    cache: Option<&Cache>,
    keys: Vec<(T, CacheKey<V>)>,
    body: B,
    rules: ByValue<V>,
) -> R
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = T, Value = V>,
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    T: Clone,
    B: FnOnce(Vec<T>) -> Fut,
    Fut: Future<Output = R>,
{
    let local: LocalAnswers<T, V> = crate::read::batch::local_answers::<T, V>;
    batch::<S, R, T, V, B, Fut>(cache, keys, body, Some(local), rules).await
}

/// How a batch with a local tier answers the ids whose copies this
/// process holds (see `read::batch::local_answers`).
type LocalAnswers<K, V> =
    fn(&Cache, &'static Site, Vec<K>, Vec<String>, &mut Vec<(K, V)>) -> (Vec<K>, Vec<String>);

/// [`cached_batch`], with `local` answering ids from process memory first.
async fn batch<S, R, T, V, B, Fut>(
    cache: Option<&Cache>,
    keys: Vec<(T, CacheKey<V>)>,
    body: B,
    local: Option<LocalAnswers<T, V>>,
    rules: ByValue<V>,
) -> R
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = T, Value = V>,
    V: serde::Serialize + serde::de::DeserializeOwned,
    T: Clone,
    B: FnOnce(Vec<T>) -> Fut,
    Fut: Future<Output = R>,
{
    let mode = crate::scope::begin();
    let (ids, keys): (Vec<T>, Vec<CacheKey>) = keys
        .into_iter()
        .map(|(id, key)| (id, key.untyped()))
        .unzip();
    let Some((site, cache, keys, mut tags)) = batch_keys_of(cache, keys) else {
        return body(ids).await;
    };
    if mode == Mode::Bypass {
        for _ in &keys {
            cache.record(site, Event::Skipped);
        }
        return body(ids).await;
    }
    let span = cache.batch_span(site, keys.len());
    let (ids, keys) = crate::read::batch::distinct(ids.into_iter().zip(keys).collect());
    let mut found = Vec::new();
    let (ids, keys) = match local {
        Some(answers) if mode != Mode::Refresh => {
            span.in_scope(|| answers(&cache, site, ids, keys, &mut found))
        }
        _ => (ids, keys),
    };
    let mut call = pin!(TypedBatch::<S, R, T, V, B, Fut>::new(
        ids, body, found, rules
    ));
    let mut erased = Erased::batch(call.as_mut());
    erased.refresh(mode == Mode::Refresh);
    let tags = match tags.is_empty() {
        true => Vec::new(),
        false => keys.iter().map(|key| tags.remove(key)).collect(),
    };
    lookup_batch(&cache, site, keys, tags, erased)
        .instrument(span)
        .await;
    call.answer()
}

/// A batch's function, cache and Redis keys, with the tags of each key
/// of a tagged function; `None` without a cache (or a site).
#[allow(clippy::type_complexity)]
fn batch_keys_of(
    cache: Option<&Cache>,
    keys: Vec<CacheKey>,
) -> Option<(
    &'static Site,
    Cow<'_, Cache>,
    Vec<String>,
    HashMap<String, Tags>,
)> {
    let site = keys.first()?.site()?;
    let cache = Cache::resolve(cache, site.function())?;
    let mut tags = HashMap::new();
    let keys = keys
        .into_iter()
        .map(|key| {
            let tagging = Tagging::of(&cache, &key);
            let key = cache.redis_key_of(key);
            if let Some(tagging) = tagging {
                tags.insert(key.clone(), tagging);
            }
            key
        })
        .collect();
    Some((site, cache, keys, tags))
}

/// [`Cache::lookup_batch`], compiled once.
async fn lookup_batch(
    cache: &Cache,
    site: &'static Site,
    keys: Vec<String>,
    tags: Vec<Option<Tags>>,
    mut call: ErasedBatch<'_>,
) {
    cache.lookup_batch(site, keys, tags, &mut call).await;
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
    if S::succeeded(&result) {
        invalidate(cache, writer, Vec::from(keys)).await;
    }
    result
}

/// [`invalidating`], with keys rendered from the write's result (`ret`
/// in a target) by `after`, once the body succeeded: deleted with the
/// others, in the same request.
pub async fn invalidating_after<S, R, F, G, const N: usize, const M: usize>(
    cache: Option<&Cache>,
    writer: &'static Function,
    keys: [CacheKey; N],
    body: F,
    after: G,
) -> R
where
    S: Completion<R>,
    F: Future<Output = R>,
    G: FnOnce(&S::Done) -> [CacheKey; M],
{
    let result = body.await;
    if let Some(done) = S::done(&result) {
        let mut keys = Vec::from(keys);
        keys.extend(after(done));
        invalidate(cache, writer, keys).await;
    }
    result
}

/// The keys of a write that succeeded, deleted.
async fn invalidate(cache: Option<&Cache>, writer: &'static Function, keys: Vec<CacheKey>) {
    if let Some(cache) = Cache::resolve(cache, writer) {
        let keys = keys
            .into_iter()
            .map(|key| cache.redis_key_of(key))
            .collect();
        cache.invalidate_after_write(writer, keys).await;
    }
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
    let rules = key.rules();
    let key = key.untyped();
    // A tagged entry is stored with its tags' tokens as they were before
    // the write's body ran (see `crate::tag`).
    let tagging = match Cache::resolve(cache, writer) {
        Some(cache) if key.has_tags() => cache.tokens_for_put(&key).await,
        _ => None,
    };
    let result = body.await;
    let answer = S::answer(&result);
    if !matches!(answer, Answer::Failed)
        && let Some(cache) = Cache::resolve(cache, writer)
    {
        let encoded = Encoded::of(cache.codec(), answer, &rules);
        cache
            .put_after_write(writer, key, encoded, tagging.as_deref())
            .await;
    }
    result
}

/// The target's key, checked against the writer's return type `R`: a
/// `#[cache_put]` whose value type differs from the target's fails here with
/// `expected CacheKey<A>, found CacheKey<B>`, at the target.
pub fn put_key<S: ValueOf<R>, R>(key: CacheKey<S::Value>) -> CacheKey<S::Value> {
    key
}

/// The body of every `#[write_behind]` function: run `body`; if it
/// returned a value, store it under `key` (the target's) without expiry
/// and queue the change on `queue`, then return the body's result, or
/// the cache's error if it could not queue the change. `key` and `queue`
/// share the value type: that is how rustc rejects a writer whose value,
/// target and queue disagree.
pub async fn write_behind<S, R, F>(
    cache: Option<&Cache>,
    writer: &'static Function,
    key: CacheKey<S::Value>,
    queue: &crate::behind::WriteQueue<S::Value>,
    body: F,
) -> R
where
    S: Outcome<R> + Rejectable<R>,
    F: Future<Output = R>,
{
    let rules = key.rules();
    let key = key.untyped();
    if let Err(error) = queue.check() {
        return S::rejected(error);
    }
    let queue = (queue.name(), queue.shard_count());
    let Some(cache) = Cache::resolve(cache, writer) else {
        return S::rejected(crate::behind::WriteBehindError::NoCache);
    };
    let result = body.await;
    let answer = S::answer(&result);
    if !matches!(answer, Answer::Value(_)) {
        return result;
    }
    let encoded = Encoded::of(cache.codec(), answer, &rules);
    match cache.write_behind(writer, queue, key, encoded).await {
        Ok(()) => result,
        Err(error) => S::rejected(error),
    }
}
