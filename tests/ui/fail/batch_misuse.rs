use std::collections::HashMap;

use cache_runtime::redis_cached;

// No placeholder names a collection.
#[redis_cached(key = "user:<id>", ttl = 60, batch)]
async fn one(id: u64) -> HashMap<u64, u64> {
    HashMap::from([(id, id)])
}

// An `Option` is not a map; refresh options do not apply to a batch.
#[redis_cached(key = "user:<ids>", ttl = 60, stale = "10s", batch)]
async fn optional(ids: &[u64]) -> Option<HashMap<u64, u64>> {
    Some(ids.iter().map(|id| (*id, *id)).collect())
}

// An array cannot hold only the missing ids.
#[redis_cached(key = "user:<ids>", ttl = 60, batch)]
async fn array(ids: [u64; 3]) -> HashMap<u64, u64> {
    ids.iter().map(|id| (*id, *id)).collect()
}

fn main() {}
