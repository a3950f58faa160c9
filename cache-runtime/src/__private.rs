//! What generated code calls. Not public API: names and signatures change
//! without notice.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

pub use crate::key::KeyBuilder;
pub use crate::outcome::{OptionShape, Outcome, PlainShape, ResultOptionShape, ResultShape};
pub use crate::site::Site;
use crate::{Cache, CacheKey};

/// The body of every `#[redis_cached]` function: serve `key` from `cache`
/// (or the installed cache) or run `body`, failing open on any cache trouble.
pub async fn cached<S, R, F>(
    cache: Option<&Cache>,
    site: &'static Site,
    key: CacheKey,
    body: F,
) -> R
where
    S: Outcome<R>,
    F: Future<Output = R>,
{
    if let Some(cache) = cache {
        return cache.get_or_compute::<S, R, F>(site, key, body).await;
    }
    match Cache::installed() {
        Some(cache) => cache.get_or_compute::<S, R, F>(site, key, body).await,
        None => {
            warn_not_installed(site);
            body.await
        }
    }
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
