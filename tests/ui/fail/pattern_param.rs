use cache_runtime::redis_cached;

#[redis_cached(key = "pair:<a>", ttl = 60)]
async fn pair(a: u64, (b, c): (u64, u64)) -> u64 {
    a + b + c
}

fn main() {}
