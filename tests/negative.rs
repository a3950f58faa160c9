//! Negative caching (`cache_none`, `none_ttl`): an answer of `None` is an
//! entry too, so lookups of ids that do not exist stop reaching the
//! database (cache penetration). Checked on a real `redis-server` and on
//! `Cache::memory()`, with leases, invalidation, `stale` and single-flight.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, on_every_backend, raw, raw_connection};
use cache_runtime::{Cache, invalidates, redis_cached};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A table of users that counts its queries.
struct Repo {
    cache: Cache,
    rows: Mutex<HashSet<u64>>,
    queries: AtomicU64,
    /// How long a query takes, in ms.
    query_ms: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            rows: Mutex::new(HashSet::new()),
            queries: AtomicU64::new(0),
            query_ms: AtomicU64::new(0),
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }

    async fn select(&self, id: u64) -> Option<User> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let ms = self.query_ms.load(Ordering::SeqCst);
        let found = self.rows.lock().unwrap().contains(&id);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        found.then(|| User {
            id,
            name: format!("user-{id}"),
        })
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache_none, single_flight, cache = self.cache)]
    async fn find(&self, id: u64) -> Option<User> {
        self.select(id).await
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn find_naive(&self, id: u64) -> Option<User> {
        self.select(id).await
    }

    #[redis_cached(key = "short:<id>", ttl = 60, none_ttl = "250ms", cache = self.cache)]
    async fn find_short(&self, id: u64) -> Result<Option<User>, DbError> {
        Ok(self.select(id).await)
    }

    #[redis_cached(
        key = "fresh:<id>",
        ttl = "300ms",
        stale = "5s",
        cache_none,
        cache = self.cache
    )]
    async fn find_stale(&self, id: u64) -> Option<User> {
        self.select(id).await
    }

    #[redis_cached(key = "early:<id>", ttl = 60, early_refresh, cache_none, cache = self.cache)]
    async fn find_early(&self, id: u64) -> Option<User> {
        self.select(id).await
    }

    /// Same key as `find`, but a result without an answer of nothing.
    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get(&self, id: u64) -> Result<User, DbError> {
        self.select(id).await.ok_or(DbError)
    }

    /// `Some(None)` and `None` are different answers.
    #[redis_cached(key = "nested:<id>", ttl = 60, cache_none, cache = self.cache)]
    async fn nested(&self, id: u64) -> Option<Option<u8>> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        (id != 0).then_some(None)
    }

    #[invalidates(Self::find(id), Self::find_short(id), Self::find_stale(id), cache = self.cache)]
    async fn create(&self, id: u64) -> Result<(), DbError> {
        self.rows.lock().unwrap().insert(id);
        Ok(())
    }
}

async fn missing_ids_cost_one_query(cache: Cache) {
    let repo = Repo::new(cache);
    for _ in 0..100 {
        assert_eq!(repo.find(404).await, None);
    }
    let cached = repo.queries();
    let naive = Repo::new(repo.cache.clone());
    for id in 0..100 {
        // Distinct keys from `find`'s: `find_naive` shares its template.
        assert_eq!(naive.find_naive(1000 + id % 2).await, None);
    }
    println!(
        "100 lookups of a missing id: {cached} query with cache_none, {} without",
        naive.queries()
    );
    assert_eq!(cached, 1);
    assert_eq!(
        naive.queries(),
        100,
        "without cache_none, every lookup queries"
    );
}

async fn concurrent_lookups_of_a_missing_id_share_one_query(cache: Cache) {
    let repo = Repo::new(cache);
    repo.query_ms.store(50, Ordering::SeqCst);
    let calls = (0..50).map(|_| repo.find(7));
    let answers = join_all(calls).await;
    println!(
        "50 concurrent lookups of a missing id: {} queries",
        repo.queries()
    );
    assert!(answers.iter().all(Option::is_none));
    assert_eq!(repo.queries(), 1);
}

async fn a_write_replaces_the_cached_none(cache: Cache) {
    let repo = Repo::new(cache);
    assert_eq!(repo.find(5).await, None);
    assert_eq!(repo.find_short(5).await, Ok(None));
    repo.create(5).await.unwrap();
    assert_eq!(repo.find(5).await.unwrap().id, 5);
    assert_eq!(repo.find_short(5).await.unwrap().unwrap().id, 5);
    assert_eq!(repo.queries(), 4);
}

