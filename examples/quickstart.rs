//! The cache-aside walkthrough from the Redis tutorials, with the attribute.
//!
//! A slow data source (a simulated 50 ms database query), one cold call,
//! then many warm calls served from Redis, and a table of what it cost.
//!
//! Redis: `REDIS_URL` if set; otherwise a private `redis-server` on a free
//! port if one is installed; otherwise the in-process cache.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::time::{Duration, Instant};

use cache_examples::example_backend;
use cache_runtime::{Cache, redis, redis_cached};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
}

#[derive(Debug)]
struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database error")
    }
}

impl std::error::Error for DbError {}

/// The slow part. Clearly labelled: a 50 ms sleep stands in for the query.
async fn query_user_from_database(id: u64) -> Result<User, DbError> {
    tokio::time::sleep(Duration::from_millis(50)).await; // simulated database latency
    Ok(User {
        id,
        name: format!("User {id}"),
        email: format!("user{id}@example.com"),
    })
}

/// The whole integration: one attribute.
#[redis_cached(key = "user:<id>", ttl = 60)]
async fn get_user(id: u64) -> Result<User, DbError> {
    query_user_from_database(id).await
}

const WARM_CALLS: usize = 1_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keeps a private server alive until the end of main.
    let backend = example_backend().await?;
    let cache = backend.cache.clone();
    cache.install();
    println!("backend: {}", backend.description);
    // A run a moment ago (on `REDIS_URL`) left the entry: start cold.
    let _ = cache.invalidate(&get_user_cache_key(&42)).await;

    let start = Instant::now();
    let user = get_user(42).await?;
    let cold = start.elapsed();
    println!("cold call: {user:?}");

    if backend.url.is_some() {
        show_stored_entry(&cache).await?;
    }

    let mut warm = Vec::with_capacity(WARM_CALLS);
    for _ in 0..WARM_CALLS {
        let start = Instant::now();
        let user = get_user(42).await?;
        warm.push(start.elapsed());
        assert_eq!(user.id, 42);
    }
    warm.sort();
    let percentile = |p: f64| warm[((warm.len() - 1) as f64 * p).round() as usize];

    let stats = cache.stats();
    println!();
    println!("| measurement            | value      |");
    println!("|------------------------|------------|");
    println!("| cold call (miss)       | {:>7.2} ms |", ms(cold));
    println!(
        "| warm p50 ({WARM_CALLS} hits)   | {:>7.3} ms |",
        ms(percentile(0.50))
    );
    println!(
        "| warm p99               | {:>7.3} ms |",
        ms(percentile(0.99))
    );
    println!(
        "| speed-up at p50        | {:>8.0}x  |",
        ms(cold) / ms(percentile(0.50))
    );
    println!(
        "| hit ratio              | {:>9.1}% |",
        stats.hit_ratio() * 100.0
    );
    let counts = format!(
        "{} / {} / {}",
        stats.total.hits, stats.total.misses, stats.total.errors
    );
    println!("| hits / misses / errors | {counts:>10} |");
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `redis-cli get user:42` and `redis-cli ttl user:42` would show,
/// read with the cache's own connection (`Cache::command`).
async fn show_stored_entry(cache: &Cache) -> Result<(), Box<dyn std::error::Error>> {
    let key = get_user_cache_key(&42).into_string();
    let value: String = cache.command(redis::cmd("GET").arg(&key)).await?;
    let ttl: i64 = cache.command(redis::cmd("TTL").arg(&key)).await?;
    println!("redis-cli get {key}  ->  {value}");
    println!("redis-cli ttl {key}  ->  {ttl}");
    Ok(())
}
