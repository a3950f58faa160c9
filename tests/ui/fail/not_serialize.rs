use cache_runtime::redis_cached;

struct User {
    id: u64,
}

#[derive(Debug)]
struct DbError;

#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

fn main() {}
