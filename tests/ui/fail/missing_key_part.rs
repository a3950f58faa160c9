use cache_runtime::redis_cached;

struct Filter {
    active: bool,
}

#[redis_cached(key = "users:<filter>", ttl = 60)]
async fn list_users(filter: Filter) -> Vec<u64> {
    let _ = filter.active;
    Vec::new()
}

fn main() {}
