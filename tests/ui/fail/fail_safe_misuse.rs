//! `fail_safe` needs a body that can fail; `soft_timeout` an old value to
//! answer with; neither applies to a batch.

use std::collections::HashMap;

use cache_runtime::redis_cached;

/// An `Option` cannot fail.
#[redis_cached(key = "a:<id>", ttl = 60, fail_safe = "1h")]
async fn a(id: u64) -> Option<u64> {
    Some(id)
}

/// Nothing is kept for a slow body to be answered with.
#[redis_cached(key = "b:<id>", ttl = 60, soft_timeout = "150ms")]
async fn b(id: u64) -> Result<u64, ()> {
    Ok(id)
}

/// Durations are checked like the TTL.
#[redis_cached(key = "c:<id>", ttl = 60, fail_safe = "an hour", soft_timeout = 0)]
async fn c(id: u64) -> Result<u64, ()> {
    Ok(id)
}

#[redis_cached(key = "d:<ids>", ttl = 60, batch, fail_safe = "1h")]
async fn d(ids: &[u64]) -> Result<HashMap<u64, u64>, ()> {
    Ok(ids.iter().map(|&id| (id, id)).collect())
}

fn main() {}
