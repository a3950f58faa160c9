//! More invalidations waiting than the cache keeps (65,536 keys), on a
//! cache without a prefix: it cannot clear its entries (it cannot tell them
//! from other programs' keys), so it reads every key uncached until the
//! longest TTL it has used has run out, and never serves an old row.
//!
//! A binary of its own: that TTL is the process's, and the other restart
//! tests use hour-long ones.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cache_harness::RedisServer;
use cache_harness::history::{self, Histories, WRITES};
use cache_runtime::{Cache, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

const ROWS: u64 = 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// More invalidations than the cache keeps waiting (its bound is 65,536).
const PAST_THE_BOUND: u64 = 66_000;
/// The rows' TTL.
const TTL: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

#[derive(Debug)]
struct DbError;

struct Store {
    cache: Cache,
    db: Mutex<HashMap<u64, u64>>,
    histories: Histories,
}

impl Store {
    fn version(&self, id: u64) -> u64 {
        *self.db.lock().unwrap().get(&id).unwrap_or(&0)
    }

    #[redis_cached(key = "row:<id>", ttl = 4, single_flight, cache = self.cache)]
    async fn row(&self, id: u64) -> Result<Row, DbError> {
        Ok(Row {
            id,
            version: self.version(id),
        })
    }

    #[invalidates(Self::row(id), cache = self.cache)]
    async fn write(&self, id: u64) -> Result<u64, DbError> {
        let mut db = self.db.lock().unwrap();
        let version = db.entry(id).or_insert(0);
        *version += 1;
        Ok(*version)
    }

    async fn read_all(&self) {
        for id in 0..ROWS {
            history::run_recorded(&self.histories, "cache", id, REQUEST_TIMEOUT, async {
                self.row(id).await.map(|row| row.version)
            })
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_a_cache_without_a_prefix_reads_uncached_for_its_longest_ttl() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = Store {
        cache: Cache::connect(&server.url()).await.unwrap(),
        db: Mutex::default(),
        histories: history::histories(&["cache"]),
    };
    store.read_all().await;
    server.stop();
    for i in 0..PAST_THE_BOUND {
        let _ = store
            .cache
            .invalidate(&Store::row_cache_key(&(1000 + i)))
            .await;
    }
    for id in 0..ROWS {
        history::run_recorded(
            &store.histories,
            WRITES,
            id,
            REQUEST_TIMEOUT,
            store.write(id),
        )
        .await;
    }
    // Back at once, with the old rows and most of their TTL.
    server.restart();
    let back_at = Instant::now();
    let hits_before = store.cache.stats().total.hits;
    let mut cached_again = None;
    while cached_again.is_none() {
        assert!(
            back_at.elapsed() < TTL * 4,
            "the cache did not read from Redis again"
        );
        store.read_all().await;
        if store.cache.stats().total.hits > hits_before + ROWS {
            cached_again = Some(back_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale = history::check_arms("overflow, no prefix", &store.histories, &["cache"]);
    println!(
        "overflow, no prefix: rows served from the cache again {:.2} s after the server came back \
         (TTL {TTL:?}); {stale} stale reads; {:?}",
        cached_again.unwrap_or_default().as_secs_f64(),
        store.cache.stats().total
    );
    assert_eq!(stale, 0, "no write undone");
}
