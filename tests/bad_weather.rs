//! Bad weather never becomes a stampede: with `single_flight`, the callers
//! of one cold key in one process cost the database one body run at a time
//! whatever the cache answers: a burst that makes the cache's reads time
//! out, a server that is stalled (`SIGSTOP`), or down.
//!
//! Each test prints the body runs it measured for each arm, beside a naive
//! arm (no `single_flight`) in the same weather, which pays one body run
//! per caller every time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::{RedisCluster, RedisServer, Target, raw};
use cache_runtime::{Cache, redis_cached};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A slow database that counts its queries.
struct Db {
    cache: Cache,
    runs: AtomicU64,
    body: Duration,
}

impl Db {
    fn new(cache: Cache, body: Duration) -> Arc<Self> {
        Arc::new(Db {
            cache,
            runs: AtomicU64::new(0),
            body,
        })
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    async fn query(&self, ids: &[u64]) -> HashMap<u64, Row> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.body).await;
        ids.iter().map(|&id| (id, Row { id })).collect()
    }

    #[redis_cached(key = "flight:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn flight(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.query(&[id]).await[&id].clone())
    }

    #[redis_cached(key = "dist:<id>", ttl = 60, single_flight = "distributed", cache = self.cache)]
    async fn distributed(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.query(&[id]).await[&id].clone())
    }

    #[redis_cached(key = "rows:<ids>", ttl = 60, batch, single_flight, cache = self.cache)]
    async fn batch(&self, ids: &[u64]) -> Result<HashMap<u64, Row>, DbError> {
        Ok(self.query(ids).await)
    }

    /// The naive arm: no `single_flight`.
    #[redis_cached(key = "plain:<id>", ttl = 60, cache = self.cache)]
    async fn plain(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.query(&[id]).await[&id].clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arm {
    SingleFlight,
    Distributed,
    Batch,
    Naive,
}

impl Arm {
    /// The arms whose callers must coalesce.
    const COALESCED: [Arm; 3] = [Arm::SingleFlight, Arm::Distributed, Arm::Batch];
}

/// What a burst cost.
struct Burst {
    runs: u64,
    /// From the first caller's start to the last's.
    arrivals: Duration,
}

/// `callers` concurrent calls of one cold key (`id`) through `arm`, each
/// checked.
async fn burst(cache: &Cache, arm: Arm, callers: usize, id: u64, body: Duration) -> Burst {
    let db = Db::new(cache.clone(), body);
    let mut calls = JoinSet::new();
    for _ in 0..callers {
        let db = db.clone();
        calls.spawn(async move {
            let began = Instant::now();
            let answer = match arm {
                Arm::SingleFlight => db.flight(id).await,
                Arm::Distributed => db.distributed(id).await,
                Arm::Naive => db.plain(id).await,
                Arm::Batch => db
                    .batch(&[id])
                    .await
                    .map(|mut rows| rows.remove(&id).expect("the row")),
            };
            (began, answer)
        });
    }
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    while let Some(joined) = calls.join_next().await {
        let (began, answer) = joined.expect("no caller panics");
        assert_eq!(answer, Ok(Row { id }));
        first = Some(first.map_or(began, |first| first.min(began)));
        last = Some(last.map_or(began, |last| last.max(began)));
    }
    Burst {
        runs: db.runs(),
        arrivals: last.unwrap() - first.unwrap(),
    }
}

/// Every arm in the same weather, one after the other, on keys of their
/// own (`id` and up); the body runs of each, printed.
async fn every_arm(cache: &Cache, weather: &str, callers: usize, id: u64, body: Duration) {
    let mut figures = Vec::new();
    for (n, arm) in Arm::COALESCED.into_iter().chain([Arm::Naive]).enumerate() {
        let before = cache.stats().total;
        let Burst { runs, arrivals } = burst(cache, arm, callers, id + n as u64, body).await;
        let after = cache.stats().total;
        println!(
            "{weather}: {callers} cold callers (arriving over {arrivals:.0?}), {arm:?}: \
             {runs} body run(s) (reads failed: {}, ran uncached: {}, coalesced: {})",
            after.errors - before.errors,
            after.bypasses - before.bypasses,
            after.coalesced - before.coalesced,
        );
        figures.push((arm, runs, arrivals));
    }
    for (arm, runs, arrivals) in figures {
        match arm {
            // One run for the callers that began before it; a caller that
            // began after it while the cache could not say whether a write
            // came in between waits for the next run (see the runtime's
            // `flight` docs): one run at a time, so a burst that takes
            // longer than a run to arrive (a very busy machine) may cost
            // one more per run it spans.
            Arm::SingleFlight | Arm::Distributed | Arm::Batch => {
                let bound = 2 + (arrivals.as_millis() / body.as_millis()) as u64;
                assert!(
                    runs <= bound,
                    "{weather}, {arm:?}: {runs} body runs (at most {bound})"
                );
            }
            // Most callers read the key before the first run stores it
            // (all of them unless the machine is very busy).
            Arm::Naive => assert!(
                runs >= callers as u64 / 2,
                "{weather}: without single_flight every caller queries ({runs})"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_makes_the_reads_time_out_costs_one_body_run() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    every_arm(
        &cache,
        "healthy redis-server, a burst",
        5_000,
        1,
        Duration::from_millis(200),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_cluster_costs_one_body_run() {
    let target = Target::cluster(RedisCluster::shared());
    let cache = target.cache(Some("weather-burst")).await;
    every_arm(
        &cache,
        "a 3+3 Redis Cluster, a burst",
        5_000,
        1,
        Duration::from_millis(200),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_costs_one_body_run() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    server.freeze(); // SIGSTOP: connected, and no reply ever comes
    every_arm(
        &cache,
        "redis-server stalled",
        1_000,
        1,
        Duration::from_millis(200),
    )
    .await;
    server.thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_is_down_costs_one_body_run_at_a_time() {
    let server = RedisServer::not_started();
    let cache = Cache::connect(&server.url()).await.unwrap();
    every_arm(
        &cache,
        "redis-server down",
        1_000,
        1,
        Duration::from_millis(200),
    )
    .await;
    // Once the breaker has settled into skipping the cache.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    every_arm(
        &cache,
        "redis-server down, breaker settled",
        1_000,
        11,
        Duration::from_millis(200),
    )
    .await;
}

// ---- one bad key harms only itself ---------------------------------------

/// The bytes the server has sent to its clients so far.
async fn bytes_sent(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = raw(conn, &[b"INFO", b"stats"]).await;
    info.lines()
        .find_map(|line| line.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

/// What one arm saw of a 64 MiB entry (another program's bug) under one
/// key of its cache.
struct Poisoned {
    /// Calls of a healthy key (stored before) that were hits, of 5.
    healthy_hits: u64,
    /// Bytes the server sent while the poisoned key was called 5 times.
    sent: u64,
    errors: u64,
    /// The poisoned key's length once the calls were done.
    left: u64,
}

async fn poisoned(server: &RedisServer, cache: Cache, prefix: &str) -> Poisoned {
    // No response timeout: the server is busy sending 64 MiB at times.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let db = Db::new(cache.clone(), Duration::ZERO);
    db.flight(1).await.unwrap(); // the healthy key, stored
    // Another program's bug: 64 MiB under one of our keys.
    let key = format!("{prefix}:flight:2");
    let poison = vec![b'x'; 64 << 20];
    let () = raw(&mut conn, &[b"SET", key.as_bytes(), &poison]).await;
    let before = (cache.stats().total, bytes_sent(&mut conn).await);
    for _ in 0..5 {
        assert_eq!(db.flight(2).await, Ok(Row { id: 2 }), "fail open");
    }
    let sent = bytes_sent(&mut conn).await - before.1;
    let hits_before = cache.stats().function("flight").unwrap().hits;
    for _ in 0..5 {
        assert_eq!(db.flight(1).await, Ok(Row { id: 1 }));
    }
    let left: u64 = raw(&mut conn, &[b"STRLEN", key.as_bytes()]).await;
    Poisoned {
        healthy_hits: cache.stats().function("flight").unwrap().hits - hits_before,
        sent,
        errors: cache.stats().total.errors - before.0.errors,
        left,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_too_large_to_read_harms_only_its_own_key() {
    let server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .prefix("limited")
        .build()
        .await
        .unwrap();
    let limited = poisoned(&server, cache, "limited").await;
    // The naive arm: a limit that lets the entry through, as a cache
    // without one would.
    let cache = Cache::builder()
        .url(server.url())
        .prefix("unlimited")
        .max_value_size(1 << 30)
        .build()
        .await
        .unwrap();
    let unlimited = poisoned(&server, cache, "unlimited").await;
    for (arm, seen) in [
        ("read limit (default)", &limited),
        ("no read limit", &unlimited),
    ] {
        println!(
            "a 64 MiB entry under one key, {arm}: 5 calls of it made the server send {} KiB \
             and counted {} error(s); the key holds {} bytes after; a healthy key hit {} of 5 times",
            seen.sent / 1024,
            seen.errors,
            seen.left,
            seen.healthy_hits
        );
    }
    // One read of at most the limit (about 4 MB by default, what can
    // cross a 1 Gbit/s link in a third of the op timeout), then a good
    // entry in its place.
    assert!(limited.sent < 5 << 20, "transferred: {}", limited.sent);
    assert_eq!(limited.errors, 1, "counted once, then replaced");
    assert!(limited.left < 100, "replaced by a good entry");
    assert_eq!(limited.healthy_hits, 5, "the others are not harmed");
    // Without one, the reads transfer the entry (all of it, unless a
    // timed-out read's connection is dropped first).
    assert!(
        unlimited.sent > 2 * limited.sent,
        "without a limit the entry is transferred: {}",
        unlimited.sent
    );
}
