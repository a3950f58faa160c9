use cache_runtime::redis_cached;

#[redis_cached(key = "pair:<a>-<b>", ttl = 60)]
async fn pair(a: String, b: String) -> String {
    a + &b
}

fn main() {}
