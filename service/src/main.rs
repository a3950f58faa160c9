//! A real service, cached by attributes alone: an axum HTTP API over a
//! SQLite database (sqlx), with the data access in a `UserRepo` trait. The
//! repository exists twice: `plain.rs` as written before caching, and
//! `cached.rs`, the same code with `#[cached_impl]`, `#[redis_cached]` and
//! `#[invalidates]` added. Both are served side by side, and a load
//! generator (real HTTP over loopback) drives them in turns with the same
//! mix, then prints, cache off vs on: requests/s, latency, SQL queries/s,
//! hit ratio, and the stale reads found by checking every read against the
//! versions the renames wrote (must be 0).
//!
//! Redis: `REDIS_URL` if set; otherwise a private `redis-server` on a free
//! port if one is installed; otherwise the in-process cache.
//!
//! ```text
//! cargo run --release -p cache-service
//! SERVICE_SECONDS=10 SERVICE_DB_LATENCY_MS=0 cargo run --release -p cache-service
//! ```
//!
//! `SERVICE_SECONDS` (default 4) is each arm's time per round, in 2 rounds;
//! `SERVICE_CONCURRENCY` (default 32) the concurrent clients;
//! `SERVICE_DB_LATENCY_MS` (default 1) the simulated network distance to the
//! database, added to every SQL query (0: SQLite as it is, in process).
//!
//! With `--features metrics`, the service serves `GET /metrics` (the
//! cache's counters in Prometheus's text format) and the run ends with an
//! excerpt of it; a function whose hit ratio stays below 70 % is warned
//! about in either case.

use std::sync::Arc;
use std::time::Duration;

use cache_examples::example_backend;

use cache_service::db::Db;
use cache_service::load::{Arm, CacheAt, Config, Error};
use cache_service::{cached, http, load, observe, plain};

fn env_number(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("{name}: expected a whole number, got {value:?}").into()),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let seconds = env_number("SERVICE_SECONDS", 4)?;
    let concurrency = env_number("SERVICE_CONCURRENCY", 32)?;
    let latency = Duration::from_millis(env_number("SERVICE_DB_LATENCY_MS", 1)?);
    let config = Config {
        users: 10_000,
        missing: 1_000,
        concurrency: usize::try_from(concurrency)?.max(1),
        round: Duration::from_secs(seconds.max(1)),
        requests_per_round: 1_000_000,
        rounds: 2,
    };

    // Before the first cached call, so that every counter reaches it.
    let exporting = observe::prometheus().is_some();
    let (stop_watching, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(observe::watch_hit_ratios(Duration::from_secs(1), stopped));
    let backend = example_backend().await?;
    let cache_at = match &backend.url {
        Some(url) => CacheAt::Redis(url.clone()),
        None => CacheAt::Memory,
    };
    let path =
        std::env::temp_dir().join(format!("cache-service-example-{}.db", std::process::id()));
    let db = Arc::new(Db::create(&path, config.users, latency).await?);
    println!("cache: {}", backend.description);
    println!(
        "database: SQLite file {} ({} users), {} ms simulated network latency per query",
        path.display(),
        config.users,
        latency.as_millis()
    );
    println!(
        "load: {} clients, 2 rounds of {} s per arm; 75 % reads, 5 % reads of missing ids, 10 % batches of 20, 10 % renames; Zipf ids\n",
        config.concurrency, seconds
    );

    let (off, off_server) = http::serve(Arc::new(plain::SqliteUserRepo {
        db: Arc::clone(&db),
    }))
    .await?;
    let (on, on_server) = http::serve(Arc::new(cached::SqliteUserRepo {
        db: Arc::clone(&db),
    }))
    .await?;
    let arms = [
        Arm {
            name: "cache off",
            address: off,
            cached: false,
        },
        Arm {
            name: "cache on",
            address: on,
            cached: true,
        },
    ];
    let reports = load::run(&config, &arms, &cache_at, &db).await?;
    let scraped = reqwest::get(format!("http://{on}/metrics"))
        .await?
        .text()
        .await?;
    let _ = stop_watching.send(true);
    let warnings = watcher.await?;
    off_server.abort();
    on_server.abort();
    print!("{}", load::table(&reports));

    if exporting {
        println!("\nGET /metrics of the cached service (the cache's lines, excerpt):");
        for line in scraped
            .lines()
            .filter(|l| {
                l.starts_with("cache_calls_total")
                    || l.starts_with("cache_call_duration_seconds_count")
                    || (l.starts_with("cache_operation_duration_seconds")
                        && (l.contains("quantile=\"0.5\"") || l.contains("quantile=\"0.99\"")))
            })
            .take(24)
        {
            println!("  {line}");
        }
    }
    match warnings.len() {
        0 => println!(
            "\nno cached function stayed below a {:.0} % hit ratio",
            observe::LOW_HIT_RATIO * 100.0
        ),
        _ => {
            for warning in &warnings {
                println!("warning: {warning}");
            }
        }
    }

    let stale: usize = reports.iter().map(|r| r.stale_reads).sum();
    let wrong: u64 = reports.iter().map(|r| r.wrong_answers).sum();
    let at_rest = reports.last().and_then(|r| r.stale_at_rest).unwrap_or(0);
    println!(
        "\nafter the run, every user read through the cached service against the database: {at_rest} stale"
    );
    db.remove().await;
    if stale + at_rest > 0 || wrong > 0 {
        return Err(
            format!("{stale} stale reads, {at_rest} stale at rest, {wrong} wrong answers").into(),
        );
    }
    Ok(())
}
