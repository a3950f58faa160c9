//! Stampede protection on a real `redis-server`: `single_flight` in one
//! process and across processes, `stale`, `early_refresh`.
//!
//! The distributed tests re-run this test binary as worker processes: the
//! `worker` test does nothing unless `STAMPEDE_WORKER_URL` is set.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_harness::{RedisCluster, RedisServer, Target, raw, raw_connection};
use cache_runtime::{Cache, redis_cached};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Not `Clone`: waiters get the leader's encoded value, not a copy.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Report {
    id: u64,
    generation: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// What the next body run does.
#[derive(Clone, Copy, PartialEq)]
enum Next {
    Succeed,
    Fail,
    Panic,
    Hang,
}

/// A slow data source: counts its body runs, and can be told to fail,
/// panic, hang or block on a signal.
struct Source {
    cache: Cache,
    runs: AtomicU64,
    body: Duration,
    first_run: Mutex<Next>,
    gate: Notify,
    gated: AtomicBool,
    /// Every body run fails (after its work).
    failing: AtomicBool,
    running: AtomicUsize,
    most_running: AtomicUsize,
    /// When each body run started and ended.
    log: Mutex<Vec<(Instant, Instant)>>,
}

impl Source {
    fn new(cache: Cache, body: Duration) -> Arc<Self> {
        Arc::new(Source {
            cache,
            runs: AtomicU64::new(0),
            body,
            first_run: Mutex::new(Next::Succeed),
            gate: Notify::new(),
            gated: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        })
    }

    fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    async fn load(&self, id: u64) -> Result<Report, DbError> {
        let started = Instant::now();
        let generation = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(running, Ordering::SeqCst);
        let next = std::mem::replace(&mut *self.first_run.lock().unwrap(), Next::Succeed);
        if self.gated.load(Ordering::SeqCst) {
            self.gate.notified().await;
        }
        tokio::time::sleep(self.body).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((started, Instant::now()));
        match next {
            _ if self.failing.load(Ordering::SeqCst) => Err(DbError),
            Next::Succeed => Ok(Report { id, generation }),
            Next::Fail => Err(DbError),
            Next::Panic => panic!("the leader's body panics"),
            Next::Hang => std::future::pending().await,
        }
    }

    #[redis_cached(key = "plain:<id>", ttl = 60, cache = self.cache)]
    async fn plain(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }

    #[redis_cached(key = "flight:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn flight(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }

    /// Id 0 does not exist: the answer is `None`.
    #[redis_cached(key = "maybe:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn maybe(&self, id: u64) -> Option<Report> {
        self.load(id).await.ok().filter(|_| id != 0)
    }

    #[redis_cached(key = "stale:<id>", ttl = "300ms", stale = "30s", cache = self.cache)]
    async fn stale(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }

    #[redis_cached(key = "early:<id>", ttl = "1s", early_refresh = 2.0, cache = self.cache)]
    async fn early(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }

    #[redis_cached(key = "spread:<id>", ttl = 10, jitter = 0.2, stale = "5s", cache = self.cache)]
    async fn spread(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }
}

