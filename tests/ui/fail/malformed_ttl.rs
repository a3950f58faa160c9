use cache_runtime::redis_cached;

#[redis_cached(key = "user:<id>", ttl = "5 minutes-ish")]
async fn get_user(id: u64) -> u64 {
    id
}

#[redis_cached(key = "user:<id>", ttl = 1.5)]
async fn get_user_float(id: u64) -> u64 {
    id
}

fn main() {}
