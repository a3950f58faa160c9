use cache_runtime::redis_cached;

#[derive(Debug)]
struct DbError;

// `Result<u64, _>` has no answer of nothing to cache.
#[redis_cached(key = "user:<id>", ttl = 60, cache_none)]
async fn get_user(id: u64) -> Result<u64, DbError> {
    Ok(id)
}

#[redis_cached(key = "count:<id>", ttl = 60, none_ttl = "5s")]
async fn count(id: u64) -> u64 {
    id
}

#[redis_cached(key = "find:<id>", ttl = 60, cache_none = true, none_ttl = 0)]
async fn find(id: u64) -> Option<u64> {
    Some(id)
}

fn main() {}
