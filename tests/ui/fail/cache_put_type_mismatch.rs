use cache_runtime::{cache_put, redis_cached};

#[derive(serde::Serialize, serde::Deserialize)]
struct User {
    id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Admin {
    id: u64,
}

#[derive(Debug)]
struct DbError;

#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

#[cache_put(get_user(id))]
async fn promote(id: u64) -> Result<Admin, DbError> {
    Ok(Admin { id })
}

fn main() {}
