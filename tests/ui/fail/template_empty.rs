use cache_runtime::redis_cached;

#[redis_cached(key = "", ttl = 60)]
async fn health() -> u64 {
    1
}

fn main() {}
