//! `fail_safe`: an entry kept past its freshness answers when the body
//! fails (or panics), without every caller retrying the failing body; a
//! write is never undone by it. On a real `redis-server`, a cluster and
//! `Cache::memory()`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::on_every_backend;
use cache_runtime::{Cache, Origin, invalidates, origin, redis_cached};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Price {
    sku: u64,
    version: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A prices table that can fail, panic or be slow; counts its queries.
struct Repo {
    cache: Cache,
    version: AtomicU64,
    queries: AtomicU64,
    failing: AtomicBool,
    panicking: AtomicBool,
    query_ms: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            version: AtomicU64::new(0),
            queries: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            panicking: AtomicBool::new(false),
            query_ms: AtomicU64::new(0),
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }

    async fn select(&self, sku: u64) -> Result<Price, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let ms = self.query_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        assert!(!self.panicking.load(Ordering::SeqCst), "the query panicked");
        if self.failing.load(Ordering::SeqCst) {
            return Err(DbError);
        }
        Ok(Price {
            sku,
            version: self.version.load(Ordering::SeqCst),
        })
    }

    /// Fresh for 300 ms, then kept for an hour to answer failures.
    #[redis_cached(key = "price:<sku>", ttl = "300ms", fail_safe = "1h", cache = self.cache)]
    async fn price(&self, sku: u64) -> Result<Price, DbError> {
        self.select(sku).await
    }

    /// The same, without `fail_safe`: the naive arm.
    #[redis_cached(key = "naive:<sku>", ttl = "300ms", cache = self.cache)]
    async fn price_naive(&self, sku: u64) -> Result<Price, DbError> {
        self.select(sku).await
    }

    #[invalidates(Self::price(sku), cache = self.cache)]
    async fn set_price(&self, sku: u64) -> Result<(), DbError> {
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Past the 300 ms of freshness.
async fn expire() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// How long a failure's pause lasts, with a margin.
async fn past_the_pause() {
    tokio::time::sleep(Duration::from_millis(1_200)).await;
}

async fn a_failing_body_is_answered_with_the_kept_value(cache: Cache) {
    let repo = Repo::new(cache.clone());
    let first = repo.price(1).await.unwrap();
    expire().await;
    repo.failing.store(true, Ordering::SeqCst);
    let (kept, how) = origin(repo.price(1)).await;
    assert_eq!((kept, how), (Ok(first.clone()), Origin::FailSafe));
    // Without a kept value, the error is the answer.
    assert_eq!(repo.price(2).await, Err(DbError));
    // Once the database is back and the failure's pause is over, the value
    // is recomputed and fresh again.
    repo.failing.store(false, Ordering::SeqCst);
    repo.version.fetch_add(1, Ordering::SeqCst);
    past_the_pause().await;
    let (fresh, how) = origin(repo.price(1)).await;
    assert_eq!((fresh.unwrap().version, how), (1, Origin::Miss));
    assert_eq!(origin(repo.price(1)).await.1, Origin::Hit);
    let stats = cache.stats();
    assert_eq!(stats.total.fail_safe, 1, "{stats:?}");
}

/// 200 callers at once on an expired key while the database fails, twice:
/// one body run per second of failure's pause at most (the others wait for
/// it, then are answered during the pause). The naive arm runs the body
/// for every caller.
async fn a_failing_database_is_not_retried_by_every_caller(cache: Cache) {
    let repo = Repo::new(cache);
    repo.price(1).await.unwrap();
    repo.price_naive(1).await.unwrap();
    expire().await;
    repo.failing.store(true, Ordering::SeqCst);
    repo.query_ms.store(50, Ordering::SeqCst);
    let before = repo.queries();
    let started = std::time::Instant::now();
    for _ in 0..2 {
        let answers = join_all((0..200).map(|_| repo.price(1))).await;
        assert!(answers.iter().all(Result::is_ok), "all answered");
    }
    let fail_safe = repo.queries() - before;
    // One run, and one more per pause that ended while the calls ran (on a
    // machine slow enough for the 400 calls to take over a second).
    let allowed = 1 + started.elapsed().as_secs();
    let before = repo.queries();
    let answers = join_all((0..200).map(|_| repo.price_naive(1))).await;
    let naive = repo.queries() - before;
    println!(
        "400 callers of a failing key: {fail_safe} body runs with fail_safe; \
         200 callers without: {naive} body runs, {} errors",
        answers.iter().filter(|a| a.is_err()).count()
    );
    assert!(fail_safe <= allowed, "{fail_safe} body runs");
    assert_eq!(naive, 200);
}

/// An invalidation removes the kept value too: a failure after a write
/// is an error, never the value from before the write.
async fn a_write_is_never_undone_by_fail_safe(cache: Cache) {
    let repo = Repo::new(cache);
    repo.price(1).await.unwrap();
    expire().await;
    repo.set_price(1).await.unwrap();
    repo.failing.store(true, Ordering::SeqCst);
    assert_eq!(repo.price(1).await, Err(DbError));
}

async fn a_panicking_body_is_answered_with_the_kept_value(cache: Cache) {
    let repo = Repo::new(cache);
    let first = repo.price(1).await.unwrap();
    expire().await;
    repo.panicking.store(true, Ordering::SeqCst);
    assert_eq!(origin(repo.price(1)).await, (Ok(first), Origin::FailSafe));
}

/// A recomputation that read the database before a write does not store
/// what it read over the write's invalidation (the lease guarantee).
async fn a_recomputation_overtaken_by_a_write_stores_nothing(cache: Cache) {
    #[redis_cached(key = "race:<sku>", ttl = "300ms", fail_safe = "1h", skip(repo), cache = repo.cache)]
    async fn read_then_overtaken(repo: &Repo, sku: u64) -> Result<Price, DbError> {
        let old = repo.select(sku).await;
        if repo.version.load(Ordering::SeqCst) == 0 && repo.queries() > 1 {
            repo.version.fetch_add(1, Ordering::SeqCst);
            let _ = repo
                .cache
                .invalidate(&read_then_overtaken_cache_key(&sku))
                .await;
        }
        old
    }
    let repo = Repo::new(cache.clone());
    read_then_overtaken(&repo, 1).await.unwrap();
    expire().await;
    let dropped = cache.stats().total.dropped_sets;
    assert_eq!(read_then_overtaken(&repo, 1).await.unwrap().version, 0);
    assert_eq!(cache.stats().total.dropped_sets, dropped + 1);
    let (now, how) = origin(read_then_overtaken(&repo, 1)).await;
    assert_eq!((now.unwrap().version, how), (1, Origin::Miss));
}

/// A database behind owned handles, for functions whose bodies can finish
/// in the background (`soft_timeout` with owned arguments).
#[derive(Default)]
struct Db {
    version: AtomicU64,
    queries: AtomicU64,
    failing: AtomicBool,
    query_ms: AtomicU64,
}

impl Db {
    async fn select(&self, sku: u64) -> Result<Price, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let ms = self.query_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(DbError);
        }
        Ok(Price {
            sku,
            version: self.version.load(Ordering::SeqCst),
        })
    }
}

