//! A restart never undoes a write: a Redis that persists (here
//! `appendonly yes`, `appendfsync always`) is stopped for maintenance while
//! the service writes, and comes back from its AOF file with the entries it
//! had. Checked on recorded histories ([`cache_harness::history`]) against
//! hand-written cache-aside code on the same server (`GET`, `SET EX`, and a
//! `DEL` after each write whose failure is logged and forgotten, as most
//! services write it), which serves the old rows after the restart.
//!
//! Then the bound: with more invalidations waiting than the cache keeps
//! (65,536 keys), the cache reads every key uncached until the entries
//! that may predate them are gone (a clear, with a prefix; the longest TTL
//! stored with, without), and never serves an old row meanwhile.
//!
//! `RESTART_OUTAGE_SECONDS` sets how long the server is down (default 10,
//! past the 7.7 s the cache used to keep an invalidation for).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cache_harness::history::{self, Histories, WRITES};
use cache_harness::{RedisCluster, RedisServer};
use cache_runtime::{Cache, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

const ROWS: u64 = 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// More invalidations than the cache keeps waiting (its bound is 65,536).
const PAST_THE_BOUND: u64 = 66_000;

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
    naive: Naive,
    histories: Histories,
}

/// The hand-written arm's connection (reconnecting by itself).
enum Naive {
    Server(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Naive {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Naive::Server(conn) => cmd.query_async(&mut conn.clone()).await,
            Naive::Cluster(conn) => cmd.query_async(&mut conn.clone()).await,
        }
    }
}

impl Store {
    async fn new(cache: Cache, server: &RedisServer) -> Store {
        let client = redis::Client::open(server.url()).unwrap();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(100)))
            .set_number_of_retries(0)
            .set_response_timeout(Some(Duration::from_millis(100)));
        let naive = redis::aio::ConnectionManager::new_lazy_with_config(client, config).unwrap();
        Store::with(cache, Naive::Server(naive))
    }

    async fn on_cluster(cache: Cache, cluster: &RedisCluster) -> Store {
        let naive = redis::cluster::ClusterClient::builder(cluster.seeds())
            .connection_timeout(Duration::from_millis(200))
            .response_timeout(Duration::from_millis(200))
            .retries(1)
            .build()
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        Store::with(cache, Naive::Cluster(naive))
    }

    fn with(cache: Cache, naive: Naive) -> Store {
        Store {
            cache,
            db: Mutex::default(),
            naive,
            histories: history::histories(&["cache", "naive"]),
        }
    }

    fn version(&self, id: u64) -> u64 {
        *self.db.lock().unwrap().get(&id).unwrap_or(&0)
    }

    /// `{b}`: on a cluster, every row on one shard.
    #[redis_cached(key = "{b}:row:<id>", ttl = 3600, single_flight, cache = self.cache)]
    async fn row(&self, id: u64) -> Result<Row, DbError> {
        Ok(Row {
            id,
            version: self.version(id),
        })
    }

    /// One write of the row: the database, then the hand-written arm's
    /// `DEL` (a failure logged and forgotten), then the cache's
    /// invalidation (the attribute's).
    #[invalidates(Self::row(id), cache = self.cache)]
    async fn write(&self, id: u64) -> Result<u64, DbError> {
        let version = {
            let mut db = self.db.lock().unwrap();
            let version = db.entry(id).or_insert(0);
            *version += 1;
            *version
        };
        let del = redis::cmd("DEL")
            .arg(format!("{{b}}:naive:row:{id}"))
            .to_owned();
        let _: Result<u64, _> = self.naive.query(&del).await;
        Ok(version)
    }

    /// Cache-aside by hand: `GET`, and on a miss the database and `SET EX`.
    async fn naive_row(&self, id: u64) -> Result<u64, DbError> {
        let key = format!("{{b}}:naive:row:{id}");
        let get = redis::cmd("GET").arg(&key).to_owned();
        if let Ok(Some(version)) = self.naive.query::<Option<u64>>(&get).await {
            return Ok(version);
        }
        let version = self.version(id);
        let set = redis::cmd("SET")
            .arg(&key)
            .arg(version)
            .arg("EX")
            .arg(3600)
            .to_owned();
        let _: Result<(), _> = self.naive.query(&set).await;
        Ok(version)
    }

    async fn read_all(&self) {
        for id in 0..ROWS {
            history::run_recorded(&self.histories, "cache", id, REQUEST_TIMEOUT, async {
                self.row(id).await.map(|row| row.version)
            })
            .await;
            history::run_recorded(
                &self.histories,
                "naive",
                id,
                REQUEST_TIMEOUT,
                self.naive_row(id),
            )
            .await;
        }
    }

    async fn write_all(&self) {
        for id in 0..ROWS {
            history::run_recorded(&self.histories, WRITES, id, REQUEST_TIMEOUT, self.write(id))
                .await;
        }
    }
}

