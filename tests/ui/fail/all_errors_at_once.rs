use cache_runtime::redis_cached;

struct Db;

#[redis_cached(key = "user:<idd> <x>", ttl = 0, skip(dbb), colour = 1)]
async fn get_user(db: &Db, id: u64) -> u64 {
    let _ = db;
    id
}

fn main() {}
