//! A body that is not `Send` leaves the cached function's future not
//! `Send`: the read path behind it, which is `Send` by assertion, never
//! makes it so.
use std::rc::Rc;

use cache_runtime::redis_cached;

#[redis_cached(key = "pinned:<id>", ttl = 60, single_flight)]
async fn pinned(id: u64) -> u64 {
    let held = Rc::new(id);
    std::future::ready(()).await;
    *held
}

fn send<T: Send>(_: T) {}

fn main() {
    send(pinned(1));
}
