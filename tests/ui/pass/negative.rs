use cache_runtime::redis_cached;

#[derive(Debug)]
struct DbError;

#[redis_cached(key = "find:<id>", ttl = 60, cache_none)]
async fn find(id: u64) -> Option<u64> {
    Some(id)
}

#[redis_cached(key = "lookup:<id>", ttl = "1m", none_ttl = "5s", stale = "10s")]
async fn lookup(id: u64) -> Result<Option<u64>, DbError> {
    Ok(Some(id))
}

#[redis_cached(key = "alias:<id>", ttl = 60, cache_none, none_ttl = 5, early_refresh)]
async fn alias(id: u64) -> std::io::Result<std::option::Option<u64>> {
    Ok(Some(id))
}

fn main() {}
