//! Every stampede argument, alone and together.
use cache_runtime::redis_cached;

#[redis_cached(key = "a:<id>", ttl = 60, single_flight)]
async fn a(id: u64) -> u64 {
    id
}

#[redis_cached(key = "b:<id>", ttl = 60, single_flight = "distributed", stale = "30s", early_refresh = 2.5, jitter = 0.1)]
async fn b(id: u64) -> Option<u64> {
    Some(id)
}

#[redis_cached(key = "c:<id>", ttl = "5m", single_flight = "local", stale = 30, early_refresh)]
async fn c(id: u64) -> Result<u64, ()> {
    Ok(id)
}

fn main() {
    let _ = (a(1), b(1), c(1));
}
