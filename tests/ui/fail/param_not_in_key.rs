use cache_runtime::redis_cached;

struct Db;

#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

fn main() {}
