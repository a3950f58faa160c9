//! Clock skew: three caches on one Redis whose hosts' wall clocks disagree
//! (−5 s, 0, +5 s, set with a test-only offset per `Cache`) serve one hot
//! key with `stale` and with `early_refresh`. No cache decision may depend
//! on the clocks agreeing: no stampede (body runs stay at about one per
//! TTL), and no value served older than TTL + stale.
//!
//! A naive arm in the same harness decides freshness the way a design that
//! trusts clocks does (the writer stamps "fresh until" with its clock, the
//! reader compares with its own; past the stale window it recomputes and
//! overwrites) and shows the stampede that skew causes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_harness::RedisServer;
use cache_runtime::{Cache, redis_cached};

use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

const SKEWS_MILLIS: [i64; 3] = [-5_000, 0, 5_000];
const TTL: Duration = Duration::from_millis(400);
const STALE: Duration = Duration::from_millis(800);
const RUN: Duration = Duration::from_secs(3);
const BODY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    generation: u64,
}

/// The data source shared by every "host": counts body runs and remembers
/// when each generation was computed.
#[derive(Default)]
struct Source {
    runs: AtomicU64,
    running: AtomicU64,
    most_running: AtomicU64,
    computed: Mutex<HashMap<u64, Instant>>,
}

impl Source {
    async fn compute(&self) -> Report {
        let generation = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        tokio::time::sleep(BODY).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.computed
            .lock()
            .unwrap()
            .insert(generation, Instant::now());
        Report { generation }
    }

    fn age(&self, report: &Report) -> Duration {
        self.computed.lock().unwrap()[&report.generation].elapsed()
    }
}

/// One host: a cache with its clock offset, on the shared source.
struct Host {
    cache: Cache,
    source: Arc<Source>,
}

impl Host {
    #[redis_cached(key = "report:stale", ttl = "400ms", stale = "800ms", cache = self.cache)]
    async fn stale(&self) -> Report {
        self.source.compute().await
    }

    #[redis_cached(key = "report:early", ttl = "400ms", early_refresh, cache = self.cache)]
    async fn early(&self) -> Report {
        self.source.compute().await
    }
}

/// What one arm measured.
struct Measured {
    runs: u64,
    /// The most body runs at once: 1 unless callers stampede.
    most_running: u64,
    oldest: Duration,
    calls: u64,
}

