//! What generated code calls. Not public API: names and signatures change
//! without notice.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

pub use crate::key::KeyBuilder;
pub use crate::outcome::{
    Completion, OptionShape, Outcome, PlainShape, ResultOptionShape, ResultShape, ValueOf,
};
pub use crate::site::{SingleFlight, Site};
use crate::{Cache, CacheKey};

/// The body of every `#[redis_cached]` function: serve `key` from `cache`
/// (or the installed cache) or run `body`, failing open on any cache trouble.
pub async fn cached<S, R, V, F>(cache: Option<&Cache>, key: CacheKey<V>, body: F) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    let Some(site) = key.site() else {
        // Generated keys always carry their function's site.
        return body.await;
    };
    let Some(cache) = resolve(cache, site) else {
        return body.await;
    };
    let redis_key = cache.redis_key_of(key);
    cache.get_or_compute::<S, R, F>(site, redis_key, body).await
}

/// The body of every `#[invalidates]` function: run `body`, then, if it
/// succeeded, delete `keys` (rendered before `body` ran).
pub async fn invalidating<S, R, F, const N: usize>(
    cache: Option<&Cache>,
    site: &'static Site,
    keys: [CacheKey; N],
    body: F,
) -> R
where
    S: Completion<R>,
    F: Future<Output = R>,
{
    let result = body.await;
    if S::succeeded(&result)
        && let Some(cache) = resolve(cache, site)
    {
        let keys = keys
            .into_iter()
            .map(|key| cache.redis_key_of(key))
            .collect();
        cache.invalidate_after_write(site, keys).await;
    }
    result
}

/// The body of every `#[cache_put]` function: run `body`, then store the
/// value it returns under `key`, the target function's key. `key`'s type
/// parameter must be the value type: that is how rustc rejects a writer
/// that returns something else than the target caches.
pub async fn put<S, R, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: CacheKey<S::Value>,
    body: F,
) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    let result = body.await;
    if let Some(value) = S::cacheable(&result)
        && let Some(cache) = resolve(cache, site)
    {
        cache.put_after_write(site, key, value).await;
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
fn resolve<'a>(cache: Option<&'a Cache>, site: &Site) -> Option<Cow<'a, Cache>> {
    if let Some(cache) = cache {
        return Some(Cow::Borrowed(cache));
    }
    let installed = Cache::installed();
    if installed.is_none() {
        warn_not_installed(site);
    }
    installed.map(Cow::Owned)
}

fn warn_not_installed(site: &Site) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            function = site.name(),
            "no cache installed: #[redis_cached] functions run uncached; \
             call `Cache::connect(url).await?.install()` at start-up"
        );
    }
}