/// Starts `callers` concurrent calls of `call` and waits for all of them.
async fn stampede<F, Fut>(callers: usize, call: F) -> Vec<Result<Report, DbError>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Report, DbError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        tasks.spawn(call());
    }
    let mut results = Vec::with_capacity(callers);
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.expect("no caller panics"));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_callers_cost_one_body_run_with_single_flight() {
    let server = RedisServer::start();
    thousand_cold_callers(&Target::server(&server), "redis-server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_cold_callers_cost_one_body_run_with_single_flight_on_a_cluster() {
    let target = Target::cluster(RedisCluster::shared());
    thousand_cold_callers(&target, "a 3+3 Redis Cluster").await;
}

async fn thousand_cold_callers(target: &Target, what: &str) {
    let cache = target.cache(Some("thousand")).await;
    let body = Duration::from_millis(50);
    let with = Source::new(cache.clone(), body);
    // Long enough that all 1,000 callers have read the key before the
    // first naive caller stores it, even on a busy machine: otherwise late
    // callers hit and the naive arm looks better than it is.
    let without = Source::new(cache.clone(), Duration::from_millis(300));

    let mut callers = JoinSet::new();
    for _ in 0..1_000 {
        let source = with.clone();
        callers.spawn(async move { (Instant::now(), source.flight(1).await) });
    }
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut began = Vec::new();
    while let Some(joined) = callers.join_next().await {
        let (at, result) = joined.expect("no caller panics");
        assert!(result.is_ok(), "{result:?}");
        *seen.entry(format!("{result:?}")).or_default() += 1;
        began.push(at);
    }
    let arrivals = *began.iter().max().unwrap() - *began.iter().min().unwrap();
    println!(
        "{what}: single-flight results {seen:?}; stats {:?}",
        with.cache.stats().total
    );
    let results = stampede(1_000, || {
        let source = without.clone();
        async move { source.plain(1).await }
    })
    .await;
    assert!(results.iter().all(Result::is_ok));

    let stats = cache.stats();
    println!(
        "1000 concurrent callers (arriving over {arrivals:.0?}), one cold key, {what}: single_flight (50 ms body): {} body runs (coalesced {}); without (300 ms body): {} body runs",
        with.runs(),
        stats.function("flight").unwrap().coalesced,
        without.runs()
    );
    // One run; one more when a caller began after it and its read failed
    // (a burst that times out reads on a busy machine), so that the cache
    // could not say whether a write came in between: then one run at a
    // time while the callers arrive (see tests/bad_weather.rs).
    let bound = 2 + (arrivals.as_millis() / body.as_millis()) as u64;
    assert!(with.runs() <= bound, "{} body runs", with.runs());
    assert_eq!(
        without.runs(),
        1_000,
        "without single_flight every caller computes"
    );
}

/// Lets the first body run start alone, then adds `waiters` callers, then
/// `disrupt`s the leader. Returns the body runs and how many callers got `Ok`.
async fn leader_trouble(next: Next, disrupt_by_abort: bool) -> (u64, usize, usize) {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache, Duration::from_millis(100));
    *source.first_run.lock().unwrap() = next;
    let leader = {
        let source = source.clone();
        tokio::spawn(async move { source.flight(7).await })
    };
    while source.runs() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let waiters = {
        let source = source.clone();
        tokio::spawn(async move {
            stampede(99, || {
                let source = source.clone();
                async move { source.flight(7).await }
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    if disrupt_by_abort {
        leader.abort();
    }
    let leader_ok = matches!(leader.await, Ok(Ok(_)));
    let waiters = tokio::time::timeout(Duration::from_secs(10), waiters)
        .await
        .expect("every waiter completes")
        .unwrap();
    let ok = waiters.iter().filter(|r| r.is_ok()).count() + usize::from(leader_ok);
    (source.runs(), ok, waiters.len() + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cancelled_or_panicking_leader_hands_over() {
    for (what, next, abort) in [
        ("returns Err", Next::Fail, false),
        ("is cancelled", Next::Hang, true),
        ("panics", Next::Panic, false),
    ] {
        let (runs, ok, callers) = leader_trouble(next, abort).await;
        println!("leader {what}: {callers} callers, {runs} body runs, {ok} got Ok");
        assert_eq!(runs, 2, "leader {what}: one more leader, not a stampede");
        assert_eq!(ok, callers - 1, "leader {what}: every waiter got the value");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_leaders_keep_failing_is_not_hit_by_every_waiter_at_once() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let mut figures = Vec::new();
    for coalesced in [true, false] {
        let source = Source::new(cache.clone(), Duration::from_millis(20));
        source.failing.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let results = stampede(100, || {
            let source = source.clone();
            async move {
                if coalesced {
                    source.flight(3).await
                } else {
                    source.plain(3).await
                }
            }
        })
        .await;
        assert!(
            results.iter().all(Result::is_err),
            "each caller got its own error"
        );
        let most = source.most_running.load(Ordering::SeqCst);
        println!(
            "100 callers of a key whose body always fails (20 ms), {}: {} body runs, \
             at most {most} at once, all answered in {:?}",
            if coalesced {
                "single_flight"
            } else {
                "no single_flight"
            },
            source.runs(),
            started.elapsed()
        );
        figures.push(most);
    }
    assert!(
        figures[0] <= 2,
        "single_flight: after 3 failed leaders, at most 2 at a time"
    );
    assert!(
        figures[1] > 50,
        "without it, the failing database takes them all at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_refresh_serves_the_old_value_without_a_refresh_storm() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache.clone(), Duration::ZERO);
    assert_eq!(source.stale(5).await.unwrap().generation, 1);
    tokio::time::sleep(Duration::from_millis(400)).await; // past the 300 ms TTL
    source.failing.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(2_500) {
        let served = source.stale(5).await.unwrap();
        assert_eq!(served.generation, 1, "stale-if-error: the old value");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refreshes = source.runs() - 1;
    println!(
        "refresh failing for 2.5 s: {calls} calls, all served the old value; {refreshes} refresh attempts \
         (one per second, not one per call)"
    );
    assert!((2..=4).contains(&refreshes), "{refreshes} refresh attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_given_a_leaders_answer_of_none() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache.clone(), Duration::from_millis(50));
    let mut tasks = JoinSet::new();
    for _ in 0..100 {
        let source = source.clone();
        tasks.spawn(async move { source.maybe(0).await });
    }
    let mut nones = 0;
    while let Some(answer) = tasks.join_next().await {
        nones += usize::from(answer.unwrap().is_none());
    }
    let counts = cache.stats().function("maybe").unwrap();
    println!(
        "100 concurrent lookups of an id that does not exist, single_flight: {} body run(s), \
         {nones} got None, {} coalesced",
        source.runs(),
        counts.coalesced
    );
    assert_eq!((source.runs(), nones), (1, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_never_wait_on_each_other() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache, Duration::from_millis(1));
    source.gated.store(true, Ordering::SeqCst);
    let blocked = {
        let source = source.clone();
        tokio::spawn(async move { source.flight(1).await })
    };
    while source.runs() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    source.gated.store(false, Ordering::SeqCst);
    let other = tokio::time::timeout(Duration::from_secs(5), source.flight(2)).await;
    assert!(other.is_ok(), "key 2 waited for key 1");
    source.gate.notify_one();
    blocked.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_values_are_served_while_one_caller_refreshes() {
    let server = RedisServer::start();
    stale_while_refreshing(&Target::server(&server)).await;
}

/// On a cluster the refresh lock is in its key's slot (`{key}\0refresh`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_values_are_served_while_one_caller_refreshes_on_a_cluster() {
    stale_while_refreshing(&Target::cluster(RedisCluster::shared())).await;
}

async fn stale_while_refreshing(target: &Target) {
    let cache = target.cache(Some("refreshing")).await;
    let source = Source::new(cache.clone(), Duration::ZERO);
    assert_eq!(source.stale(1).await.unwrap().generation, 1);
    tokio::time::sleep(Duration::from_millis(400)).await; // past the 300 ms TTL

    // The refresh blocks until the test says so: a caller that waited for
    // it would hang.
    source.gated.store(true, Ordering::SeqCst);
    let refresher = {
        let source = source.clone();
        tokio::spawn(async move { source.stale(1).await })
    };
    while source.runs() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let served = tokio::time::timeout(
        Duration::from_secs(5),
        stampede(20, || {
            let source = source.clone();
            async move { source.stale(1).await }
        }),
    )
    .await
    .expect("callers did not wait for the refresh");
    println!(
        "20 callers served the stale value in {:?} while the refresh was blocked",
        started.elapsed()
    );
    assert!(served.iter().all(|r| r.as_ref().unwrap().generation == 1));
    assert_eq!(source.runs(), 2, "exactly one refresh ran");

    source.gated.store(false, Ordering::SeqCst);
    source.gate.notify_one();
    assert_eq!(refresher.await.unwrap().unwrap().generation, 2);
    assert_eq!(
        source.stale(1).await.unwrap().generation,
        2,
        "the refreshed value"
    );
    let counts = cache.stats().function("stale").unwrap();
    println!(
        "stale: hits {} stale_hits {} refreshes {} misses {}",
        counts.hits, counts.stale_hits, counts.refreshes, counts.misses
    );
    assert_eq!(
        (counts.stale_hits, counts.refreshes, counts.misses),
        (20, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_recomputes_before_expiry_under_a_steady_stream() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache.clone(), Duration::from_millis(40));
    source.early(1).await.unwrap(); // the one miss
    // A request every 5 ms for 3.5 s: across three 1 s TTLs.
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3_500) {
        let source = source.clone();
        tasks.spawn(async move { source.early(1).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap().unwrap();
    }
    let counts = cache.stats().function("early").unwrap();
    let most = source.most_running.load(Ordering::SeqCst);
    // Each value expires 1 s after its body ended; the next body run must
    // start before that.
    let log = source.log.lock().unwrap().clone();
    let margins: Vec<i64> = log
        .windows(2)
        .map(|pair| {
            let expiry = pair[0].1 + Duration::from_secs(1);
            let early = expiry.saturating_duration_since(pair[1].0).as_millis() as i64;
            let late = pair[1].0.saturating_duration_since(expiry).as_millis() as i64;
            early - late
        })
        .collect();
    println!(
        "early_refresh (β = 2) over 3.5 s: {} calls, {} miss, {} early recomputes starting {margins:?} ms before expiry, \
         {} served the old value while a refresh finished, at most {most} computing at once",
        counts.hits + counts.misses + counts.refreshes + counts.stale_hits,
        counts.misses,
        counts.refreshes,
        counts.stale_hits
    );
    assert_eq!(counts.misses, 1, "only the first call found the key empty");
    assert!(counts.refreshes >= 3, "recomputed before each expiry");
    assert!(
        margins.iter().all(|m| *m > 0),
        "a recompute started after expiry: {margins:?}"
    );
    assert!(most <= 2, "{most} recomputes at once");
}

#[tokio::test]
async fn jitter_composes_with_the_stale_window() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let source = Source::new(cache, Duration::ZERO);
    let mut conn = raw_connection(&server).await;
    let mut expiries = Vec::new();
    for id in 0..20 {
        source.spread(id).await.unwrap();
        source.cache.settled().await;
        let key = format!("spread:{id}");
        let pttl: i64 = raw(&mut conn, &[b"PTTL", key.as_bytes()]).await;
        expiries.push(pttl);
    }
    // TTL 10 s ± 20 %, plus the 5 s stale window.
    assert!(
        expiries.iter().all(|t| (12_900..=17_000).contains(t)),
        "{expiries:?}"
    );
    let distinct: std::collections::BTreeSet<_> = expiries.iter().map(|t| t / 100).collect();
    assert!(distinct.len() > 5, "spread: {expiries:?}");
}

// ---- distributed single-flight, across OS processes ----------------------

/// Runs when a distributed test starts this binary as a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker() {
    let Ok(url) = std::env::var("STAMPEDE_WORKER_URL") else {
        return;
    };
    let env = |name: &str| -> u64 { std::env::var(name).unwrap().parse().unwrap() };
    let target: Target = url.parse().unwrap();
    // What is measured is how the processes share one lease, not how a
    // call fails open: an op timeout that four processes of 250 callers
    // meet on a busy 2-core machine. A call that times out runs its body
    // uncached, as it should, and this test would count a second run (one
    // run with two busy loops on the cores gave 2 at the default 100 ms;
    // the report now says how many calls failed open).
    let cache = target
        .builder()
        .prefix(std::env::var("STAMPEDE_PREFIX").unwrap())
        .op_timeout(Duration::from_secs(1))
        .lease(Duration::from_millis(env("STAMPEDE_LEASE_MS")))
        .build()
        .await
        .unwrap();
    let source = Source::new(
        cache.clone(),
        Duration::from_millis(env("STAMPEDE_BODY_MS")),
    );
    let start_at = UNIX_EPOCH + Duration::from_millis(env("STAMPEDE_START_AT"));
    if let Ok(wait) = start_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
    let started = Instant::now();
    let results = stampede(env("STAMPEDE_CALLERS") as usize, || {
        let source = source.clone();
        async move { source.distributed(9).await }
    })
    .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let counts = cache.stats().function("distributed").unwrap_or_default();
    println!(
        "worker: runs={} ok={ok} coalesced={} polls={} bypasses={} errors={} elapsed_ms={}",
        source.runs(),
        counts.coalesced,
        counts.lease_polls,
        counts.bypasses,
        counts.errors,
        started.elapsed().as_millis()
    );
}

impl Source {
    #[redis_cached(key = "dist:<id>", ttl = 60, single_flight = "distributed", cache = self.cache)]
    async fn distributed(&self, id: u64) -> Result<Report, DbError> {
        self.load(id).await
    }
}

/// Where and under which prefix the workers of one test meet.
struct Meeting<'a> {
    target: &'a Target,
    prefix: &'a str,
}

fn spawn_worker(
    at: &Meeting<'_>,
    callers: usize,
    body_ms: u64,
    lease_ms: u64,
    start_at: u64,
) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "worker", "--nocapture", "--test-threads=1"])
        .env("STAMPEDE_WORKER_URL", at.target.to_string())
        .env("STAMPEDE_PREFIX", at.prefix)
        .env("STAMPEDE_CALLERS", callers.to_string())
        .env("STAMPEDE_BODY_MS", body_ms.to_string())
        .env("STAMPEDE_LEASE_MS", lease_ms.to_string())
        .env("STAMPEDE_START_AT", start_at.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A worker's `worker: runs=.. ok=..` line, as numbers by name.
fn worker_report(child: Child) -> std::collections::BTreeMap<String, u64> {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        // libtest may print `test worker ... ` on the same line.
        .find_map(|l| l.split_once("worker: ").map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the worker: {stdout}"));
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.parse().unwrap()))
        .collect()
}

fn unix_millis_in(delay: Duration) -> u64 {
    (SystemTime::now() + delay)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn four_processes_of_250_callers_cost_one_body_run() {
    let server = RedisServer::start();
    four_processes(&Target::server(&server), "redis-server");
}

#[test]
fn four_processes_of_250_callers_cost_one_body_run_on_a_cluster() {
    four_processes(
        &Target::cluster(RedisCluster::shared()),
        "a 3+3 Redis Cluster",
    );
}

fn four_processes(target: &Target, what: &str) {
    let at = Meeting {
        target,
        prefix: "four",
    };
    // All workers start together, once every process is up.
    let start_at = unix_millis_in(Duration::from_millis(1_500));
    let workers: Vec<Child> = (0..4)
        .map(|_| spawn_worker(&at, 250, 50, 5_000, start_at))
        .collect();
    let reports: Vec<_> = workers.into_iter().map(worker_report).collect();
    let runs: u64 = reports.iter().map(|r| r["runs"]).sum();
    let ok: u64 = reports.iter().map(|r| r["ok"]).sum();
    let polls: Vec<u64> = reports.iter().map(|r| r["polls"]).collect();
    let failed_open: Vec<u64> = reports
        .iter()
        .map(|r| r["bypasses"] + r["errors"])
        .collect();
    println!(
        "4 processes x 250 callers, one cold key, 50 ms body, {what}: {runs} body run(s) in all, {ok} Ok, lease polls per process {polls:?}, bypasses and errors per process {failed_open:?}"
    );
    assert_eq!(ok, 1_000);
    assert_eq!(runs, 1, "one body run across all processes");
}

#[test]
fn a_killed_lease_holder_is_taken_over_after_its_lease() {
    let server = RedisServer::start();
    killed_lease_holder(&Target::server(&server), "redis-server");
}

#[test]
fn a_killed_lease_holder_is_taken_over_after_its_lease_on_a_cluster() {
    killed_lease_holder(
        &Target::cluster(RedisCluster::shared()),
        "a 3+3 Redis Cluster",
    );
}

fn killed_lease_holder(target: &Target, what: &str) {
    let at = Meeting {
        target,
        prefix: "killed",
    };
    let lease = Duration::from_millis(1_000);
    let body = Duration::from_millis(100);
    // The holder computes for 30 s: it is killed long before.
    let mut holder = spawn_worker(&at, 1, 30_000, 1_000, 0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut conn = target.raw().await;
        for _ in 0..500 {
            let held: Option<Vec<u8>> = redis::cmd("GET")
                .arg("killed:dist:9")
                .query_async(&mut conn)
                .await
                .unwrap();
            if held.is_some_and(|bytes| bytes.starts_with(b"\0lease:")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the holder never took the lease");
    });
    let started = Instant::now();
    let others: Vec<Child> = (0..3)
        .map(|_| spawn_worker(&at, 50, 100, 1_000, 0))
        .collect();
    holder.kill().unwrap(); // SIGKILL: no chance to release the lease
    holder.wait().unwrap();
    let reports: Vec<_> = others.into_iter().map(worker_report).collect();
    let elapsed = started.elapsed();
    let runs: u64 = reports.iter().map(|r| r["runs"]).sum();
    let ok: u64 = reports.iter().map(|r| r["ok"]).sum();
    println!(
        "lease holder SIGKILLed, {what}: 3 processes x 50 callers done in {elapsed:?} (lease {lease:?} + body {body:?}), {runs} body run(s), {ok} Ok"
    );
    assert_eq!(ok, 150);
    assert_eq!(
        runs, 1,
        "one process took over; the others waited for its value"
    );
    // Liveness: bounded by the lease, plus the body and process start-up.
    assert!(
        elapsed < lease + body + Duration::from_secs(3),
        "{elapsed:?}"
    );
}