/// Owned arguments: a slow body finishes in the background.
#[redis_cached(
    key = "soft:<sku>",
    ttl = "1s",
    fail_safe = "1h",
    soft_timeout = "100ms",
    skip(cache, db),
    cache = cache
)]
async fn soft_price(cache: Cache, db: std::sync::Arc<Db>, sku: u64) -> Result<Price, DbError> {
    db.select(sku).await
}

/// `stale` with a soft timeout, owned arguments: a slow refresh answers
/// with the old value too, and finishes in the background.
#[redis_cached(
    key = "soft_stale:<sku>",
    ttl = "300ms",
    stale = "1h",
    soft_timeout = "100ms",
    skip(cache, db),
    cache = cache
)]
async fn soft_stale(cache: Cache, db: std::sync::Arc<Db>, sku: u64) -> Result<Price, DbError> {
    db.select(sku).await
}

impl Repo {
    /// A borrowing body (`&self`): its caller waits for it.
    #[redis_cached(
        key = "soft_borrowed:<sku>",
        ttl = "300ms",
        fail_safe = "1h",
        soft_timeout = "100ms",
        cache = self.cache
    )]
    async fn soft_borrowed(&self, sku: u64) -> Result<Price, DbError> {
        self.select(sku).await
    }
}

/// A body slower than the soft timeout: the kept value answers at once,
/// and the body finishes in the background and stores its value.
async fn a_slow_body_finishes_in_the_background(cache: Cache) {
    let db = std::sync::Arc::new(Db::default());
    soft_price(cache.clone(), db.clone(), 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    db.version.fetch_add(1, Ordering::SeqCst);
    db.query_ms.store(700, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let (kept, how) = origin(soft_price(cache.clone(), db.clone(), 1)).await;
    let took = started.elapsed();
    assert_eq!((kept.unwrap().version, how), (0, Origin::FailSafe));
    println!("a 700 ms body behind a 100 ms soft timeout: answered in {took:?}");
    assert!(
        took < Duration::from_millis(700),
        "did not wait for the body"
    );
    assert_eq!(cache.stats().total.background_completions, 1);
    // Meanwhile this process answers with the kept value, without a body.
    let queries = db.queries.load(Ordering::SeqCst);
    assert_eq!(
        soft_price(cache.clone(), db.clone(), 1)
            .await
            .unwrap()
            .version,
        0
    );
    assert_eq!(db.queries.load(Ordering::SeqCst), queries);
    // Once the background body stored its value (a second `set`), it is
    // a fresh hit (for its second of freshness).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cache.stats().total.sets < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "stored in the background"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (fresh, how) = origin(soft_price(cache.clone(), db, 1)).await;
    assert_eq!((fresh.unwrap().version, how), (1, Origin::Hit));
}

/// A body that borrows cannot outlive its call: the caller that runs it
/// waits for it (it is the one that refreshes the entry), the others are
/// answered at their soft timeout with the kept value.
async fn a_slow_borrowing_body_is_waited_for_by_its_caller_only(cache: Cache) {
    let repo = Repo::new(cache.clone());
    repo.soft_borrowed(1).await.unwrap();
    expire().await;
    repo.version.fetch_add(1, Ordering::SeqCst);
    repo.query_ms.store(700, Ordering::SeqCst);
    let runner = origin(repo.soft_borrowed(1));
    let other = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        origin(repo.soft_borrowed(1)).await
    };
    let ((fresh, fresh_how), (kept, kept_how)) = futures_util::future::join(runner, other).await;
    assert_eq!((fresh.unwrap().version, fresh_how), (1, Origin::Miss));
    assert_eq!((kept.unwrap().version, kept_how), (0, Origin::FailSafe));
    assert_eq!(cache.stats().total.background_completions, 0);
    // Stored by its caller.
    assert_eq!(origin(repo.soft_borrowed(1)).await.1, Origin::Hit);
}

/// `refresh(...)` of a key whose body fails answers with the error, and
/// leaves the kept value for the others.
async fn a_failed_refresh_leaves_the_kept_value(cache: Cache) {
    let repo = Repo::new(cache);
    repo.price(1).await.unwrap();
    expire().await;
    repo.failing.store(true, Ordering::SeqCst);
    let (refreshed, how) = origin(cache_runtime::refresh(repo.price(1))).await;
    assert_eq!((refreshed, how), (Err(DbError), Origin::Refresh));
    let (kept, how) = origin(repo.price(1)).await;
    assert_eq!((kept.unwrap().version, how), (0, Origin::FailSafe));
}

async fn a_slow_stale_refresh_answers_with_the_old_value(cache: Cache) {
    let db = std::sync::Arc::new(Db::default());
    soft_stale(cache.clone(), db.clone(), 1).await.unwrap();
    expire().await;
    db.query_ms.store(700, Ordering::SeqCst);
    let (old, how) = origin(soft_stale(cache.clone(), db, 1)).await;
    assert_eq!((old.unwrap().version, how), (0, Origin::FailSafe));
    assert_eq!(cache.stats().total.background_completions, 1);
}

on_every_backend!(
    a_failing_body_is_answered_with_the_kept_value,
    a_failing_database_is_not_retried_by_every_caller,
    a_write_is_never_undone_by_fail_safe,
    a_panicking_body_is_answered_with_the_kept_value,
    a_recomputation_overtaken_by_a_write_stores_nothing,
    a_slow_body_finishes_in_the_background,
    a_slow_borrowing_body_is_waited_for_by_its_caller_only,
    a_failed_refresh_leaves_the_kept_value,
    a_slow_stale_refresh_answers_with_the_old_value,
);

/// A price with when its row was read, in ms since the epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Timed {
    sku: u64,
    read_at_ms: u64,
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(since.unwrap().as_millis()).unwrap()
}