async fn none_ttl_is_its_own(cache: Cache) {
    let repo = Repo::new(cache);
    assert_eq!(repo.find_short(9).await, Ok(None));
    assert_eq!(repo.find_short(9).await, Ok(None));
    assert_eq!(repo.queries(), 1);
    // The row appears without a write through the cache: only the None
    // TTL bounds how long the old answer is served.
    repo.rows.lock().unwrap().insert(9);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(repo.find_short(9).await.unwrap().unwrap().id, 9);
    assert_eq!(repo.find_short(9).await.unwrap().unwrap().id, 9);
    println!("none_ttl = 250ms: {} queries for 4 lookups", repo.queries());
    assert_eq!(repo.queries(), 2, "the None expired, the Some is cached");
}

async fn a_none_computed_across_a_write_is_not_stored(cache: Cache) {
    let repo = std::sync::Arc::new(Repo::new(cache));
    repo.query_ms.store(100, Ordering::SeqCst);
    // The lookup reads "no row", then the row is created and the key
    // invalidated while the lookup is still computing.
    let reader = tokio::spawn({
        let repo = repo.clone();
        async move { repo.find(3).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    repo.create(3).await.unwrap();
    assert_eq!(reader.await.unwrap(), None, "it read before the write");
    repo.query_ms.store(0, Ordering::SeqCst);
    let after = repo.find(3).await;
    println!("lookup after the write: {after:?}");
    assert_eq!(
        after.map(|u| u.id),
        Some(3),
        "the stale None was not stored"
    );
}

async fn stale_none_is_served_while_one_caller_refreshes(cache: Cache) {
    let repo = Repo::new(cache);
    assert_eq!(repo.find_stale(8).await, None);
    repo.rows.lock().unwrap().insert(8);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past the TTL, inside the stale window: this caller refreshes.
    assert_eq!(repo.find_stale(8).await.map(|u| u.id), Some(8));
    assert_eq!(repo.find_stale(8).await.map(|u| u.id), Some(8));
    assert_eq!(repo.queries(), 2);
    // And the other way: a refresh that answers None stores the None.
    repo.rows.lock().unwrap().remove(&8);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(repo.find_stale(8).await, None);
    assert_eq!(repo.find_stale(8).await, None);
    assert_eq!(repo.queries(), 3);
}

async fn early_refresh_keeps_a_none(cache: Cache) {
    let repo = Repo::new(cache);
    for _ in 0..20 {
        assert_eq!(repo.find_early(6).await, None);
    }
    assert_eq!(repo.queries(), 1, "far from expiry, no early refresh");
}

async fn none_is_distinct_from_every_some(cache: Cache) {
    let repo = Repo::new(cache);
    for _ in 0..3 {
        assert_eq!(repo.nested(0).await, None);
        assert_eq!(repo.nested(1).await, Some(None));
    }
    assert_eq!(repo.queries(), 2);
}

async fn a_function_without_none_recomputes_over_a_cached_none(cache: Cache) {
    let repo = Repo::new(cache.clone());
    assert_eq!(repo.find(12).await, None);
    repo.rows.lock().unwrap().insert(12);
    // `get` returns `Result<User, _>`: a cached None means nothing to it.
    assert_eq!(repo.get(12).await.unwrap().id, 12);
    assert_eq!(repo.get(12).await.unwrap().id, 12);
    assert_eq!(repo.queries(), 2);
    // An `Option` function without `cache_none` serves a cached None.
    let other = Repo::new(cache);
    assert_eq!(other.find(13).await, None);
    assert_eq!(other.find_naive(13).await, None);
    assert_eq!(other.queries(), 1);
}

on_every_backend!(
    missing_ids_cost_one_query,
    concurrent_lookups_of_a_missing_id_share_one_query,
    a_write_replaces_the_cached_none,
    none_ttl_is_its_own,
    a_none_computed_across_a_write_is_not_stored,
    stale_none_is_served_while_one_caller_refreshes,
    early_refresh_keeps_a_none,
    none_is_distinct_from_every_some,
    a_function_without_none_recomputes_over_a_cached_none,
);

#[tokio::test]
async fn redis_holds_a_readable_marker_with_the_none_ttl() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let repo = Repo::new(cache);
    repo.find_short(77).await.unwrap();
    repo.find(78).await;
    let mut conn = raw_connection(&server).await;
    let stored: Vec<u8> = raw(&mut conn, &[b"GET", b"short:77"]).await;
    assert_eq!(stored, b"\x02none");
    let pttl: i64 = raw(&mut conn, &[b"PTTL", b"short:77"]).await;
    assert!((1..=250).contains(&pttl), "PTTL {pttl}");
    let pttl: i64 = raw(&mut conn, &[b"PTTL", b"user:78"]).await;
    assert!(
        (59_000..=60_000).contains(&pttl),
        "cache_none: the TTL, {pttl}"
    );
}
