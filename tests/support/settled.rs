//! Waiting for what a cache finishes after its calls return.

use std::time::Duration;

use cache_harness::wait_for;
use cache_runtime::Cache;
use cache_runtime::testing::flights_in_use;

/// Waits until `cache` has nothing under way in the background: above
/// all, the replies of the stores its misses sent before returning (a
/// miss does not wait for its store's reply; see the writes guide). Call
/// it before reading an entry on another connection, or the store counts
/// in `stats()`, right after a miss.
pub async fn settled(cache: &Cache) {
    let done = wait_for(
        Duration::from_secs(5),
        Duration::from_millis(1),
        async || flights_in_use(cache) == 0,
    )
    .await;
    assert!(
        done.is_some(),
        "the cache's background work did not end: {}",
        flights_in_use(cache)
    );
}
