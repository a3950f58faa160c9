//! The stale-set race of cache-aside, measured.
//!
//! A reader misses and reads a row; a writer updates the row and deletes the
//! key; the reader then stores the row it read, which stays stale until the
//! TTL. Many readers and writers run on a few rows, with random delays inside
//! their bodies, for thousands of rounds. After each round (writers done,
//! reads finished) every cached value is compared with its row.
//!
//! The same harness runs two arms: `#[redis_cached]` + `#[invalidates]`
//! (leases), which must leave 0 stale entries, and a naive cache-aside
//! (`GET` / compute / `SET PX` / `DEL`, written here in the test), which must
//! leave some: that is what shows the test can fail.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_harness::{RawConnection, RedisCluster, RedisServer, Target};
use cache_runtime::{Cache, invalidates, redis_cached};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

const ROUNDS: usize = 2_000;
const ROWS: u64 = 4;
const READERS_PER_ROUND: usize = 6;
const WRITERS_PER_ROUND: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

/// The "database": a version per row.
#[derive(Default)]
struct Db {
    versions: Mutex<HashMap<u64, u64>>,
}

impl Db {
    fn version(&self, id: u64) -> u64 {
        *self.versions.lock().unwrap().get(&id).unwrap_or(&0)
    }

    /// Reads the row, then takes a while to return it (decoding, network).
    async fn read(&self, id: u64) -> Row {
        let row = Row {
            id,
            version: self.version(id),
        };
        pause(2_000).await;
        row
    }

    async fn write(&self, id: u64) {
        pause(1_000).await;
        *self.versions.lock().unwrap().entry(id).or_default() += 1;
    }
}

/// Sleeps a random 0..=`max_micros` µs.
async fn pause(max_micros: u64) {
    tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=max_micros))).await;
}

/// One way of caching rows.
trait Arm: Send + Sync + 'static {
    fn db(&self) -> &Db;
    /// A cached read of the row.
    fn read(&self, id: u64) -> impl Future<Output = Row> + Send;
    /// Updates the row, then invalidates its cache entry.
    fn write(&self, id: u64) -> impl Future<Output = ()> + Send;
    /// Drops the entry, as an expiry would: the next read misses.
    fn evict(&self, id: u64) -> impl Future<Output = ()> + Send;
}

/// This project: a lease on every miss.
struct Leased {
    cache: Cache,
    db: Db,
}

impl Leased {
    #[redis_cached(key = "leased:row:<id>", ttl = 60, cache = self.cache)]
    async fn get_row(&self, id: u64) -> Row {
        self.db.read(id).await
    }

    #[invalidates(Self::get_row(id), cache = self.cache)]
    async fn update_row(&self, id: u64) {
        self.db.write(id).await;
    }
}

impl Arm for Leased {
    fn db(&self) -> &Db {
        &self.db
    }
    fn read(&self, id: u64) -> impl Future<Output = Row> + Send {
        self.get_row(id)
    }
    fn write(&self, id: u64) -> impl Future<Output = ()> + Send {
        self.update_row(id)
    }
    async fn evict(&self, id: u64) {
        cache_harness::landed(self.cache.invalidate(&Self::get_row_cache_key(&id)).await);
    }
}

/// Cache-aside as the tutorials write it. Test code only.
struct Naive {
    conn: RawConnection,
    db: Db,
}

impl Naive {
    fn key(id: u64) -> String {
        format!("naive:row:{id}")
    }
}

impl Arm for Naive {
    fn db(&self) -> &Db {
        &self.db
    }

    async fn read(&self, id: u64) -> Row {
        let mut conn = self.conn.clone();
        let cached: Option<String> = conn.get(Self::key(id)).await.unwrap();
        if let Some(json) = cached {
            return serde_json::from_str(&json).unwrap();
        }
        let row = self.db.read(id).await;
        let json = serde_json::to_string(&row).unwrap();
        let _: () = conn.pset_ex(Self::key(id), json, 60_000).await.unwrap();
        row
    }

    async fn write(&self, id: u64) {
        self.db.write(id).await;
        self.evict(id).await;
    }

    async fn evict(&self, id: u64) {
        let mut conn = self.conn.clone();
        let _: () = conn.del(Self::key(id)).await.unwrap();
    }
}

/// Runs the rounds; returns how many stale entries were found after them.
/// Each round starts with every entry evicted, so each count is a new
/// occurrence of the race.
async fn stale_entries<A: Arm>(arm: Arc<A>) -> usize {
    let mut stale = 0;
    for _ in 0..ROUNDS {
        // Start cold, as after an expiry: the race needs misses.
        for id in 0..ROWS {
            arm.evict(id).await;
        }
        let mut tasks = JoinSet::new();
        for _ in 0..READERS_PER_ROUND {
            let arm = arm.clone();
            let id = fastrand::u64(0..ROWS);
            tasks.spawn(async move {
                arm.read(id).await;
            });
        }
        for _ in 0..WRITERS_PER_ROUND {
            let arm = arm.clone();
            let id = fastrand::u64(0..ROWS);
            tasks.spawn(async move { arm.write(id).await });
        }
        while tasks.join_next().await.is_some() {}
        // A read now returns what the cache holds (or the row, on a miss).
        for id in 0..ROWS {
            if arm.read(id).await.version != arm.db().version(id) {
                stale += 1;
            }
        }
    }
    stale
}

/// Both arms at once on `target`: machine noise hits both alike.
async fn race_on(target: Target, what: &str) {
    let leased = Arc::new(Leased {
        cache: target.cache(None).await,
        db: Db::default(),
    });
    let naive = Arc::new(Naive {
        conn: target.raw().await,
        db: Db::default(),
    });
    let (leased_stale, naive_stale) =
        tokio::join!(stale_entries(leased.clone()), stale_entries(naive));
    let stats = leased.cache.stats();
    println!(
        "stale-set race, {ROUNDS} rounds x ({READERS_PER_ROUND} readers + {WRITERS_PER_ROUND} writers) on {ROWS} rows, {what}:"
    );
    println!("  #[redis_cached] + #[invalidates] (leases): {leased_stale} stale");
    println!("  naive GET / compute / SET PX / DEL:        {naive_stale} stale");
    println!(
        "  leased arm: {} hits, {} misses, {} sets, {} values kept out by the lease (dropped_sets)",
        stats.total.hits, stats.total.misses, stats.total.sets, stats.total.dropped_sets
    );
    assert!(
        naive_stale > 0,
        "the naive arm never went stale: the harness cannot detect the race"
    );
    assert_eq!(leased_stale, 0, "a write left a stale value behind");
    assert!(
        stats.total.dropped_sets > 0,
        "the race never happened to the leased arm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_leave_no_stale_entry_where_naive_cache_aside_does() {
    let server = RedisServer::start();
    race_on(Target::server(&server), "redis-server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_leave_no_stale_entry_on_a_cluster_where_naive_cache_aside_does() {
    let cluster = RedisCluster::shared();
    race_on(Target::cluster(cluster), "a 3+3 Redis Cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_leave_no_stale_entry_on_the_memory_backend() {
    let leased = Arc::new(Leased {
        cache: Cache::memory(),
        db: Db::default(),
    });
    let stale = stale_entries(leased.clone()).await;
    let dropped = leased.cache.stats().total.dropped_sets;
    println!(
        "stale-set race on Cache::memory(): {stale} stale, {dropped} values kept out by the lease"
    );
    assert_eq!(stale, 0);
    assert!(dropped > 0, "the race never happened");
}
