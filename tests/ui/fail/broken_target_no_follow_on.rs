// A cached function with a mistake in its attribute: its writers, which
// name it, get no error of their own (a stub key function stands in).
use cache_runtime::{cache_put, invalidates, redis_cached};

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
}

#[redis_cached(key = "user:<idd>", ttl = 60)]
async fn get_user(id: u64) -> Option<User> {
    Some(User { id })
}

#[invalidates(get_user(id))]
async fn rename(id: u64, name: String) -> Result<(), ()> {
    let _ = name;
    Ok(())
}

#[cache_put(get_user(id))]
async fn save(id: u64) -> Option<User> {
    Some(User { id })
}

fn main() {}
