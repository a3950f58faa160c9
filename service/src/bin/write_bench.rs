//! Three ways a rename reaches the database, measured on the service's
//! SQLite (`sqlx`, every query `SERVICE_DB_LATENCY_MS` away, 1 ms by
//! default, as the service's load) and a private `redis-server`:
//!
//! - **direct**: the `UPDATE`, no cache;
//! - **write-through**: the `UPDATE`, then `#[cache_put]` stores the row;
//! - **write-behind**: `#[write_behind]` stores the row and queues the
//!   change in Redis; a flusher writes batches (one transaction each);
//! - **write-behind, 1 replica**: the same on a primary with a replica,
//!   each write waiting for it (`WAIT`, the default durability);
//! - **write-behind, `appendfsync always`**: the same on a server that
//!   writes every command to its AOF and fsyncs it before it answers
//!   (no acknowledged change lost to a restart).
//!
//! Rounds interleave the arms: per arm, p50/p99 of a write by one caller
//! (c=1) and writes per second of 16 callers (c=16); then, per
//! write-behind arm, how many changes the flusher wrote per transaction
//! (the database writes saved by batching), how long the queue took to
//! drain, and a check that every row holds its last write.
//!
//! ```text
//! cargo run --release -p cache-service --bin write_bench
//! WRITE_BENCH_WRITES=500 SERVICE_DB_LATENCY_MS=0 cargo run --release -p cache-service --bin write_bench
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::{RedisServer, redis_server_available};
use cache_runtime::{Cache, Change};
use cache_service::behind::{self, USERS, WriteBehind, WriteThrough};
use cache_service::db::{Db, User};

type Error = Box<dyn std::error::Error + Send + Sync>;

const USERS_IN_DB: i64 = 1_000;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Arm {
    Direct,
    Through,
    Behind,
    BehindReplicated,
    BehindFsync,
}

impl Arm {
    const ALL: [Arm; 5] = [
        Arm::Direct,
        Arm::Through,
        Arm::Behind,
        Arm::BehindReplicated,
        Arm::BehindFsync,
    ];

    fn name(self) -> &'static str {
        match self {
            Arm::Direct => "direct UPDATE",
            Arm::Through => "write-through (#[cache_put])",
            Arm::Behind => "write-behind",
            Arm::BehindReplicated => "write-behind, 1 replica (WAIT)",
            Arm::BehindFsync => "write-behind, appendfsync always",
        }
    }
}

struct Bench {
    db: Arc<Db>,
    through: WriteThrough,
    behind: WriteBehind,
    replicated: WriteBehind,
    fsynced: WriteBehind,
    version: AtomicI64,
    /// Each row's last write, for the check at the end.
    last: std::sync::Mutex<HashMap<i64, i64>>,
}

impl Bench {
    async fn write(&self, arm: Arm, id: i64) -> Result<(), Error> {
        let version = self.version.fetch_add(1, Ordering::Relaxed);
        let user = User {
            id,
            name: format!("name {version}"),
            email: format!("user{id}@example.com"),
            version,
        };
        match arm {
            Arm::Direct => {
                behind::update(&self.db, id, &user).await?;
            }
            Arm::Through => {
                self.through.save(id, user).await?;
            }
            Arm::Behind => {
                self.behind.save(id, user).await?;
            }
            Arm::BehindReplicated => {
                self.replicated.save(id, user).await?;
            }
            Arm::BehindFsync => {
                self.fsynced.save(id, user).await?;
            }
        }
        let mut last = self.last.lock().unwrap();
        let seen = last.entry(id).or_default();
        *seen = (*seen).max(version);
        Ok(())
    }

