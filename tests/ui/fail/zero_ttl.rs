use cache_runtime::redis_cached;

#[redis_cached(key = "user:<id>", ttl = 0)]
async fn get_user(id: u64) -> u64 {
    id
}

#[redis_cached(key = "user:<id>", ttl = "0s")]
async fn get_user_str(id: u64) -> u64 {
    id
}

fn main() {}
