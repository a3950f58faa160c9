use cache_runtime::redis_cached;

#[redis_cached(key = "a:<id>", ttl = 60, single_flight = "global", stale = 0)]
async fn a(id: u64) -> u64 {
    id
}

#[redis_cached(key = "b:<id>", ttl = 60, stale = "soon", early_refresh = 0)]
async fn b(id: u64) -> u64 {
    id
}

#[redis_cached(key = "c:<id>", ttl = 60, early_refresh = "yes")]
async fn c(id: u64) -> u64 {
    id
}

fn main() {}
