//! A body that is not `Send` leaves the cached function's future not
//! `Send` (single, local and batch): the read path behind it, which is
//! `Send` by assertion, never makes it so.
use std::collections::HashMap;
use std::rc::Rc;

use cache_runtime::redis_cached;

#[redis_cached(key = "pinned:<id>", ttl = 60, single_flight)]
async fn pinned(id: u64) -> u64 {
    let held = Rc::new(id);
    std::future::ready(()).await;
    *held
}

// The same with a local tier, and for a batch.
#[redis_cached(key = "pinned_local:<id>", ttl = 60, local = "5s")]
async fn pinned_local(id: u64) -> u64 {
    let held = Rc::new(id);
    std::future::ready(()).await;
    *held
}

#[redis_cached(key = "pinned_batch:<ids>", ttl = 60, batch, single_flight)]
async fn pinned_batch(ids: &[u64]) -> HashMap<u64, u64> {
    let held = Rc::new(ids.len());
    std::future::ready(()).await;
    ids.iter().map(|&id| (id, id + *held as u64)).collect()
}

fn send<T: Send>(_: T) {}

fn main() {
    send(pinned(1));
    send(pinned_local(1));
    send(pinned_batch(&[1]));
}