/// The database of the load test: healthy, failing, or stalled (a query
/// takes `stall_ms`).
#[derive(Default)]
struct Weather {
    queries: AtomicU64,
    failing: AtomicBool,
    stall_ms: AtomicU64,
}

impl Weather {
    async fn select(&self, sku: u64) -> Result<Timed, DbError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let ms = self.stall_ms.load(Ordering::SeqCst);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(DbError);
        }
        Ok(Timed {
            sku,
            read_at_ms: now_ms(),
        })
    }
}

const LOAD_TTL_MS: u64 = 200;
const LOAD_FAIL_SAFE_MS: u64 = 10_000;

#[redis_cached(
    key = "load:<sku>",
    ttl = "200ms",
    fail_safe = "10s",
    soft_timeout = "50ms",
    skip(cache, db),
    cache = cache
)]
async fn load_price(cache: Cache, db: std::sync::Arc<Weather>, sku: u64) -> Result<Timed, DbError> {
    db.select(sku).await
}

/// The naive arm: the same function without `fail_safe` and `soft_timeout`.
#[redis_cached(key = "load_naive:<sku>", ttl = "200ms", skip(cache, db), cache = cache)]
async fn load_price_naive(
    cache: Cache,
    db: std::sync::Arc<Weather>,
    sku: u64,
) -> Result<Timed, DbError> {
    db.select(sku).await
}