    /// `n` writes by one caller: their latencies (µs).
    async fn latencies(&self, arm: Arm, n: u64) -> Result<Vec<f64>, Error> {
        let mut samples = Vec::with_capacity(n as usize);
        for i in 0..n {
            let id = 1 + (i as i64 * 7919) % USERS_IN_DB;
            let started = Instant::now();
            self.write(arm, id).await?;
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        Ok(samples)
    }

    /// `n` writes by 16 callers: writes per second.
    async fn throughput(self: &Arc<Self>, arm: Arm, n: u64) -> Result<f64, Error> {
        let started = Instant::now();
        let tasks: Vec<_> = (0..16u64)
            .map(|task| {
                let bench = Arc::clone(self);
                tokio::spawn(async move {
                    for i in 0..n / 16 {
                        let id = 1 + ((task * 1_000_003 + i * 7919) as i64) % USERS_IN_DB;
                        bench.write(arm, id).await?;
                    }
                    Ok::<_, Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        Ok((n / 16 * 16) as f64 / started.elapsed().as_secs_f64())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

async fn cache_on(url: &str, prefix: &str) -> Result<Cache, Error> {
    Ok(Cache::builder().url(url).prefix(prefix).build().await?)
}

fn flusher(cache: &Cache, db: &Arc<Db>) -> Result<cache_runtime::Flusher, Error> {
    let db = Arc::clone(db);
    Ok(cache
        .flusher(&USERS, move |changes: Vec<Change<User>>| {
            let db = Arc::clone(&db);
            async move { behind::flush(&db, &changes).await }
        })
        .batch(500)
        .poll(Duration::from_millis(10))
        .spawn()?)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    if !redis_server_available() {
        return Err(cache_harness::install_hint().into());
    }
    let writes = env_number("WRITE_BENCH_WRITES", 2_000);
    let latency = Duration::from_millis(env_number("SERVICE_DB_LATENCY_MS", 1));
    let path = std::env::temp_dir().join(format!("write-bench-{}.db", std::process::id()));
    let db = Arc::new(Db::create(&path, USERS_IN_DB, latency).await?);
    let primary = RedisServer::start();
    let replicated_primary = RedisServer::start();
    let port = replicated_primary.port().to_string();
    let _replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let fsync_server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cache = cache_on(&primary.url(), "bench").await?;
    let fsynced = cache_on(&fsync_server.url(), "bench").await?;
    let replicated = cache_on(&replicated_primary.url(), "bench").await?;
    // The replica attached and in sync before anything is measured.
    let mut synced = false;
    for _ in 0..100 {
        let role: cache_runtime::redis::Value = replicated
            .command(&cache_runtime::redis::cmd("ROLE"))
            .await?;
        if let cache_runtime::redis::Value::Array(parts) = role
            && matches!(parts.get(2), Some(cache_runtime::redis::Value::Array(r)) if !r.is_empty())
        {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !synced {
        return Err("the replica did not attach in 10 s".into());
    }
    let bench = Arc::new(Bench {
        db: Arc::clone(&db),
        through: WriteThrough {
            db: Arc::clone(&db),
            cache: cache.clone(),
        },
        behind: WriteBehind {
            cache: cache.clone(),
        },
        replicated: WriteBehind {
            cache: replicated.clone(),
        },
        fsynced: WriteBehind {
            cache: fsynced.clone(),
        },
        version: AtomicI64::new(2),
        last: std::sync::Mutex::new(HashMap::new()),
    });
    let flushers = [
        flusher(&cache, &db)?,
        flusher(&replicated, &db)?,
        flusher(&fsynced, &db)?,
    ];
    println!(
        "{writes} writes per arm and round, 3 rounds, arms interleaved; SQLite {} ms away; {} users",
        latency.as_millis(),
        USERS_IN_DB
    );
    let mut samples: HashMap<Arm, Vec<f64>> = HashMap::new();
    let mut rates: HashMap<Arm, Vec<f64>> = HashMap::new();
    let queries_before = db.queries();
    for round in 0..3 {
        for arm in Arm::ALL {
            let mut s = bench.latencies(arm, writes / 4).await?;
            samples.entry(arm).or_default().append(&mut s);
            let rate = bench.throughput(arm, writes).await?;
            rates.entry(arm).or_default().push(rate);
        }
        println!("round {} done", round + 1);
    }
    let drain_started = Instant::now();
    for cache in [&cache, &replicated, &fsynced] {
        loop {
            let status = cache.write_queue_status(&USERS).await?;
            if status.pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let drained = drain_started.elapsed();
    for flusher in flushers {
        flusher.stop().await;
    }
    let queries = db.queries() - queries_before;
    let direct_p50 = {
        let mut s = samples[&Arm::Direct].clone();
        s.sort_by(f64::total_cmp);
        percentile(&s, 0.5)
    };
    let direct_rate = rates[&Arm::Direct].iter().sum::<f64>() / 3.0;
    println!();
    println!(
        "| arm | p50 c=1 (µs) | p99 c=1 (µs) | writes/s c=16 (range of 3) | p50 vs direct | writes/s vs direct |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for arm in Arm::ALL {
        let mut s = samples[&arm].clone();
        s.sort_by(f64::total_cmp);
        let r = &rates[&arm];
        let (lo, hi) = (
            r.iter().copied().fold(f64::MAX, f64::min),
            r.iter().copied().fold(0.0, f64::max),
        );
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        println!(
            "| {} | {:.0} | {:.0} | {:.0} ({:.0}–{:.0}) | {:.2}× | {:.2}× |",
            arm.name(),
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            mean,
            lo,
            hi,
            percentile(&s, 0.5) / direct_p50,
            mean / direct_rate
        );
    }
    println!();
    for (name, cache) in [
        ("write-behind", &cache),
        ("write-behind, 1 replica", &replicated),
        ("write-behind, appendfsync always", &fsynced),
    ] {
        let stats = cache
            .stats()
            .write_behind
            .get("users")
            .copied()
            .unwrap_or_default();
        println!(
            "{name}: {} changes queued, flushed in {} transactions ({:.1} changes each: {:.0} % of the database writes saved), {} retries, {} dead letters",
            stats.queued,
            stats.batches,
            stats.flushed as f64 / stats.batches.max(1) as f64,
            100.0 * (1.0 - stats.batches as f64 / stats.flushed.max(1) as f64),
            stats.retries,
            stats.dead_letters
        );
    }
    println!(
        "queues drained {:.0} ms after the last write; SQL statements in all: {queries}",
        drained.as_secs_f64() * 1e3
    );
    // Every row holds its last write (the version guard keeps the newest).
    let last = bench.last.lock().unwrap().clone();
    let mut wrong = 0;
    for (id, version) in &last {
        let row = behind::row(&db, *id).await?;
        if row.map(|r| r.version) != Some(*version) {
            wrong += 1;
        }
    }
    println!(
        "rows checked: {}, not holding their last write: {wrong}",
        last.len()
    );
    db.remove().await;
    if wrong > 0 {
        return Err(format!("{wrong} rows lost their last write").into());
    }
    Ok(())
}
