//! Batch lookups, measured: 100 ids of which 90 are cached, four ways.
//!
//! 1. `#[redis_cached(key = "user:<ids>", batch)]`: one call;
//! 2. 100 calls of the single-key `#[redis_cached(key = "user:<id>")]`, one
//!    after another, as a loop over ids is usually written;
//! 3. the same 100 calls at once (`join_all`);
//! 4. hand-written as the Redis tutorials batch: one `MGET`, one database
//!    query for the misses, one pipeline of `SET EX`.
//!
//! Each timed call gets a fresh block of 100 ids, 90 of them stored
//! beforehand by the same arm (untimed), so every call has exactly 10
//! misses. The "database" answers at once: the latencies are the cache's own
//! cost. Measured per call: Redis commands (`INFO stats` before and after),
//! body (database) calls and the ids they were given, latency on loopback,
//! and latency with 1 ms added each way by a TCP proxy (a Redis across a
//! network). Round trips are what that delay costs, in units of a single
//! `GET`'s cost through the same proxy. The arms take turns in every round
//! (rotating order).
//!
//! ```text
//! cargo run --release -p cache-bench --bin batch_bench
//! BENCH_QUICK=1 cargo run --release -p cache-bench --bin batch_bench
//! ```

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::{Fault, FaultProxy};
use cache_runtime::{Cache, redis_cached};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A row of a few hundred bytes of JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    email: String,
    bio: String,
}

fn row(id: u64) -> User {
    User {
        id,
        name: format!("User Number {id}"),
        email: format!("user{id}@example.com"),
        bio: "Writes Rust services that put Redis in front of a slow database. ".repeat(4),
    }
}

#[derive(Debug)]
struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database error")
    }
}

impl std::error::Error for DbError {}

/// Body calls and the ids they were asked for.
static BODY_CALLS: AtomicU64 = AtomicU64::new(0);
static BODY_IDS: AtomicU64 = AtomicU64::new(0);

/// The database: one query for any number of ids, answered at once.
fn query(ids: &[u64]) -> HashMap<u64, User> {
    BODY_CALLS.fetch_add(1, Ordering::Relaxed);
    BODY_IDS.fetch_add(ids.len() as u64, Ordering::Relaxed);
    ids.iter().map(|&id| (id, row(id))).collect()
}

/// Whether the arms go through the delaying proxy.
static FAR: AtomicBool = AtomicBool::new(false);
static NEAR_CACHE: OnceLock<Cache> = OnceLock::new();
static FAR_CACHE: OnceLock<Cache> = OnceLock::new();

fn cache() -> &'static Cache {
    let cell = if FAR.load(Ordering::Relaxed) {
        &FAR_CACHE
    } else {
        &NEAR_CACHE
    };
    cell.get().expect("set in main")
}

/// Arm 1.
#[redis_cached(key = "user:<ids>", ttl = 600, batch, cache = cache())]
async fn get_users(ids: &[u64]) -> Result<HashMap<u64, User>, DbError> {
    Ok(query(ids))
}

/// Arms 2 and 3: the single-key function that shares arm 1's entries.
#[redis_cached(key = "user:<id>", ttl = 600, cache = cache())]
async fn get_user(id: u64) -> Result<User, DbError> {
    query(&[id]).remove(&id).ok_or(DbError)
}

const ARMS: [&str; 4] = [
    "1. #[redis_cached(batch)], one call",
    "2. 100 single calls, one after another",
    "3. 100 single calls, join_all",
    "4. hand-written MGET + pipeline",
];

struct Bench {
    near: redis::aio::MultiplexedConnection,
    far: redis::aio::MultiplexedConnection,
    /// For `INFO`, never delayed.
    info: redis::aio::MultiplexedConnection,
    next_block: u64,
}

impl Bench {
    fn conn(&self) -> redis::aio::MultiplexedConnection {
        if FAR.load(Ordering::Relaxed) {
            self.far.clone()
        } else {
            self.near.clone()
        }
    }

