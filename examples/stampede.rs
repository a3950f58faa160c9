//! A thousand concurrent requests on one cold key, with and without
//! `single_flight`: how often the slow query runs and how long callers wait.
//!
//! ```sh
//! cargo run --release --example stampede
//! ```
//!
//! Redis: `REDIS_URL` if set; otherwise a private `redis-server` on a free
//! port if one is installed; otherwise the in-process cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_examples::example_backend;
use cache_runtime::redis_cached;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const CALLERS: usize = 1_000;
/// The stand-in for a slow database query: a labelled sleep...
const QUERY_TIME: Duration = Duration::from_millis(50);
/// ...on a database that serves this many queries at once, like a
/// connection pool: what turns a stampede into queueing.
const POOL_SIZE: usize = 10;

static QUERIES: AtomicU64 = AtomicU64::new(0);
static POOL: Semaphore = Semaphore::const_new(POOL_SIZE);

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    id: u64,
    rows: Vec<u32>,
}

#[derive(Debug)]
struct DbError;

/// The slow query: counts its runs, takes a pool connection, then sleeps
/// `QUERY_TIME`.
async fn query_report(id: u64) -> Result<Report, DbError> {
    QUERIES.fetch_add(1, Ordering::SeqCst);
    let _connection = POOL.acquire().await.map_err(|_| DbError)?;
    tokio::time::sleep(QUERY_TIME).await;
    Ok(Report {
        id,
        rows: (0..64).collect(),
    })
}

#[redis_cached(key = "report:plain:<id>", ttl = 60)]
async fn report(id: u64) -> Result<Report, DbError> {
    query_report(id).await
}

#[redis_cached(key = "report:flight:<id>", ttl = 60, single_flight)]
async fn report_single_flight(id: u64) -> Result<Report, DbError> {
    query_report(id).await
}

/// One arm: `CALLERS` concurrent first calls. Returns the query count and
/// the sorted latencies.
async fn stampede(single_flight: bool) -> (u64, Vec<Duration>) {
    QUERIES.store(0, Ordering::SeqCst);
    let mut callers = JoinSet::new();
    for _ in 0..CALLERS {
        callers.spawn(async move {
            let started = Instant::now();
            let result = if single_flight {
                report_single_flight(7).await
            } else {
                report(7).await
            };
            assert_eq!(result.map(|r| r.id).ok(), Some(7));
            started.elapsed()
        });
    }
    let mut latencies = Vec::with_capacity(CALLERS);
    while let Some(latency) = callers.join_next().await {
        latencies.push(latency.expect("a caller panicked"));
    }
    latencies.sort();
    (QUERIES.load(Ordering::SeqCst), latencies)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = example_backend().await?;
    backend.cache.install();
    println!("backend: {}", backend.description);
    println!(
        "{CALLERS} concurrent requests on one cold key; the query is a {} sleep on a pool of {POOL_SIZE} connections",
        ms(QUERY_TIME)
    );

    let (plain_queries, plain) = stampede(false).await;
    let (flight_queries, flight) = stampede(true).await;
    let at = |latencies: &[Duration], p: f64| {
        ms(latencies[((latencies.len() - 1) as f64 * p).round() as usize])
    };
    let coalesced = |name: &str| {
        backend
            .cache
            .stats()
            .function(name)
            .map_or(0, |c| c.coalesced)
    };

    println!();
    println!("|                         | without single_flight | single_flight |");
    println!("|-------------------------|-----------------------|---------------|");
    println!("| slow query runs         | {plain_queries:>21} | {flight_queries:>13} |");
    println!(
        "| callers that waited     | {:>21} | {:>13} |",
        coalesced("report"),
        coalesced("report_single_flight")
    );
    for (label, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        println!(
            "| latency {label}             | {:>21} | {:>13} |",
            at(&plain, p),
            at(&flight, p)
        );
    }
    Ok(())
}
