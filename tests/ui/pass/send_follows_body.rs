//! A cached function's future is `Send` exactly when its body's is: the
//! read path behind it is compiled once for every function, and takes
//! nothing from the body's auto traits.
use std::rc::Rc;

use cache_runtime::{invalidates, redis_cached};

#[redis_cached(key = "shared:<id>", ttl = 60, single_flight, stale = "30s")]
async fn shared(id: u64) -> Result<u64, String> {
    Ok(id)
}

#[redis_cached(key = "local:<id>", ttl = 60, local = "5s")]
async fn local(id: u64) -> Option<u64> {
    Some(id)
}

// Holds an `Rc` across an await: only a single-threaded runtime can run it.
#[redis_cached(key = "pinned:<id>", ttl = 60, single_flight)]
async fn pinned(id: u64) -> u64 {
    let held = Rc::new(id);
    std::future::ready(()).await;
    *held
}

#[invalidates(pinned(id))]
async fn unpin(id: u64) {
    let held = Rc::new(id);
    std::future::ready(()).await;
    drop(held);
}

fn send<T: Send>(_: T) {}

fn main() {
    send(shared(1));
    send(local(1));
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let tasks = tokio::task::LocalSet::new();
    assert_eq!(tasks.block_on(&runtime, pinned(7)), 7);
    tasks.block_on(&runtime, unpin(7));
}