/// 3 hosts x 8 callers call `call` for `RUN`; body runs and the oldest
/// value served.
async fn hammer<H, F>(
    hosts: Vec<Arc<H>>,
    source: Arc<Source>,
    cache_of: fn(&H) -> Option<&Cache>,
    call: F,
) -> Measured
where
    H: Send + Sync + 'static,
    F: Fn(Arc<H>) -> std::pin::Pin<Box<dyn std::future::Future<Output = Report> + Send>>
        + Send
        + Sync
        + Copy
        + 'static,
{
    // Warm: the cold start's misses are not what is measured.
    call(hosts[0].clone()).await;
    // Its store landed (a miss does not wait for the reply), so that the
    // other hosts find the value, not the lease.
    if let Some(cache) = cache_of(&hosts[0]) {
        cache.settled().await;
    }
    let warm = source.runs.load(Ordering::SeqCst);
    source.most_running.store(0, Ordering::SeqCst);
    let end = Instant::now() + RUN;
    let oldest = Arc::new(Mutex::new(Duration::ZERO));
    let calls = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = hosts
        .iter()
        .flat_map(|host| std::iter::repeat_n(host.clone(), 8))
        .map(|host| {
            let (source, oldest, calls) = (source.clone(), oldest.clone(), calls.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let report = call(host.clone()).await;
                    let age = source.age(&report);
                    {
                        let mut oldest = oldest.lock().unwrap();
                        *oldest = (*oldest).max(age);
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let oldest = *oldest.lock().unwrap();
    Measured {
        runs: source.runs.load(Ordering::SeqCst) - warm,
        most_running: source.most_running.load(Ordering::SeqCst),
        oldest,
        calls: calls.load(Ordering::SeqCst),
    }
}

async fn hosts(server: &RedisServer, source: &Arc<Source>) -> Vec<Arc<Host>> {
    let mut hosts = Vec::new();
    for skew in SKEWS_MILLIS {
        let cache = Cache::builder()
            .url(server.url())
            .wall_clock_offset(skew)
            .build()
            .await
            .unwrap();
        hosts.push(Arc::new(Host {
            cache,
            source: source.clone(),
        }));
    }
    hosts
}

/// The most body runs a correct cache may need in `RUN` on a warm key: one
/// per TTL, and as many again for early refreshes.
fn bound() -> u64 {
    2 * (RUN.as_millis() / TTL.as_millis()) as u64 + 2
}

/// The naive arm: freshness decided by comparing the writer's clock (in
/// the value) with the reader's.
struct NaiveHost {
    conn: MultiplexedConnection,
    skew_millis: i64,
    source: Arc<Source>,
}

#[derive(Serialize, Deserialize)]
struct Stamped {
    report: Report,
    fresh_until: u64,
}

impl NaiveHost {
    fn now(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        real.saturating_add_signed(self.skew_millis)
    }

    async fn store(&self, report: &Report) {
        let stamped = Stamped {
            report: report.clone(),
            fresh_until: self.now() + TTL.as_millis() as u64,
        };
        let _: () = redis::cmd("SET")
            .arg("naive")
            .arg(serde_json::to_vec(&stamped).unwrap())
            .arg("PX")
            .arg((TTL + STALE).as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap();
    }

    async fn get(&self) -> Report {
        let mut conn = self.conn.clone();
        let found: Option<Vec<u8>> = redis::cmd("GET")
            .arg("naive")
            .query_async(&mut conn)
            .await
            .unwrap();
        let Some(stamped) = found.and_then(|b| serde_json::from_slice::<Stamped>(&b).ok()) else {
            let report = self.source.compute().await;
            self.store(&report).await;
            return report;
        };
        let now = self.now();
        if now < stamped.fresh_until {
            return stamped.report;
        }
        if now < stamped.fresh_until + STALE.as_millis() as u64 {
            let lock: Option<()> = redis::cmd("SET")
                .arg("naive:lock")
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(1_000)
                .query_async(&mut conn)
                .await
                .unwrap();
            if lock.is_none() {
                return stamped.report;
            }
            let report = self.source.compute().await;
            self.store(&report).await;
            let _: () = redis::cmd("DEL")
                .arg("naive:lock")
                .query_async(&mut conn)
                .await
                .unwrap();
            return report;
        }
        // "Expired" by this host's clock: a miss; recompute and overwrite.
        let report = self.source.compute().await;
        self.store(&report).await;
        report
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_cause_no_stampede_and_no_stale_value_beyond_ttl_plus_stale() {
    let server = RedisServer::start();
    let limit = TTL + STALE + Duration::from_millis(150);

    let source = Arc::new(Source::default());
    let stale = hammer(
        hosts(&server, &source).await,
        source,
        |h| Some(&h.cache),
        |h| Box::pin(async move { h.stale().await }),
    )
    .await;
    let source = Arc::new(Source::default());
    let early = hammer(
        hosts(&server, &source).await,
        source,
        |h| Some(&h.cache),
        |h| Box::pin(async move { h.early().await }),
    )
    .await;

    let source = Arc::new(Source::default());
    let mut naive_hosts = Vec::new();
    for skew_millis in SKEWS_MILLIS {
        let conn = cache_harness::raw_connection(&server).await;
        naive_hosts.push(Arc::new(NaiveHost {
            conn,
            skew_millis,
            source: source.clone(),
        }));
    }
    let naive = hammer(
        naive_hosts,
        source,
        |_| None,
        |h| Box::pin(async move { h.get().await }),
    )
    .await;

    println!(
        "clocks at {SKEWS_MILLIS:?} ms, TTL {TTL:?}, stale {STALE:?}, {RUN:?}, 3 hosts x 8 callers \
         (a correct cache needs at most {} body runs):",
        bound()
    );
    for (arm, m) in [
        ("stale", &stale),
        ("early_refresh", &early),
        ("naive, clock-based freshness", &naive),
    ] {
        println!(
            "  {arm}: {} calls, {} body runs, at most {} at once, oldest value served {:?}",
            m.calls, m.runs, m.most_running, m.oldest
        );
    }
    let stampedes = |m: &Measured| m.runs > bound() || m.most_running > 1;
    for (arm, m) in [("stale", &stale), ("early_refresh", &early)] {
        assert!(!stampedes(m), "{arm}: a stampede");
        assert!(
            m.oldest <= limit,
            "{arm}: served a value {:?} old",
            m.oldest
        );
    }
    assert!(
        stampedes(&naive),
        "the naive arm shows what skew does to clock-based freshness"
    );
}
