//! What a value decides about its own entry: its TTL (`ttl_from`) and
//! whether it is stored at all (`unless`). Checked on a real
//! `redis-server`, a cluster and `Cache::memory()`, with single-flight,
//! `stale`, batches, `#[cache_put]` and the local tier.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, on_every_backend, raw, raw_connection};
use cache_runtime::{Cache, cache_put, redis_cached};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    Draft,
    Open,
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    status: Status,
    version: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A finished order for a minute, an open one for 300 ms, the attribute's
/// TTL for a draft (which `unless` keeps out of the cache anyway), and an
/// order whose id ends in 9 not at all (a zero TTL).
fn order_ttl(order: &Order) -> Option<Duration> {
    match order.status {
        _ if order.id % 10 == 9 => Some(Duration::ZERO),
        Status::Done => Some(Duration::from_secs(60)),
        Status::Open => Some(Duration::from_millis(300)),
        Status::Draft => None,
    }
}

fn is_draft(order: &Order) -> bool {
    order.status == Status::Draft
}

/// An orders table that counts its queries.
struct Repo {
    cache: Cache,
    rows: Mutex<HashMap<u64, Status>>,
    queries: AtomicU64,
    query_ms: AtomicU64,
    version: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            rows: Mutex::new(HashMap::new()),
            queries: AtomicU64::new(0),
            query_ms: AtomicU64::new(0),
            version: AtomicU64::new(0),
        }
    }

    fn set(&self, id: u64, status: Status) {
        self.rows.lock().unwrap().insert(id, status);
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }

    async fn select(&self, id: u64) -> Order {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let ms = self.query_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Order {
            id,
            status: self.rows.lock().unwrap()[&id],
            version: self.version.load(Ordering::SeqCst),
        }
    }

    #[redis_cached(key = "order:<id>", ttl = 60, ttl_from = order_ttl, unless = is_draft, cache = self.cache)]
    async fn order(&self, id: u64) -> Result<Order, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(
        key = "order:<id>",
        ttl = 60,
        ttl_from = order_ttl,
        unless = is_draft,
        single_flight,
        cache = self.cache
    )]
    async fn order_coalesced(&self, id: u64) -> Result<Order, DbError> {
        Ok(self.select(id).await)
    }

    /// The naive arm: every value stored, for the attribute's TTL.
    #[redis_cached(key = "naive:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn order_naive(&self, id: u64) -> Result<Order, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(key = "stale:<id>", ttl = 60, ttl_from = order_ttl, stale = "30s", cache = self.cache)]
    async fn order_stale(&self, id: u64) -> Result<Order, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(key = "order:<ids>", ttl = 60, ttl_from = order_ttl, unless = is_draft, batch, cache = self.cache)]
    async fn orders(&self, ids: &[u64]) -> Result<HashMap<u64, Order>, DbError> {
        let mut found = HashMap::new();
        for &id in ids {
            found.insert(id, self.select(id).await);
        }
        Ok(found)
    }

    #[cache_put(Self::order(id), cache = self.cache)]
    async fn save(&self, id: u64, status: Status) -> Result<Order, DbError> {
        self.set(id, status);
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(self.select(id).await)
    }
}

/// Queries of `calls` calls of `find`.
async fn queries_of<F: std::future::Future>(repo: &Repo, calls: impl Fn() -> F) -> u64 {
    let before = repo.queries();
    calls().await;
    repo.queries() - before
}

async fn each_value_is_stored_for_its_own_ttl(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(1, Status::Done);
    repo.set(2, Status::Open);
    for id in [1, 2] {
        repo.order(id).await.unwrap();
        assert_eq!(queries_of(&repo, || repo.order(id)).await, 0, "order {id}");
    }
    // Past the open order's 300 ms: it is read again, the finished one is not.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(queries_of(&repo, || repo.order(1)).await, 0, "done");
    assert_eq!(queries_of(&repo, || repo.order(2)).await, 1, "open");
}

async fn a_rejected_value_is_returned_not_stored(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(3, Status::Draft);
    repo.set(19, Status::Done);
    for id in [3, 19] {
        for _ in 0..3 {
            let order = repo.order(id).await.unwrap();
            assert_eq!(order.id, id);
        }
        // `unless` (3, a draft) and a zero TTL (19): every call queries.
        assert_eq!(queries_of(&repo, || repo.order(id)).await, 1, "order {id}");
    }
    // Once the draft is open, it is stored.
    repo.set(3, Status::Open);
    repo.order(3).await.unwrap();
    assert_eq!(queries_of(&repo, || repo.order(3)).await, 0);
}