/// What one arm of the load test saw.
#[derive(Default)]
struct Seen {
    latencies: Vec<Duration>,
    errors: u64,
    /// Values older than TTL + fail_safe when answered.
    too_old: u64,
}

impl Seen {
    /// p99 and the longest.
    fn p99(&mut self) -> (Duration, Duration) {
        self.latencies.sort();
        let p99 = self.latencies[self.latencies.len() * 99 / 100];
        (p99, *self.latencies.last().unwrap())
    }
}

/// Under load, a database that errors for 1.5 s and then stalls (3 s a
/// query) for 1.5 s: with `fail_safe` and `soft_timeout`, every call is
/// answered (p99 printed), by a bounded number of body runs, and no value
/// is older than TTL + fail_safe (every answer checked); the naive arm in
/// the same run fails every call of the outage and waits for the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_failing_then_stalled_database() {
    let server = cache_harness::RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let (db, naive_db) = (
        std::sync::Arc::new(Weather::default()),
        std::sync::Arc::new(Weather::default()),
    );
    const SKUS: u64 = 20;
    for sku in 0..SKUS {
        load_price(cache.clone(), db.clone(), sku).await.unwrap();
        load_price_naive(cache.clone(), naive_db.clone(), sku)
            .await
            .unwrap();
    }
    let (queries, naive_queries) = (
        db.queries.load(Ordering::SeqCst),
        naive_db.queries.load(Ordering::SeqCst),
    );
    let seen = std::sync::Arc::new(std::sync::Mutex::new((Seen::default(), Seen::default())));
    let end = std::time::Instant::now() + Duration::from_millis(4_000);
    // Each arm has tasks of its own: a naive call stalled for 3 s must not
    // hold up the other arm's calls.
    let tasks: Vec<_> = (0..32)
        .map(|task| {
            let (cache, db, naive_db, seen) =
                (cache.clone(), db.clone(), naive_db.clone(), seen.clone());
            tokio::spawn(async move {
                let naive = task % 2 == 1;
                let mut i = task;
                while std::time::Instant::now() < end {
                    let sku = i % SKUS;
                    i += 1;
                    let started = std::time::Instant::now();
                    let answer = match naive {
                        false => load_price(cache.clone(), db.clone(), sku).await,
                        true => load_price_naive(cache.clone(), naive_db.clone(), sku).await,
                    };
                    let took = started.elapsed();
                    let mut seen = seen.lock().unwrap();
                    let arm = if naive { &mut seen.1 } else { &mut seen.0 };
                    arm.latencies.push(took);
                    match answer {
                        Ok(price) => {
                            let age = now_ms().saturating_sub(price.read_at_ms);
                            if age > LOAD_TTL_MS + LOAD_FAIL_SAFE_MS {
                                arm.too_old += 1;
                            }
                        }
                        Err(_) => arm.errors += 1,
                    }
                }
            })
        })
        .collect();
    // The weather: fine for 0.3 s (entries expire), failing for 1.5 s,
    // then stalled for 2.2 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for db in [&db, &naive_db] {
        db.failing.store(true, Ordering::SeqCst);
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for db in [&db, &naive_db] {
        db.failing.store(false, Ordering::SeqCst);
        db.stall_ms.store(3_000, Ordering::SeqCst);
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut seen = seen.lock().unwrap();
    let body_runs = db.queries.load(Ordering::SeqCst) - queries;
    let naive_runs = naive_db.queries.load(Ordering::SeqCst) - naive_queries;
    let ((p99, longest), (naive_p99, naive_longest)) = (seen.0.p99(), seen.1.p99());
    let stats = cache.stats();
    let function = stats.function("load_price").unwrap();
    println!(
        "fail_safe + soft_timeout (50 ms): {} calls, {} errors, p99 {p99:?}, longest {longest:?}, {body_runs} body runs \
         ({} answered by the kept value, {} finished in the background), {} values older than TTL + fail_safe",
        seen.0.latencies.len(),
        seen.0.errors,
        function.fail_safe,
        function.background_completions,
        seen.0.too_old,
    );
    println!(
        "naive arm: {} calls, {} errors, p99 {naive_p99:?}, longest {naive_longest:?}, {naive_runs} body runs",
        seen.1.latencies.len(),
        seen.1.errors,
    );
    assert_eq!(seen.0.errors, 0, "every call answered");
    assert_eq!(seen.0.too_old, 0);
    // Not waiting for the stalled database (3 s a query).
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    // No retry storm: per key, one run per failure's pause (1 s) or so,
    // against one run per call for the naive arm.
    assert!(body_runs <= SKUS * 8, "{body_runs} body runs");
    assert!(naive_runs > body_runs * 3, "the naive arm stormed");
    assert!(seen.1.errors > 0 && naive_longest >= Duration::from_secs(1));
}
