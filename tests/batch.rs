//! Batch lookups (`batch`): one read for every id, the body once with the
//! missing ids only, entries shared with the single-key function, leases,
//! negative caching and single-flight across overlapping batches. On a real
//! `redis-server` and on `Cache::memory()`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_harness::{RedisServer, on_every_backend};
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

/// A users table: ids 0..1000 exist except multiples of 7; counts body
/// runs and the rows each one read.
struct Repo {
    cache: Cache,
    names: Mutex<HashMap<u64, String>>,
    body_runs: AtomicU64,
    rows_read: Mutex<HashMap<u64, u64>>,
    query_ms: AtomicU64,
    fail: std::sync::atomic::AtomicBool,
}

impl Repo {
    fn new(cache: Cache) -> Arc<Self> {
        Arc::new(Repo {
            cache,
            names: Mutex::new(HashMap::new()),
            body_runs: AtomicU64::new(0),
            rows_read: Mutex::new(HashMap::new()),
            query_ms: AtomicU64::new(0),
            fail: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn row(&self, id: u64) -> Option<User> {
        *self.rows_read.lock().unwrap().entry(id).or_default() += 1;
        let name = self.names.lock().unwrap().get(&id).cloned();
        (!id.is_multiple_of(7)).then(|| User {
            id,
            name: name.unwrap_or_else(|| format!("user-{id}")),
        })
    }

    async fn select(&self, ids: &[u64]) -> Result<HashMap<u64, User>, DbError> {
        self.body_runs.fetch_add(1, Ordering::SeqCst);
        let ms = self.query_ms.load(Ordering::SeqCst);
        let rows: HashMap<u64, User> = ids
            .iter()
            .filter_map(|&id| self.row(id).map(|u| (id, u)))
            .collect();
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(DbError);
        }
        Ok(rows)
    }

    fn runs(&self) -> u64 {
        self.body_runs.load(Ordering::SeqCst)
    }

    /// Of the ids that have a row (a missing row is not cached without
    /// `cache_none`, so it is read again by design).
    fn max_reads_of_one_row(&self) -> u64 {
        let reads = self.rows_read.lock().unwrap();
        reads
            .iter()
            .filter(|(id, _)| !id.is_multiple_of(7))
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0)
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Option<User> {
        self.body_runs.fetch_add(1, Ordering::SeqCst);
        self.row(id)
    }

    #[redis_cached(key = "user:<ids>", ttl = 60, batch, cache = self.cache)]
    async fn get_users(&self, ids: &[u64]) -> Result<HashMap<u64, User>, DbError> {
        self.select(ids).await
    }

    #[redis_cached(key = "user:<ids>", ttl = 60, batch, single_flight, cache = self.cache)]
    async fn get_users_coalesced(&self, ids: Vec<u64>) -> Result<HashMap<u64, User>, DbError> {
        self.select(&ids).await
    }

    #[redis_cached(key = "neg:<ids>", ttl = 60, batch, cache_none, cache = self.cache)]
    async fn get_users_negative(
        &self,
        ids: impl IntoIterator<Item = u64> + Send,
    ) -> BTreeMap<u64, User> {
        let ids: Vec<u64> = ids.into_iter().collect();
        self.select(&ids)
            .await
            .unwrap_or_default()
            .into_iter()
            .collect()
    }

    #[invalidates(Self::get_user(id), cache = self.cache)]
    async fn rename(&self, id: u64, name: &str) -> Result<(), DbError> {
        self.names.lock().unwrap().insert(id, name.to_owned());
        Ok(())
    }
}

async fn only_the_missing_ids_reach_the_body(cache: Cache) {
    let repo = Repo::new(cache);
    // Ids 1..=100 but every tenth are cached (those that exist: a multiple
    // of 7 has no row, so nothing is cached for it).
    let warm: Vec<u64> = (1..=100u64).filter(|id| !id.is_multiple_of(10)).collect();
    repo.get_users(&warm).await.unwrap();
    repo.rows_read.lock().unwrap().clear();
    let before = repo.runs();
    let all: Vec<u64> = (1..=100).collect();
    let users = repo.get_users(&all).await.unwrap();
    let mut read: Vec<u64> = repo.rows_read.lock().unwrap().keys().copied().collect();
    read.sort_unstable();
    let expected: Vec<u64> = all
        .iter()
        .copied()
        .filter(|id| id.is_multiple_of(10) || id.is_multiple_of(7))
        .collect();
    println!(
        "100 ids, 90 cached: {} body run(s) with {} ids, {} users returned",
        repo.runs() - before,
        read.len(),
        users.len()
    );
    assert_eq!(repo.runs() - before, 1);
    assert_eq!(read, expected, "the body got the missing ids only");
    assert_eq!(
        users.len(),
        all.iter().filter(|id| !id.is_multiple_of(7)).count()
    );
    assert_eq!(users[&43].name, "user-43");
}

async fn batch_and_single_share_entries_and_invalidations(cache: Cache) {
    let repo = Repo::new(cache);
    repo.get_user(5).await.unwrap();
    repo.get_users(&[5, 6]).await.unwrap();
    assert_eq!(repo.rows_read.lock().unwrap()[&5], 1, "5 was a hit");
    let runs = repo.runs();
    assert_eq!(repo.get_user(6).await.unwrap().name, "user-6");
    assert_eq!(repo.runs(), runs, "6 was stored by the batch");
    assert_eq!(
        Repo::get_users_cache_key(&6).as_str(),
        Repo::get_user_cache_key(&6).as_str()
    );
    repo.rename(6, "grace").await.unwrap();
    assert_eq!(repo.get_users(&[6]).await.unwrap()[&6].name, "grace");
}

async fn duplicate_ids_are_one_id(cache: Cache) {
    let repo = Repo::new(cache);
    let users = repo.get_users(&[3, 3, 4, 3]).await.unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(repo.max_reads_of_one_row(), 1);
    let users = repo.get_users(&[3, 4, 4]).await.unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(repo.runs(), 1);
}

async fn missing_rows_are_negative_cached_with_cache_none(cache: Cache) {
    let repo = Repo::new(cache);
    let ids = [7u64, 8, 14];
    for _ in 0..5 {
        let users = repo.get_users_negative(ids).await;
        assert_eq!(users.keys().copied().collect::<Vec<_>>(), vec![8]);
    }
    let negative = repo.runs();
    for _ in 0..5 {
        repo.get_users(&ids).await.unwrap();
    }
    println!(
        "5 batches with 2 missing rows: {negative} body run(s) with cache_none, {} without",
        repo.runs() - negative
    );
    assert_eq!(negative, 1);
    assert_eq!(repo.runs() - negative, 5);
}

async fn errors_cache_nothing(cache: Cache) {
    let repo = Repo::new(cache);
    repo.fail.store(true, Ordering::SeqCst);
    assert_eq!(repo.get_users(&[1, 2]).await, Err(DbError));
    repo.fail.store(false, Ordering::SeqCst);
    assert_eq!(repo.get_users(&[1, 2]).await.unwrap().len(), 2);
    assert_eq!(repo.get_users(&[1, 2]).await.unwrap().len(), 2);
    assert_eq!(repo.runs(), 2);
}

async fn a_value_read_before_a_write_is_not_stored(cache: Cache) {
    let repo = Repo::new(cache);
    repo.query_ms.store(100, Ordering::SeqCst);
    let reader = tokio::spawn({
        let repo = repo.clone();
        async move { repo.get_users(&[9, 10]).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    repo.rename(9, "new").await.unwrap();
    let old = reader.await.unwrap().unwrap();
    assert_eq!(old[&9].name, "user-9", "it read before the write");
    repo.query_ms.store(0, Ordering::SeqCst);
    let after = repo.get_users(&[9, 10]).await.unwrap();
    println!("after the write: id 9 is {:?}", after[&9].name);
    assert_eq!(after[&9].name, "new", "the old row was not stored");
}

async fn overlapping_batches_compute_each_id_once(cache: Cache) {
    let coalesced = Repo::new(cache.clone());
    coalesced.query_ms.store(50, Ordering::SeqCst);
    let batches = (0..8u64).map(|i| {
        let ids: Vec<u64> = (i * 5..i * 5 + 20).map(|id| 1000 + id).collect();
        coalesced.get_users_coalesced(ids)
    });
    for (i, users) in join_all(batches).await.into_iter().enumerate() {
        let i = i as u64;
        let expected = (i * 5..i * 5 + 20)
            .filter(|id| !(1000 + id).is_multiple_of(7))
            .count();
        assert_eq!(users.unwrap().len(), expected);
    }
    let once = coalesced.max_reads_of_one_row();
    let naive = Repo::new(cache);
    naive.query_ms.store(50, Ordering::SeqCst);
    let batches = (0..8u64).map(|i| {
        let ids: Vec<u64> = (i * 5..i * 5 + 20).map(|id| 2000 + id).collect();
        let naive = naive.clone();
        async move { naive.get_users(&ids).await }
    });
    join_all(batches).await;
    println!(
        "8 overlapping batches of 20 ids: max reads of one row {once} with single_flight, {} without",
        naive.max_reads_of_one_row()
    );
    assert_eq!(once, 1);
    assert!(
        naive.max_reads_of_one_row() > 1,
        "the naive arm computes ids twice"
    );
}

on_every_backend!(
    only_the_missing_ids_reach_the_body,
    batch_and_single_share_entries_and_invalidations,
    duplicate_ids_are_one_id,
    missing_rows_are_negative_cached_with_cache_none,
    errors_cache_nothing,
    a_value_read_before_a_write_is_not_stored,
    overlapping_batches_compute_each_id_once,
);

#[tokio::test]
async fn a_dead_redis_runs_the_body_with_every_id() {
    let mut server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let repo = Repo::new(cache);
    repo.get_users(&[1, 2]).await.unwrap();
    server.stop();
    let users = repo.get_users(&[1, 2, 3]).await.unwrap();
    assert_eq!(users.len(), 3);
    assert_eq!(repo.max_reads_of_one_row(), 2, "ids 1 and 2 read again");
}

#[tokio::test]
async fn a_batch_dropped_mid_body_leaves_no_lease_and_no_flight() {
    use cache_runtime::testing::{flights_in_use, pending_chores};
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let repo = Repo::new(cache.clone());
    repo.query_ms.store(200, Ordering::SeqCst);
    let ids: Vec<u64> = (500..510).collect();
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        repo.get_users_coalesced(ids.clone()),
    );
    assert!(
        cut.await.is_err(),
        "the request timeout dropped the batch mid-body"
    );
    let settled = cache_harness::wait_for(
        Duration::from_secs(3),
        Duration::from_millis(5),
        async || pending_chores(&cache) == 0 && flights_in_use(&cache) == 0,
    )
    .await;
    let mut conn = cache_harness::raw_connection(&server).await;
    let mut left = 0;
    for id in &ids {
        let key = format!("user:{id}");
        let stored: Option<Vec<u8>> =
            cache_harness::raw(&mut conn, &[b"GET", key.as_bytes()]).await;
        left += usize::from(stored.is_some());
    }
    println!("batch dropped mid-body: released after {settled:?}, {left} keys left");
    assert!(settled.is_some());
    assert_eq!(left, 0, "every lease placeholder was given back");
}
