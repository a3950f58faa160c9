use cache_runtime::{WriteBehindError, WriteQueue, redis_cached, write_behind};

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

impl From<WriteBehindError> for DbError {
    fn from(_: WriteBehindError) -> Self {
        DbError
    }
}

const USERS: WriteQueue<User> = WriteQueue::new("users");
const ADMINS: WriteQueue<Admin> = WriteQueue::new("admins");

#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

// No queue.
#[write_behind(get_user(id))]
async fn no_queue(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

// A queue named by a string, a key template, a second target.
#[write_behind(key = "user:<id>", queue = "users")]
async fn string_queue(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

// A queue of another value type.
#[write_behind(get_user(id), queue = ADMINS)]
async fn wrong_queue(id: u64) -> Result<User, DbError> {
    Ok(User { id })
}

// A return type that cannot carry the cache's error.
#[write_behind(get_user(id), queue = USERS)]
async fn no_error(id: u64) -> Option<User> {
    Some(User { id })
}

fn main() {}
