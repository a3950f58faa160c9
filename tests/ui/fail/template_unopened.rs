use cache_runtime::redis_cached;

#[redis_cached(key = "user:id>", ttl = 60, skip(id))]
async fn get_user(id: u64) -> u64 {
    id
}

fn main() {}
