//! The service example (`src/`), short: the same axum + SQLite
//! service served uncached, cached by attributes, and cached by a naive
//! repository that renames around the cache, under one load generator
//! (real HTTP over loopback). The cached arm must serve no stale read and
//! send fewer SQL queries than the uncached one; the naive arm shows that
//! the checker catches stale reads. Then the same on `Cache::memory()`.
//!
//! One test runs both backends in turn: the cached repositories use the
//! installed cache, which is process-wide.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cache_harness::RedisServer;

use cache_service::db::{Db, RepoError, User, UserRepo};
use cache_service::load::{Arm, CacheAt, Config, Report};
use cache_service::{cached, http, load, observe, plain};

/// The naive arm (test code only): reads through the cached repository,
/// renames through the plain one, so nothing invalidates.
struct RenamesAroundTheCache {
    reads: cached::SqliteUserRepo,
    writes: plain::SqliteUserRepo,
}

#[async_trait]
impl UserRepo for RenamesAroundTheCache {
    async fn user(&self, id: i64) -> Result<Option<User>, RepoError> {
        self.reads.user(id).await
    }
    async fn users(&self, ids: &[i64]) -> Result<HashMap<i64, User>, RepoError> {
        self.reads.users(ids).await
    }
    async fn rename(&self, id: i64, name: &str) -> Result<Option<User>, RepoError> {
        self.writes.rename(id, name).await
    }
}

async fn short_run(cache_at: &CacheAt, label: &str) -> Vec<Report> {
    let config = Config {
        users: 500,
        missing: 100,
        concurrency: 8,
        round: Duration::from_millis(600),
        requests_per_round: 1_500,
        rounds: 1,
    };
    let path = std::env::temp_dir().join(format!(
        "cache-service-test-{}-{label}.db",
        std::process::id()
    ));
    let db = Arc::new(
        Db::create(&path, config.users, Duration::ZERO)
            .await
            .unwrap(),
    );
    let plain = || plain::SqliteUserRepo {
        db: Arc::clone(&db),
    };
    let cached = || cached::SqliteUserRepo {
        db: Arc::clone(&db),
    };
    let (off, off_server) = http::serve(Arc::new(plain())).await.unwrap();
    let (naive, naive_server) = http::serve(Arc::new(RenamesAroundTheCache {
        reads: cached(),
        writes: plain(),
    }))
    .await
    .unwrap();
    let (on, on_server) = http::serve(Arc::new(cached())).await.unwrap();
    let arms = [
        Arm {
            name: "cache off",
            address: off,
            cached: false,
        },
        Arm {
            name: "naive (renames around the cache)",
            address: naive,
            cached: true,
        },
        // Last, so that it is the one checked at rest.
        Arm {
            name: "cache on",
            address: on,
            cached: true,
        },
    ];
    let (stop_watching, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(observe::watch_hit_ratios(
        Duration::from_millis(200),
        stopped,
    ));
    let reports = load::run(&config, &arms, cache_at, &db).await.unwrap();
    let scraped = reqwest::get(format!("http://{on}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let _ = stop_watching.send(true);
    for warning in watcher.await.unwrap() {
        println!("{label}: hit-ratio watch: {warning}");
    }
    check_metrics(&scraped);
    for server in [off_server, naive_server, on_server] {
        server.abort();
    }
    db.remove().await;
    println!("{label}:\n{}", load::table(&reports));
    reports
}

/// `GET /metrics`: the cache's counters, by function and outcome, when
/// built with the `metrics` feature (the README's test command has it).
fn check_metrics(scraped: &str) {
    if observe::prometheus().is_none() {
        assert!(
            scraped.contains("built without the `metrics` feature"),
            "{scraped}"
        );
        return;
    }
    let calls: Vec<&str> = scraped
        .lines()
        .filter(|l| l.starts_with("cache_calls_total{"))
        .collect();
    println!("/metrics, cache_calls_total: {calls:#?}");
    assert!(
        calls
            .iter()
            .any(|l| l.contains("outcome=\"hit\"") && l.contains("function=\"")),
        "hits by function in /metrics: {scraped}"
    );
    assert!(scraped.contains("cache_call_duration_seconds"), "{scraped}");
    assert!(
        scraped.contains("cache_operation_duration_seconds_count{operation=\"get\"}"),
        "{scraped}"
    );
}

fn check(reports: &[Report]) {
    let [off, naive, on] = reports else {
        panic!("three arms");
    };
    for arm in reports {
        assert_eq!(arm.failed, 0, "{}: failed requests", arm.name);
        assert_eq!(arm.wrong_answers, 0, "{}: wrong answers", arm.name);
        assert!(
            arm.reads > 1_000,
            "{}: only {} reads checked",
            arm.name,
            arm.reads
        );
    }
    assert_eq!(off.stale_reads, 0);
    assert_eq!(on.stale_reads, 0, "the cached service served stale reads");
    assert_eq!(on.stale_at_rest, Some(0), "stale entries after the run");
    assert!(
        naive.stale_reads > 0,
        "the naive arm served no stale read: the checker cannot fail in this harness"
    );
    let per_request = |r: &Report| r.sql_queries as f64 / r.requests as f64;
    println!(
        "SQL per request: {:.3} off, {:.3} on; stale reads: {} on, {} naive",
        per_request(off),
        per_request(on),
        on.stale_reads,
        naive.stale_reads
    );
    assert!(
        per_request(on) < per_request(off) * 0.7,
        "the cache saved too few queries"
    );
    assert!(on.hit_ratio().is_some_and(|h| h > 0.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_service_serves_no_stale_read_and_fewer_queries() {
    // Before the first cached call, so that every counter reaches it.
    observe::prometheus();
    let server = RedisServer::start();
    check(&short_run(&CacheAt::Redis(server.url()), "redis-server").await);
    check(&short_run(&CacheAt::Memory, "Cache::memory()").await);
}

/// `cached.rs` is `plain.rs` with attributes added and nothing else: the
/// README shows the diff and says so.
#[test]
fn cached_repository_is_the_plain_one_plus_attributes() {
    let code = |text: &str, drop_attributes: bool| -> Vec<String> {
        text.lines()
            .filter(|line| !line.starts_with("//!"))
            .filter(|line| {
                let line = line.trim_start();
                !(drop_attributes
                    && (line.starts_with("#[redis_cached")
                        || line.starts_with("#[invalidates")
                        || line.starts_with("#[cached_impl]")
                        || line.starts_with("use cache_runtime::")))
            })
            .map(str::to_owned)
            .collect()
    };
    let plain = include_str!("../src/plain.rs");
    let cached = include_str!("../src/cached.rs");
    assert_eq!(code(cached, true), code(plain, false));
    assert_ne!(
        code(cached, false),
        code(plain, false),
        "no attribute at all?"
    );
}
