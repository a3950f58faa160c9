//! The process-wide default cache. One test in its own binary, because
//! `install()` is global state.

use std::sync::atomic::{AtomicU64, Ordering};

use cache_runtime::{Cache, redis_cached};

static CALLS: AtomicU64 = AtomicU64::new(0);

#[redis_cached(key = "n:<id>", ttl = 60)]
async fn number(id: u64) -> u64 {
    CALLS.fetch_add(1, Ordering::SeqCst);
    id
}

#[tokio::test]
async fn runs_uncached_until_a_cache_is_installed_and_follows_replacements() {
    assert!(Cache::installed().is_none());
    assert_eq!(number(1).await, 1);
    assert_eq!(number(1).await, 1);
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        2,
        "no cache installed: every call runs the body"
    );

    let first = Cache::memory();
    first.install();
    number(1).await;
    number(1).await;
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        3,
        "installed: one miss, then a hit"
    );
    assert_eq!(first.stats().function("number").unwrap().hits, 1);

    let second = Cache::memory();
    second.install();
    number(1).await;
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        4,
        "install() replaced the first cache"
    );
    assert_eq!(
        second.stats().function("installed::number").unwrap().misses,
        1
    );
}
