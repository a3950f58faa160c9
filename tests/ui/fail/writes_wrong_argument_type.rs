use cache_runtime::{invalidates, redis_cached};

#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> u64 {
    id
}

#[invalidates(get_user(name))]
async fn rename_user(id: u64, name: String) {
    let _ = (id, name);
}

fn main() {}