    /// A fresh block of 100 ids; the 90 not ending in 5 are stored by
    /// `arm`'s own path first.
    async fn prepare(&mut self, arm: usize) -> Result<Vec<u64>, Error> {
        self.next_block += 1;
        let ids: Vec<u64> = (0..100).map(|i| self.next_block * 1_000 + i).collect();
        let cached: Vec<u64> = ids.iter().copied().filter(|id| id % 10 != 5).collect();
        match arm {
            0 => {
                get_users(&cached).await?;
            }
            1 | 2 => {
                for result in join_all(cached.iter().map(|&id| get_user(id))).await {
                    result?;
                }
            }
            _ => {
                let mut pipe = redis::pipe();
                for &id in &cached {
                    pipe.set_ex(
                        format!("hand:user:{id}"),
                        serde_json::to_vec(&row(id))?,
                        600,
                    )
                    .ignore();
                }
                pipe.query_async::<()>(&mut self.conn()).await?;
            }
        }
        Ok(ids)
    }

    /// One timed lookup of the 100 ids by `arm`.
    async fn lookup(&self, arm: usize, ids: &[u64]) -> Result<usize, Error> {
        Ok(match arm {
            0 => get_users(ids).await?.len(),
            1 => {
                let mut found = 0;
                for &id in ids {
                    black_box(get_user(id).await?);
                    found += 1;
                }
                found
            }
            2 => {
                let users = join_all(ids.iter().map(|&id| get_user(id))).await;
                users.into_iter().collect::<Result<Vec<_>, _>>()?.len()
            }
            _ => self.hand_written(ids).await?.len(),
        })
    }

    /// The tutorials' batch: `MGET`, decode, query the misses, pipeline
    /// the sets.
    async fn hand_written(&self, ids: &[u64]) -> Result<HashMap<u64, User>, Error> {
        let mut conn = self.conn();
        let keys: Vec<String> = ids.iter().map(|id| format!("hand:user:{id}")).collect();
        let values: Vec<Option<Vec<u8>>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut users = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (&id, value) in ids.iter().zip(values) {
            match value.and_then(|bytes| serde_json::from_slice::<User>(&bytes).ok()) {
                Some(user) => {
                    users.insert(id, user);
                }
                None => missing.push(id),
            }
        }
        if !missing.is_empty() {
            let found = query(&missing);
            let mut pipe = redis::pipe();
            for (id, user) in &found {
                pipe.set_ex(format!("hand:user:{id}"), serde_json::to_vec(user)?, 600)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            users.extend(found);
        }
        Ok(users)
    }

    async fn commands_processed(&self) -> Result<u64, Error> {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut self.info.clone())
            .await?;
        info.lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| "INFO stats: no total_commands_processed".into())
    }
}

