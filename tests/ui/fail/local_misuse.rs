use std::collections::HashMap;

use cache_runtime::redis_cached;

/// Not `Clone`: a local hit returns a clone of the copy.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    rows: Vec<u64>,
}

#[redis_cached(key = "report:<id>", ttl = 60, local = "5s")]
async fn report(id: u64) -> Option<Report> {
    Some(Report { rows: vec![id] })
}

#[redis_cached(key = "a:<id>", ttl = 60, local = 0)]
async fn a(id: u64) -> u64 {
    id
}

#[redis_cached(key = "b:<id>", ttl = 60, local = "soon")]
async fn b(id: u64) -> u64 {
    id
}

/// A batch's value must be `Clone` too.
#[redis_cached(key = "c:<ids>", ttl = 60, batch, local = "5s")]
async fn c(ids: &[u64]) -> HashMap<u64, Report> {
    ids.iter().map(|&id| (id, Report { rows: vec![id] })).collect()
}

fn main() {}