fn persistent() -> RedisServer {
    RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
}

fn outage() -> Duration {
    history::seconds_from_env("RESTART_OUTAGE_SECONDS", 10)
}

/// Reads every row for `length`, through both arms.
async fn read_for(store: &Store, length: Duration) {
    let until = Instant::now() + length;
    while Instant::now() < until {
        store.read_all().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the server (or shard) came back at `back_at`: reads every row,
/// racing the deliveries (until its invalidation is delivered, a row is
/// read uncached), until none is pending, then for a second more; checks
/// both arms' histories and prints the figures of `phase`. The stale
/// reads of the cache and of the hand-written arm, and the cache's totals.
async fn read_through_the_return(
    store: &Store,
    phase: &str,
    back_at: Instant,
) -> ([usize; 2], cache_runtime::Counts) {
    while cache_runtime::testing::pending_chores(&store.cache) > 0 {
        assert!(
            back_at.elapsed() < Duration::from_secs(30),
            "the invalidations were not delivered"
        );
        store.read_all().await;
    }
    let delivered = back_at.elapsed();
    read_for(store, Duration::from_secs(1)).await;
    let stale = [
        history::check_arms(phase, &store.histories, &["cache"]),
        history::check_arms(phase, &store.histories, &["naive"]),
    ];
    let total = store.cache.stats().total;
    println!(
        "{phase}: invalidations delivered {:.2} s after the return; cache {} stale reads, \
         hand-written {} stale reads; {total:?}",
        delivered.as_secs_f64(),
        stale[0],
        stale[1],
    );
    (stale, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_aof_never_brings_back_an_invalidated_entry() {
    let mut server = persistent();
    let cache = Cache::builder()
        .url(server.url())
        .prefix("app")
        .build()
        .await
        .unwrap();
    let store = Store::new(cache, &server).await;
    store.read_all().await;
    store.read_all().await;
    assert_eq!(store.cache.stats().total.hits, ROWS, "every row cached");

    server.stop();
    let down_at = Instant::now();
    store.write_all().await;
    read_for(&store, Duration::from_millis(500)).await;
    tokio::time::sleep(outage().saturating_sub(down_at.elapsed())).await;
    server.restart();
    println!(
        "restart: the server was down {:.1} s while all {ROWS} rows were written; back from its AOF",
        down_at.elapsed().as_secs_f64()
    );
    let back_at = Instant::now();
    let (stale, total) = read_through_the_return(&store, "restart", back_at).await;
    let at_rest = history::stale_at_rest(
        "restart",
        ROWS,
        &["cache"],
        |id| store.version(id),
        async |_, id| store.row(id).await.unwrap().version,
    )
    .await;
    assert_eq!((stale[0], at_rest), (0, 0), "no write undone");
    assert_eq!(total.lost_invalidations, 0, "{total:?}");
    assert!(
        total.hits > 2 * ROWS,
        "the rows are cached again: {total:?}"
    );
    assert!(
        stale[1] > 0,
        "the hand-written code serves the rows the server brought back: the test can fail"
    );
}

/// More invalidations waiting than the cache keeps: with a prefix, the
/// cache reads every key uncached until it has cleared its entries; never
/// an old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_the_cache_reads_uncached_until_it_has_cleared() {
    let mut server = persistent();
    let cache = Cache::builder()
        .url(server.url())
        .prefix("app")
        .build()
        .await
        .unwrap();
    let store = Store::new(cache, &server).await;
    store.read_all().await;
    server.stop();
    let started = Instant::now();
    // Other keys fill the bound; then the rows' own invalidations do not
    // fit.
    for i in 0..PAST_THE_BOUND {
        let _ = store
            .cache
            .invalidate(&Store::row_cache_key(&(1000 + i)))
            .await;
    }
    store.write_all().await;
    println!(
        "bound: {} invalidations queued while the server was down, in {:.1} s",
        PAST_THE_BOUND + ROWS,
        started.elapsed().as_secs_f64()
    );
    server.restart();
    let back_at = Instant::now();
    let hits_before = store.cache.stats().total.hits;
    // Until the clear is done, every read runs the body.
    read_for(&store, Duration::from_secs(1)).await;
    let mut cached_again = None;
    while cached_again.is_none() {
        assert!(
            back_at.elapsed() < Duration::from_secs(60),
            "the cache did not clear its entries"
        );
        store.read_all().await;
        if store.cache.stats().total.hits > hits_before + ROWS {
            cached_again = Some(back_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale = history::check_arms("bound", &store.histories, &["cache"]);
    println!(
        "bound: rows served from the cache again {:.2} s after the server came back; \
         {stale} stale reads; {:?}",
        cached_again.unwrap_or_default().as_secs_f64(),
        store.cache.stats().total
    );
    assert_eq!(stale, 0, "no write undone");
}

/// The same through a Redis Cluster shard that was away: its primary and
/// its replica killed while the rows (all on that shard) are written, then
/// both started again from their AOF files with their `nodes.conf`, so the
/// shard comes back as it was, old entries included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shard_back_from_its_aof_never_serves_an_invalidated_entry() {
    let mut cluster = RedisCluster::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cache = Cache::builder()
        .cluster(cluster.seeds())
        .prefix("app")
        .build()
        .await
        .unwrap();
    let store = Store::on_cluster(cache, &cluster).await;
    store.read_all().await;
    store.read_all().await;
    assert_eq!(store.cache.stats().total.hits, ROWS, "every row cached");
    let slot: u16 = cluster
        .cli(cluster.primaries()[0], &["CLUSTER", "KEYSLOT", "{b}"])
        .and_then(|s| s.parse().ok())
        .expect("CLUSTER KEYSLOT");
    let primary = cluster.primary_of_slot(slot).expect("a primary");
    let replica = cluster.replica_of(primary).expect("a replica");
    // The replica has the entries too (it would be promoted with them).
    tokio::task::block_in_place(|| cluster.wait_until_stable(Duration::from_secs(10)));

    cluster.kill(replica);
    cluster.kill(primary);
    let down_at = Instant::now();
    store.write_all().await;
    read_for(&store, Duration::from_millis(500)).await;
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(down_at.elapsed())).await;
    cluster.restart(primary);
    cluster.restart(replica);
    let back_at = Instant::now();
    println!(
        "cluster: the shard of {ROWS} rows was down {:.1} s while they were written; back from its AOF",
        down_at.elapsed().as_secs_f64()
    );
    tokio::task::block_in_place(|| cluster.wait_until_stable(Duration::from_secs(30)));
    let (stale, total) = read_through_the_return(&store, "cluster restart", back_at).await;
    assert_eq!(stale[0], 0, "no write undone");
    assert_eq!(total.lost_invalidations, 0, "{total:?}");
    assert!(
        stale[1] > 0,
        "the hand-written code serves the rows the shard brought back: the test can fail"
    );
}