/// Per arm, over all its timed calls.
#[derive(Default)]
struct Figures {
    calls: u64,
    commands: u64,
    body_calls: u64,
    body_ids: u64,
    near: Vec<f64>,
    far: Vec<f64>,
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    // Keeps a private server alive until the end of main.
    let (url, _server) = cache_harness::benchmark_redis()?;
    // redis://[user:password@]host:port[/db]
    let port: u16 = url
        .split_once("://")
        .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, r)| r))
        .and_then(|rest| rest.split('/').next())
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .ok_or("REDIS_URL: expected redis://host:port")?;
    let proxy = FaultProxy::start(port);
    proxy.set(Fault::Latency(Duration::from_millis(1)));

    NEAR_CACHE
        .set(Cache::connect(&url).await?)
        .map_err(|_| "set once")?;
    FAR_CACHE
        .set(Cache::connect(&proxy.url()).await?)
        .map_err(|_| "set once")?;
    let mut bench = Bench {
        near: redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?,
        far: redis::Client::open(proxy.url())?
            .get_multiplexed_async_connection()
            .await?,
        info: redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?,
        next_block: 0,
    };
    let (rounds, far_every) = if quick { (30, 5) } else { (200, 4) };
    println!(
        "Redis at {url}; 100 ids per lookup, 90 cached; {rounds} rounds on loopback, {} through a proxy adding 1 ms each way",
        rounds / far_every
    );

    // What one INFO costs in the count, and one GET through the proxy.
    let info_alone = {
        let before = bench.commands_processed().await?;
        bench.commands_processed().await? - before
    };
    let mut get_near = Vec::new();
    let mut get_far = Vec::new();
    for far in [false, true].into_iter().cycle().take(40) {
        let mut conn = if far {
            bench.far.clone()
        } else {
            bench.near.clone()
        };
        let started = Instant::now();
        let _: Option<Vec<u8>> = redis::cmd("GET")
            .arg("calibration")
            .query_async(&mut conn)
            .await?;
        let took = started.elapsed().as_secs_f64() * 1e6;
        if far {
            get_far.push(took)
        } else {
            get_near.push(took)
        }
    }
    let round_trip = median(&mut get_far) - median(&mut get_near);
    println!(
        "one GET: {:.0} µs on loopback, {:.0} µs through the proxy: a round trip costs {:.0} µs more",
        median(&mut get_near),
        median(&mut get_far),
        round_trip
    );

    // Warm both caches and connections (script loading, the proxy's
    // connections) before measuring.
    for far in [false, true] {
        FAR.store(far, Ordering::Relaxed);
        for arm in 0..ARMS.len() {
            let ids = bench.prepare(arm).await?;
            bench.lookup(arm, &ids).await?;
        }
    }

    let mut figures: Vec<Figures> = ARMS.iter().map(|_| Figures::default()).collect();
    for round in 0..rounds {
        for turn in 0..ARMS.len() {
            let arm = (round + turn) % ARMS.len();
            for far in [false, true] {
                if far && round % far_every != 0 {
                    continue;
                }
                FAR.store(far, Ordering::Relaxed);
                let ids = bench.prepare(arm).await?;
                let (calls, id_count) = (
                    BODY_CALLS.load(Ordering::Relaxed),
                    BODY_IDS.load(Ordering::Relaxed),
                );
                let before = bench.commands_processed().await?;
                let started = Instant::now();
                let found = bench.lookup(arm, &ids).await?;
                let took = started.elapsed().as_secs_f64() * 1e6;
                let after = bench.commands_processed().await?;
                assert_eq!(found, 100, "{}: every id is found", ARMS[arm]);
                let f = &mut figures[arm];
                if far {
                    f.far.push(took);
                } else {
                    f.near.push(took);
                    f.calls += 1;
                    f.commands += after - before - info_alone;
                    f.body_calls += BODY_CALLS.load(Ordering::Relaxed) - calls;
                    f.body_ids += BODY_IDS.load(Ordering::Relaxed) - id_count;
                }
            }
        }
    }
    FAR.store(false, Ordering::Relaxed);

    let batch_near = median(&mut figures[0].near.clone());
    let batch_far = median(&mut figures[0].far.clone());
    println!(
        "\n| arm | Redis commands (with those run by scripts) | round trips | body calls | ids to the body | p50 µs, loopback | vs batch | p50 µs, +1 ms each way | vs batch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, f) in ARMS.iter().zip(&mut figures) {
        let per = |n: u64| n as f64 / f.calls.max(1) as f64;
        let (near, far) = (median(&mut f.near), median(&mut f.far));
        println!(
            "| {name} | {:.0} | {:.1} | {:.0} | {:.0} | {near:.0} | {:.2}x | {far:.0} | {:.2}x |",
            per(f.commands),
            (far - near) / round_trip,
            per(f.body_calls),
            per(f.body_ids),
            near / batch_near,
            far / batch_far,
        );
    }
    println!(
        "\nround trips = (p50 through the proxy - p50 on loopback) / the extra cost of one GET ({round_trip:.0} µs)"
    );
    Ok(())
}