/// Callers waiting for a leader whose value is not stored are handed it:
/// `unless` does not make a stampede. The naive arm (every value stored)
/// costs the same one query; the check is that not storing costs no more.
async fn waiters_are_handed_a_value_that_is_not_stored(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(4, Status::Draft);
    repo.query_ms.store(150, Ordering::SeqCst);
    let rejected = queries_of(&repo, || join_all((0..50).map(|_| repo.order_coalesced(4)))).await;
    let naive = queries_of(&repo, || join_all((0..50).map(|_| repo.order_naive(4)))).await;
    let uncoalesced = queries_of(&repo, || join_all((0..50).map(|_| repo.order(4)))).await;
    println!(
        "50 callers of a draft: {rejected} queries with single_flight \
         ({naive} when stored, {uncoalesced} without single_flight)"
    );
    assert_eq!(rejected, 1);
    assert_eq!(naive, 1);
    assert!(uncoalesced > 1, "without single_flight each caller queries");
}

async fn a_stale_window_follows_the_values_ttl(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(5, Status::Open);
    let first = repo.order_stale(5).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    repo.version.fetch_add(1, Ordering::SeqCst);
    // Past its 300 ms, inside the stale window: the old value is served
    // while this very caller refreshes it (one query); then the new one.
    let served = repo.order_stale(5).await.unwrap();
    assert!(served.version >= first.version);
    let after = repo.order_stale(5).await.unwrap();
    assert_eq!(after.version, first.version + 1);
}

async fn a_batch_stores_each_value_as_it_decides(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(6, Status::Done);
    repo.set(7, Status::Open);
    repo.set(8, Status::Draft);
    let found = repo.orders(&[6, 7, 8]).await.unwrap();
    assert_eq!(found.len(), 3);
    // The draft is read again, the others are not.
    assert_eq!(queries_of(&repo, || repo.orders(&[6, 7, 8])).await, 1);
    // The single lookup shares the batch's entries.
    assert_eq!(queries_of(&repo, || repo.order(6)).await, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The open order's entry is gone, the finished one's is not.
    assert_eq!(queries_of(&repo, || repo.orders(&[6, 7])).await, 1);
}

async fn a_put_obeys_ttl_from_and_unless(cache: Cache) {
    let repo = Repo::new(cache);
    repo.set(10, Status::Done);
    repo.order(10).await.unwrap();
    // Put back as a draft: not stored, and the finished order is gone.
    let draft = repo.save(10, Status::Draft).await.unwrap();
    assert_eq!(repo.order(10).await.unwrap(), draft);
    assert_eq!(queries_of(&repo, || repo.order(10)).await, 1);
    // Put as open: stored for 300 ms.
    let open = repo.save(10, Status::Open).await.unwrap();
    assert_eq!(queries_of(&repo, || repo.order(10)).await, 0);
    assert_eq!(repo.order(10).await.unwrap(), open);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(queries_of(&repo, || repo.order(10)).await, 1);
}

on_every_backend!(
    each_value_is_stored_for_its_own_ttl,
    a_rejected_value_is_returned_not_stored,
    waiters_are_handed_a_value_that_is_not_stored,
    a_stale_window_follows_the_values_ttl,
    a_batch_stores_each_value_as_it_decides,
    a_put_obeys_ttl_from_and_unless,
);

/// The server's own TTL is the value's: `PTTL` shows it.
#[tokio::test]
async fn the_servers_ttl_is_the_values() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    repo.set(1, Status::Done);
    repo.set(2, Status::Open);
    repo.order(1).await.unwrap();
    repo.order(2).await.unwrap();
    repo.cache.settled().await;
    let mut conn = raw_connection(&server).await;
    let done: i64 = raw(&mut conn, &[b"PTTL", b"order:1"]).await;
    let open: i64 = raw(&mut conn, &[b"PTTL", b"order:2"]).await;
    assert!((55_000..=60_000).contains(&done), "done: {done} ms");
    assert!((1..=300).contains(&open), "open: {open} ms");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Price {
    cents: u64,
}

static PRICE_QUERIES: AtomicU64 = AtomicU64::new(0);

fn short(_: &Price) -> Option<Duration> {
    Some(Duration::from_millis(300))
}

/// Kept in process memory for up to a minute, stored for 300 ms.
#[redis_cached(key = "price:<sku>", ttl = 60, local = "60s", ttl_from = short)]
async fn price(sku: u64) -> Price {
    PRICE_QUERIES.fetch_add(1, Ordering::SeqCst);
    Price { cents: sku * 100 }
}

/// A local copy never outlives its entry's own TTL, which the value chose.
#[tokio::test]
async fn a_local_copy_never_outlives_the_values_ttl() {
    let server = RedisServer::start();
    Cache::connect(&server.url()).await.unwrap().install();
    price(1).await;
    // Read from Redis (with its TTL): a copy is kept, and served.
    price(1).await;
    let before = PRICE_QUERIES.load(Ordering::SeqCst);
    price(1).await;
    assert_eq!(PRICE_QUERIES.load(Ordering::SeqCst), before);
    let stats = Cache::installed().unwrap().stats();
    assert!(stats.total.local_hits >= 1, "{stats:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    price(1).await;
    assert_eq!(PRICE_QUERIES.load(Ordering::SeqCst), before + 1);
}
