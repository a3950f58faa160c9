//! Side-by-side benchmark of four ways to put Redis in front of a query, on
//! one `redis-server` and a ~1 KB serde struct:
//!
//! 1. floor: a bare `GET` of the same bytes, no decode;
//! 2. hand-written cache-aside as Redis tutorials write it: `GET` → JSON
//!    decode → on a miss compute, encode, `SET EX`;
//! 3. `#[redis_cached]` (this project), with the defaults (JSON);
//!    3b. the same with `Codec::MessagePack`, the encoding arm 4 uses;
//! 4. the `cached` crate's `#[concurrent_cached]` with `AsyncRedisCache`.
//!
//! Arms 1 and 2 use one multiplexed `redis` connection, as do 3 (through
//! `ConnectionManager`) and 4. Every figure is measured in rounds, the arms
//! taking turns in a rotating order (A B C D, B C D A, ...), so that drift of
//! a shared machine hits all arms alike.
//!
//! ```text
//! cargo run --release -p cache-bench --bin bench            # private redis-server
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release -p cache-bench --bin bench
//! BENCH_QUICK=1 cargo run --release -p cache-bench --bin bench   # fewer rounds
//! BENCH_THROUGHPUT_ONLY=1 cargo run --release -p cache-bench --bin bench   # A/B runs of the hot path
//! BENCH_MISS_ONLY=1 cargo run --release -p cache-bench --bin bench   # A/B runs of the miss path
//! BENCH_THROUGHPUT_ONLY=1 BENCH_UNSHARED=1 cargo run --release -p cache-bench --bin bench   # reads not shared
//! BENCH_LOCAL_ONLY=1 BENCH_HOT_ONLY=1 cargo run --release -p cache-bench --bin bench   # the hot-key workload alone
//! BENCH_TRACING_AB=1 cargo run --release -p cache-bench --bin bench   # what the call spans cost
//! BENCH_CONNECTIONS_AB=1 cargo run --release -p cache-bench --bin bench   # 1, 2 or 4 connections
//! BENCH_MANAGER_AB=1 cargo run --release -p cache-bench --bin bench   # ConnectionManager against MultiplexedConnection
//! BENCH_READ_AB=1 cargo run --release -p cache-bench --bin bench   # GET against the cache's GETRANGE
//! BENCH_CLUSTER_ONLY=1 cargo run --release -p cache-bench --bin bench      # the cluster arms alone
//! BENCH_CLUSTER_ONLY=1 BENCH_THROUGHPUT_ONLY=1 cargo run --release -p cache-bench --bin bench
//! BENCH_CLUSTER_ONLY=1 BENCH_PROFILE_ARM=2 perf record -g target/release/bench
//! BENCH_CLUSTER_ONLY=1 BENCH_NAGLE=1 cargo run --release -p cache-bench --bin bench  # TCP_NODELAY off
//! ```
//!
//! `BENCH_PROFILE_ARM=N` runs arm N (0-based) alone at c=64 for 10 s
//! (`BENCH_PROFILE_C=16` for 16 callers), for a profiler: the standalone
//! arms, the cluster's with `BENCH_CLUSTER_ONLY=1`, the local tier's with
//! `BENCH_LOCAL_ONLY=1`.
//!
//! Prints a table with each arm's ratio to arm 2, and writes the same to
//! `target/bench/bench.csv` and the hit-latency distributions to
//! `target/bench/hit_latency.png` (`BENCH_OUT` to change the directory).
//!
//! Then the same on a local Redis Cluster (3 primaries, 3 replicas, started
//! by the harness; `BENCH_NO_CLUSTER=1` skips it): hand-written cache-aside
//! on the `redis` crate's cluster connection (C1) against `#[redis_cached]`
//! on `Cache::builder().cluster(...)` (C2), and batches of 10 keys in 10
//! slots: one `MGET` that the cluster connection splits by slot (C3)
//! against `#[redis_cached(batch)]` (C4). C1b and C3b are C1 and C3 with
//! the bounds a cache call has (the op timeout around the call, and the
//! cluster connection's per-node response timeout), to show what those
//! cost apart from the cache's own work. It also reads each primary's
//! CPU time per command from `INFO`, for what more hosts would give. Written
//! to `target/bench/bench_cluster.csv`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, invalidates, redis_cached};
use cached::AsyncRedisCache;
use cached::macros::concurrent_cached;

type Error = Box<dyn std::error::Error + Send + Sync>;

// ------------------------------------------------------------------ the data

use cache_bench::{User, row};

#[derive(Debug)]
struct DbError;

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("database error")
    }
}

/// How long the "query" takes, in ms (0 for the miss-latency figure, 50 for
/// the cold-key stampede).
static QUERY_MILLIS: AtomicU64 = AtomicU64::new(0);
/// Queries run, per arm (by index in [`ARMS`]), for the stampede figure.
static QUERIES: [AtomicU64; ARMS.len()] = [const { AtomicU64::new(0) }; ARMS.len()];

async fn query(arm: usize, id: u64) -> Result<User, DbError> {
    QUERIES[arm].fetch_add(1, Ordering::Relaxed);
    let millis = QUERY_MILLIS.load(Ordering::Relaxed);
    if millis > 0 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    Ok(row(id))
}

const TTL_SECS: u64 = 600;

// ------------------------------------------------------------------ the arms

/// Arm 3: this project, with the defaults (JSON, the installed cache).
#[redis_cached(key = "bench:ours:<id>", ttl = 600)]
async fn ours(id: u64) -> Result<User, DbError> {
    query(2, id).await
}

/// Arm 3 for the stampede figure: the same, with `single_flight`.
#[redis_cached(key = "bench:ours:<id>", ttl = 600, single_flight)]
async fn ours_single_flight(id: u64) -> Result<User, DbError> {
    query(2, id).await
}

/// A second cache on the same Redis, storing MessagePack.
static MSGPACK_CACHE: OnceLock<Cache> = OnceLock::new();

fn msgpack_cache() -> &'static Cache {
    MSGPACK_CACHE.get().expect("set in main")
}

/// Arm 3b: this project with `Codec::MessagePack`, the encoding arm 4 uses.
#[redis_cached(key = "bench:ours-mp:<id>", ttl = 600, cache = msgpack_cache())]
async fn ours_msgpack(id: u64) -> Result<User, DbError> {
    query(3, id).await
}

/// Arm 3b for the stampede figure.
#[redis_cached(key = "bench:ours-mp:<id>", ttl = 600, single_flight, cache = msgpack_cache())]
async fn ours_msgpack_single_flight(id: u64) -> Result<User, DbError> {
    query(3, id).await
}

static REDIS_URL: OnceLock<String> = OnceLock::new();

/// Arm 4: the `cached` crate, as its Redis example writes it. It stores
/// MessagePack (`rmp-serde`, fields by position).
#[concurrent_cached(
    map_error = r##"|e| { let _ = e; DbError }"##,
    ty = "AsyncRedisCache<u64, User>",
    create = r##" {
        AsyncRedisCache::builder("bench:cached")
            .ttl(Duration::from_secs(TTL_SECS))
            .connection_string(REDIS_URL.get().expect("set in main"))
            .build()
            .await
            .expect("cached crate: connect to Redis")
    } "##
)]
async fn cached_crate(id: u64) -> Result<User, DbError> {
    query(4, id).await
}

/// Whether every arm's connection sets `TCP_NODELAY`: the cache's default,
/// unless `BENCH_NAGLE=1` turns it off in all of them (the `redis` crate's
/// default). On loopback Nagle's algorithm coalesces the writes of
/// concurrent calls, which raises throughput here and costs a round trip
/// across a network; the arms share one setting so that the comparison is
/// of the cache layer. (The `cached` crate's arm opens its own connection
/// with the crate's default.)
fn nodelay() -> bool {
    std::env::var_os("BENCH_NAGLE").is_none()
}

/// Whether arms 3 and 3b share concurrent reads of a key (the default),
/// unless `BENCH_UNSHARED=1` turns it off: for A/B runs of one binary.
fn share_reads() -> bool {
    std::env::var_os("BENCH_UNSHARED").is_none()
}

/// A hand-written arm's connection, with [`nodelay`]'s setting.
async fn hand_connection(url: &str) -> Result<redis::aio::MultiplexedConnection, Error> {
    use redis::IntoConnectionInfo;
    let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(nodelay());
    let info = url.into_connection_info()?.set_tcp_settings(tcp);
    Ok(redis::Client::open(info)?
        .get_multiplexed_async_connection()
        .await?)
}

/// The four arms, and the connection arms 1 and 2 share.
#[derive(Clone)]
struct Arms {
    conn: redis::aio::MultiplexedConnection,
}

const ARMS: [&str; 5] = [
    "1. floor (GET)",
    "2. hand-written",
    "3. #[redis_cached]",
    "3b. #[redis_cached], MessagePack",
    "4. cached crate",
];

/// A set of arms measured side by side.
trait ArmSet: Clone + Send + Sync + 'static {
    /// The arms' names, in order.
    fn names(&self) -> &'static [&'static str];
    /// The arm that `arm`'s ratio is to (its hand-written counterpart).
    fn reference(&self, arm: usize) -> usize;
    /// One call of `arm` (0-based) for `id`.
    fn call(
        &self,
        arm: usize,
        id: u64,
        stampede: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

impl ArmSet for Arms {
    fn names(&self) -> &'static [&'static str] {
        &ARMS
    }

    fn reference(&self, _arm: usize) -> usize {
        1
    }

    fn call(
        &self,
        arm: usize,
        id: u64,
        stampede: bool,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        self.call_arm(arm, id, stampede)
    }
}

impl Arms {
    /// One call of `arm` (0-based) for `id`. `stampede` picks the
    /// `single_flight` variant of arm 3.
    async fn call_arm(&self, arm: usize, id: u64, stampede: bool) -> Result<(), Error> {
        match arm {
            0 => {
                let bytes: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("bench:raw:{id}"))
                    .query_async(&mut self.conn.clone())
                    .await?;
                black_box(bytes);
            }
            1 => {
                black_box(self.hand_written(id).await?);
            }
            2 if stampede => {
                black_box(ours_single_flight(id).await?);
            }
            2 => {
                black_box(ours(id).await?);
            }
            3 if stampede => {
                black_box(ours_msgpack_single_flight(id).await?);
            }
            3 => {
                black_box(ours_msgpack(id).await?);
            }
            _ => {
                black_box(cached_crate(id).await?);
            }
        }
        Ok(())
    }

    /// Cache-aside as the tutorials write it.
    async fn hand_written(&self, id: u64) -> Result<User, Error> {
        hand_written(&mut self.conn.clone(), id).await
    }

    /// The bare `GET` arm reads what the hand-written arm stores.
    async fn seed_floor(&self, ids: std::ops::Range<u64>) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        for id in ids {
            let bytes = serde_json::to_vec(&row(id))?;
            redis::cmd("SET")
                .arg(format!("bench:raw:{id}"))
                .arg(bytes)
                .arg("EX")
                .arg(TTL_SECS)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        e.to_string().into()
    }
}

/// Cache-aside as the tutorials write it, on any connection (standalone
/// or cluster): `GET`, decode; on a miss compute, encode, `SET EX`.
async fn hand_written(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    id: u64,
) -> Result<User, Error> {
    hand_written_at(conn, &format!("bench:hand:{id}"), id).await
}

/// [`hand_written`] under `key`.
async fn hand_written_at(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    key: &str,
    id: u64,
) -> Result<User, Error> {
    let cached: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(conn).await?;
    if let Some(bytes) = cached
        && let Ok(user) = serde_json::from_slice(&bytes)
    {
        return Ok(user);
    }
    let user = query(1, id).await?;
    let bytes = serde_json::to_vec(&user)?;
    redis::cmd("SET")
        .arg(key)
        .arg(bytes)
        .arg("EX")
        .arg(TTL_SECS)
        .query_async::<()>(conn)
        .await?;
    Ok(user)
}

// ----------------------------------------------------------------- measuring

/// The `n` arms in the order of round `round`: A B C D, B C D A, ...
fn rotation(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (round + i) % n)
}

/// How many warm keys the hit figures cycle through.
const WARM_KEYS: u64 = 100;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// Sequential hits: one call at a time, from the main task (`block_on`), so
/// that every call includes the same one wake-up across threads for every
/// arm (a spawned task lands on the I/O thread or not by chance, which makes
/// the distribution bimodal). Latencies in µs, sorted, per arm.
async fn hit_latency<A: ArmSet>(
    arms: &A,
    rounds: usize,
    per_turn: usize,
) -> Result<Vec<Vec<f64>>, Error> {
    let n = arms.names().len();
    let mut samples = vec![Vec::with_capacity(rounds * per_turn); n];
    for round in 0..rounds {
        for arm in rotation(round, n) {
            for i in 0..per_turn {
                let id = i as u64 % WARM_KEYS;
                let started = Instant::now();
                arms.call(arm, id, false).await?;
                samples[arm].push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    for s in &mut samples {
        s.sort_by(f64::total_cmp);
    }
    Ok(samples)
}

/// Hits from `concurrency` tasks for `turn` per arm and round. Per arm, the
/// median over rounds of calls per second, and the median of the per-round
/// ratios to its reference arm (each ratio compares turns a moment apart,
/// so drift of the machine cancels out of it).
async fn hit_throughput<A: ArmSet>(
    arms: &A,
    concurrency: usize,
    rounds: usize,
    turn: Duration,
) -> Result<(Vec<f64>, Vec<f64>), Error> {
    let n = arms.names().len();
    let mut rates = vec![Vec::new(); n];
    let mut ratios = vec![Vec::new(); n];
    for round in 0..rounds {
        let per_second = hit_throughput_round(arms, concurrency, round, turn).await?;
        for arm in 0..n {
            rates[arm].push(per_second[arm]);
            ratios[arm].push(per_second[arm] / per_second[arms.reference(arm)]);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    Ok((
        rates.into_iter().map(median).collect(),
        ratios.into_iter().map(median).collect(),
    ))
}

/// One round of [`hit_throughput`]: each arm in turn, calls per second.
async fn hit_throughput_round<A: ArmSet>(
    arms: &A,
    concurrency: usize,
    round: usize,
    turn: Duration,
) -> Result<Vec<f64>, Error> {
    let n = arms.names().len();
    let mut per_second = vec![0.0; n];
    for arm in rotation(round, n) {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..concurrency {
            let arms = arms.clone();
            tasks.spawn(async move {
                let mut n = 0u64;
                let mut id = task as u64;
                while started.elapsed() < turn {
                    arms.call(arm, id % WARM_KEYS, false).await?;
                    id += 1;
                    n += 1;
                }
                Ok::<u64, Error>(n)
            });
        }
        let mut calls = 0;
        while let Some(done) = tasks.join_next().await {
            calls += done??;
        }
        per_second[arm] = calls as f64 / started.elapsed().as_secs_f64();
    }
    Ok(per_second)
}

/// `BENCH_PROFILE_ARM=N`: arm N alone at c=64 (`BENCH_PROFILE_C` to
/// change it) for 10 s, for `perf record` of one arm's hot path; `None`
/// when unset.
async fn profile_arm<A: ArmSet>(arms: &A) -> Result<Option<()>, Error> {
    let Some(arm) = std::env::var("BENCH_PROFILE_ARM")
        .ok()
        .and_then(|a| a.parse::<usize>().ok())
    else {
        return Ok(None);
    };
    let callers: u64 = std::env::var("BENCH_PROFILE_C")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..callers {
        let arms = arms.clone();
        tasks.spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < Duration::from_secs(10) {
                arms.call(arm, (task + n) % WARM_KEYS, false).await?;
                n += 1;
            }
            Ok::<u64, Error>(n)
        });
    }
    let mut calls = 0;
    while let Some(done) = tasks.join_next().await {
        calls += done??;
    }
    let rate = calls as f64 / started.elapsed().as_secs_f64();
    println!(
        "{}: {rate:.0} calls/s alone at c={callers}",
        arms.names()[arm]
    );
    Ok(Some(()))
}

/// Misses with an instant query: each call on a key never seen, from the
/// main task. Latencies in µs, sorted, per arm (the floor arm reads a
/// missing key).
async fn miss_latency(arms: &Arms, rounds: usize, per_turn: usize) -> Result<Vec<Vec<f64>>, Error> {
    QUERY_MILLIS.store(0, Ordering::Relaxed);
    let mut samples = vec![Vec::new(); ARMS.len()];
    let mut next_id = 1_000_000u64;
    for round in 0..rounds {
        for arm in rotation(round, ARMS.len()) {
            for _ in 0..per_turn {
                next_id += 1;
                let started = Instant::now();
                arms.call(arm, next_id, false).await?;
                samples[arm].push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    for s in &mut samples {
        s.sort_by(f64::total_cmp);
    }
    Ok(samples)
}

/// 1,000 concurrent callers of one cold key, 50 ms query: how many queries
/// ran, and the slowest caller's wait, per arm (2, 3, 4).
async fn stampede(arms: &Arms, callers: usize) -> Result<Vec<(u64, f64)>, Error> {
    QUERY_MILLIS.store(50, Ordering::Relaxed);
    let mut results = vec![(0, 0.0); ARMS.len()];
    for (n, arm) in (1..ARMS.len()).enumerate() {
        let id = 9_000_000 + n as u64;
        let before = QUERIES[arm].load(Ordering::Relaxed);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let arms = arms.clone();
            tasks.spawn(async move { arms.call(arm, id, true).await });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let runs = QUERIES[arm].load(Ordering::Relaxed) - before;
        results[arm] = (runs, started.elapsed().as_secs_f64() * 1e3);
    }
    QUERY_MILLIS.store(0, Ordering::Relaxed);
    Ok(results)
}

// ------------------------------------------------------------------- output

/// `BENCH_TRACING_AB=1`: what the call spans cost. Hits of arm 3 (c=1,
/// from the main task, so a thread-local default dispatcher covers them)
/// with no subscriber, with one at `info` (the spans are `debug`: off),
/// and with one at `debug` writing to nowhere; interleaved rounds.
async fn tracing_ab(arms: &Arms, rounds: usize) -> Result<(), Error> {
    use tracing::level_filters::LevelFilter;
    let subscriber = |level: LevelFilter| {
        tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_max_level(level)
                .with_writer(std::io::sink)
                .finish(),
        )
    };
    let dispatchers = [
        ("no subscriber", tracing::Dispatch::none()),
        (
            "subscriber at info (spans off)",
            subscriber(LevelFilter::INFO),
        ),
        (
            "subscriber at debug (spans on)",
            subscriber(LevelFilter::DEBUG),
        ),
    ];
    let mut samples = vec![Vec::new(); dispatchers.len()];
    for round in 0..rounds {
        for at in rotation(round, dispatchers.len()) {
            let _default = tracing::dispatcher::set_default(&dispatchers[at].1);
            for i in 0..2_000u64 {
                let started = Instant::now();
                arms.call(2, i % WARM_KEYS, false).await?;
                samples[at].push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let p50: Vec<f64> = samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            percentile(&s, 0.5)
        })
        .collect();
    for (at, (name, _)) in dispatchers.iter().enumerate() {
        println!(
            "hit latency p50 with {name}: {:.1} µs ({:.3}× no subscriber)",
            p50[at],
            p50[at] / p50[0]
        );
    }
    Ok(())
}

/// `BENCH_READ_AB=1`: a hit's Redis command, `GET` against the `GETRANGE
/// key 0 <limit>` the cache sends (so that an entry too large to read is
/// never transferred), on one connection, arms interleaved.
#[derive(Clone)]
struct ReadArms {
    conn: redis::aio::MultiplexedConnection,
}

impl ArmSet for ReadArms {
    fn names(&self) -> &'static [&'static str] {
        &["GET", "GETRANGE key 0 <4 MB>"]
    }

    fn reference(&self, _arm: usize) -> usize {
        0
    }

    async fn call(&self, arm: usize, id: u64, _stampede: bool) -> Result<(), Error> {
        let key = format!("bench:raw:{id}");
        let mut cmd = redis::cmd(if arm == 0 { "GET" } else { "GETRANGE" });
        cmd.arg(key);
        if arm == 1 {
            cmd.arg(0).arg(4_166_922);
        }
        let bytes: Option<Vec<u8>> = cmd.query_async(&mut self.conn.clone()).await?;
        black_box(bytes);
        Ok(())
    }
}

async fn read_ab(arms: &ReadArms, quick: bool) -> Result<(), Error> {
    let hits = hit_latency(arms, if quick { 6 } else { 20 }, 1000).await?;
    for (at, name) in arms.names().iter().enumerate() {
        println!(
            "{name}: hit latency p50 {:.1} µs, p99 {:.1} µs ({:.3}× GET at p50)",
            percentile(&hits[at], 0.5),
            percentile(&hits[at], 0.99),
            percentile(&hits[at], 0.5) / percentile(&hits[0], 0.5)
        );
    }
    for concurrency in [16, 64] {
        let rounds = if quick { 6 } else { 30 };
        let (per_second, ratios) =
            hit_throughput(arms, concurrency, rounds, Duration::from_millis(150)).await?;
        println!(
            "c={concurrency}: GET {:.0}/s, GETRANGE {:.0}/s; median per-round ratio {:.3}×",
            per_second[0], per_second[1], ratios[1]
        );
    }
    Ok(())
}

/// `BENCH_MANAGER_AB=1`: what the `redis` crate's `ConnectionManager`
/// (the cache's standalone connection: reconnects by itself) costs a hit
/// against the bare `MultiplexedConnection` the hand-written arm uses.
/// Hand-written cache-aside on each, arms interleaved.
/// The figures are in `docs/bench/README.md`.
#[derive(Clone)]
struct ManagerArms {
    conn: redis::aio::MultiplexedConnection,
    manager: redis::aio::ConnectionManager,
}

impl ArmSet for ManagerArms {
    fn names(&self) -> &'static [&'static str] {
        &["MultiplexedConnection", "ConnectionManager"]
    }

    fn reference(&self, _arm: usize) -> usize {
        0
    }

    async fn call(&self, arm: usize, id: u64, _stampede: bool) -> Result<(), Error> {
        if arm == 0 {
            black_box(hand_written(&mut self.conn.clone(), id).await?);
        } else {
            black_box(hand_written(&mut self.manager.clone(), id).await?);
        }
        Ok(())
    }
}

async fn manager_ab(arms: &ManagerArms, quick: bool) -> Result<(), Error> {
    for concurrency in [1, 16, 64] {
        let rounds = if quick { 6 } else { 30 };
        let (per_second, ratios) =
            hit_throughput(arms, concurrency, rounds, Duration::from_millis(150)).await?;
        println!(
            "c={concurrency}: MultiplexedConnection {:.0}/s, ConnectionManager {:.0}/s; median per-round ratio {:.3}×",
            per_second[0], per_second[1], ratios[1]
        );
    }
    Ok(())
}

/// `BENCH_CONNECTIONS_AB=1`: hand-written cache-aside over 1, 2 and 4
/// multiplexed connections, a key always on the same one (`id % n`, as a
/// cache must, to keep a key's commands in order), arms interleaved, at
/// 16, 64 and 256 callers: whether more than the one connection the cache
/// opens would serve more hits.
#[derive(Clone)]
struct ConnectionArms {
    pools: [Vec<redis::aio::MultiplexedConnection>; 3],
}

impl ArmSet for ConnectionArms {
    fn names(&self) -> &'static [&'static str] {
        &["1 connection", "2 connections", "4 connections"]
    }

    fn reference(&self, _arm: usize) -> usize {
        0
    }

    async fn call(&self, arm: usize, id: u64, _stampede: bool) -> Result<(), Error> {
        let pool = &self.pools[arm];
        let mut conn = pool[(id % pool.len() as u64) as usize].clone();
        black_box(hand_written(&mut conn, id).await?);
        Ok(())
    }
}

async fn connections_ab(url: &str, quick: bool) -> Result<(), Error> {
    let mut pools = [Vec::new(), Vec::new(), Vec::new()];
    for (pool, n) in pools.iter_mut().zip([1, 2, 4]) {
        for _ in 0..n {
            pool.push(hand_connection(url).await?);
        }
    }
    let arms = ConnectionArms { pools };
    for concurrency in [16, 64, 256] {
        let rounds = if quick { 6 } else { 30 };
        let (per_second, ratios) =
            hit_throughput(&arms, concurrency, rounds, Duration::from_millis(150)).await?;
        println!(
            "c={concurrency}: 1 connection {:.0}/s; 2: {:.0}/s ({:.3}×); 4: {:.0}/s ({:.3}×) (median per-round ratios)",
            per_second[0], per_second[1], ratios[1], per_second[2], ratios[2]
        );
    }
    Ok(())
}

/// One row of the table: a figure per arm (NaN where it does not apply).
struct Row {
    metric: String,
    unit: &'static str,
    values: Vec<f64>,
    /// Ratios to arm 2 measured pairwise, when not `value / arm 2's value`.
    ratios: Option<Vec<f64>>,
    /// Whether larger is better (throughput) for the ratio's reading.
    higher_is_better: bool,
}

impl Row {
    /// The ratio of `arm`'s figure to that of arm `reference`.
    fn ratio(&self, arm: usize, reference: usize) -> f64 {
        match &self.ratios {
            Some(ratios) => ratios[arm],
            None => self.values[arm] / self.values[reference],
        }
    }
}

/// The p50 and p99 rows of sorted hit latencies, per arm.
fn latency_rows(hits: &[Vec<f64>]) -> Vec<Row> {
    [(50, 0.50), (99, 0.99)]
        .into_iter()
        .map(|(name, p)| Row {
            metric: format!("hit latency p{name}, c=1"),
            unit: "µs",
            values: hits.iter().map(|s| percentile(s, p)).collect(),
            ratios: None,
            higher_is_better: false,
        })
        .collect()
}

fn table(rows: &[Row], arms: &impl ArmSet) -> String {
    let names = arms.names();
    let mut out = String::new();
    let _ = writeln!(out, "| figure | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "---:|".repeat(names.len()));
    for row in rows {
        let cells: Vec<String> = row
            .values
            .iter()
            .enumerate()
            .map(|(arm, &v)| {
                if v.is_nan() {
                    "n/a".to_owned()
                } else if row.unit == "runs" {
                    format!("{v:.0}")
                } else {
                    let ratio = row.ratio(arm, arms.reference(arm));
                    format!("{} ({ratio:.2}×)", human(v, row.unit))
                }
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", row.metric, cells.join(" | "));
    }
    out
}

fn human(value: f64, unit: &str) -> String {
    match unit {
        // Local hits take a fraction of a microsecond.
        "µs" if value < 10.0 => format!("{value:.2} µs"),
        "µs" => format!("{value:.1} µs"),
        "ms" => format!("{value:.0} ms"),
        "calls/s" => format!("{:.0}k/s", value / 1e3),
        _ => format!("{value:.2} {unit}"),
    }
}

fn csv(rows: &[Row], arms: &impl ArmSet) -> String {
    let mut out = String::from("figure,unit,arm,value,ratio_to_hand_written,higher_is_better\n");
    for row in rows {
        for (arm, &value) in row.values.iter().enumerate() {
            if value.is_nan() {
                continue;
            }
            let _ = writeln!(
                out,
                "\"{}\",{},\"{}\",{value:.3},{:.4},{}",
                row.metric,
                row.unit,
                arms.names()[arm],
                row.ratio(arm, arms.reference(arm)),
                row.higher_is_better
            );
        }
    }
    out
}

/// The hit-latency distributions (c = 1) as one line per arm: latency
/// against percentile, up to p99.
fn plot(path: &Path, hits: &[Vec<f64>]) -> Result<(), Error> {
    use plotters::prelude::*;

    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| "the embedded DejaVu font did not load")?;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = hits.iter().map(|s| percentile(s, 0.99)).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Hit latency at concurrency 1 (µs), ~1 KB value",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..99.0f64, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .label_style(("sans-serif", 15))
        .draw()?;
    let colors = [
        RGBColor(120, 120, 120),
        BLUE,
        RED,
        RGBColor(230, 120, 0),
        RGBColor(0, 150, 0),
    ];
    for (arm, samples) in hits.iter().enumerate() {
        let color = colors[arm];
        let points = (0..=990).map(|i| {
            let p = f64::from(i) / 10.0;
            (p, percentile(samples, p / 100.0).min(top))
        });
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(ARMS[arm])
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

// --------------------------------------------------------------------- main

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    // Keeps a private server alive until the end of main.
    let (url, _server) = cache_harness::benchmark_redis()?;
    REDIS_URL.set(url.clone()).map_err(|_| "set once")?;
    let out_dir =
        std::env::var_os("BENCH_OUT").map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    std::fs::create_dir_all(&out_dir)?;
    if std::env::var_os("BENCH_CLUSTER_ONLY").is_some() {
        return cluster::run(quick, &out_dir).await;
    }
    if std::env::var_os("BENCH_LOCAL_ONLY").is_some() {
        return local_tier::run(&url, quick, &out_dir).await;
    }

    Cache::builder()
        .url(url.as_str())
        .tcp_nodelay(nodelay())
        .share_reads(share_reads())
        .build()
        .await?
        .install();
    let msgpack = Cache::builder()
        .url(url.as_str())
        .tcp_nodelay(nodelay())
        .share_reads(share_reads())
        .codec(cache_runtime::Codec::MessagePack)
        .build()
        .await?;
    MSGPACK_CACHE.set(msgpack).map_err(|_| "set once")?;
    let arms = Arms {
        conn: hand_connection(&url).await?,
    };
    let value_size = serde_json::to_vec(&row(1))?.len();
    println!(
        "Redis at {url}; value {value_size} bytes of JSON; {} rounds, arms interleaved; \
         TCP_NODELAY {}",
        if quick { "quick" } else { "full" },
        if nodelay() { "on" } else { "off (BENCH_NAGLE)" }
    );

    // Warm every arm's keys (and the connection of arm 4, built lazily).
    arms.seed_floor(0..WARM_KEYS).await?;
    for round in 0..2 {
        for arm in rotation(round, ARMS.len()) {
            for id in 0..WARM_KEYS {
                arms.call(arm, id, false).await?;
            }
        }
    }

    if std::env::var_os("BENCH_TRACING_AB").is_some() {
        return tracing_ab(&arms, if quick { 6 } else { 20 }).await;
    }
    if std::env::var_os("BENCH_CONNECTIONS_AB").is_some() {
        return connections_ab(&url, quick).await;
    }
    if std::env::var_os("BENCH_MANAGER_AB").is_some() {
        use redis::IntoConnectionInfo;
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(nodelay());
        let info = url.as_str().into_connection_info()?.set_tcp_settings(tcp);
        let manager = redis::aio::ConnectionManager::new(redis::Client::open(info)?).await?;
        let arms = ManagerArms {
            conn: arms.conn.clone(),
            manager,
        };
        return manager_ab(&arms, quick).await;
    }
    if std::env::var_os("BENCH_READ_AB").is_some() {
        let reads = ReadArms {
            conn: arms.conn.clone(),
        };
        return read_ab(&reads, quick).await;
    }

    if profile_arm(&arms).await?.is_some() {
        return Ok(());
    }
    if std::env::var_os("BENCH_MISS_ONLY").is_some() {
        // For A/B runs of the miss path.
        let misses = miss_latency(&arms, if quick { 4 } else { 10 }, 200).await?;
        for (arm, name) in arms.names().iter().enumerate().skip(1) {
            let (p50, p99) = (
                percentile(&misses[arm], 0.50),
                percentile(&misses[arm], 0.99),
            );
            let (b50, b99) = (percentile(&misses[1], 0.50), percentile(&misses[1], 0.99));
            println!(
                "{name}: miss p50 {p50:.1} µs ({:.2}×), p99 {p99:.1} µs ({:.2}×)",
                p50 / b50,
                p99 / b99
            );
        }
        return Ok(());
    }
    if std::env::var_os("BENCH_THROUGHPUT_ONLY").is_some() {
        // For profiling and A/B runs of the hot path.
        for concurrency in [1, 16, 64] {
            let (_, ratios) =
                hit_throughput(&arms, concurrency, 30, Duration::from_millis(150)).await?;
            let ratios: Vec<String> = ratios.iter().map(|r| format!("{r:.3}×")).collect();
            println!(
                "c={concurrency}: median per-round ratio to arm 2: {}",
                ratios.join("  ")
            );
        }
        return Ok(());
    }

    let (rounds, per_turn) = if quick { (6, 300) } else { (20, 1000) };
    let hits = hit_latency(&arms, rounds, per_turn).await?;
    println!("hit latency: {} samples per arm", hits[0].len());
    let mut rows = latency_rows(&hits);

    rows.push(Row {
        metric: "hit throughput, c=1 (1 / mean latency)".into(),
        unit: "calls/s",
        values: hits
            .iter()
            .map(|s| 1e6 * s.len() as f64 / s.iter().sum::<f64>())
            .collect(),
        ratios: None,
        higher_is_better: true,
    });
    let turn = Duration::from_millis(150);
    let throughput_rounds = if quick { 6 } else { 30 };
    for concurrency in [16, 64] {
        let (per_second, ratios) =
            hit_throughput(&arms, concurrency, throughput_rounds, turn).await?;
        println!("hit throughput, c={concurrency}: done");
        rows.push(Row {
            metric: format!(
                "hit throughput, c={concurrency} (median of {throughput_rounds} rounds)"
            ),
            unit: "calls/s",
            values: per_second,
            ratios: Some(ratios),
            higher_is_better: true,
        });
    }

    let misses = miss_latency(&arms, if quick { 4 } else { 10 }, 200).await?;
    let mut miss_p50: Vec<f64> = misses.iter().map(|s| percentile(s, 0.50)).collect();
    let mut miss_p99: Vec<f64> = misses.iter().map(|s| percentile(s, 0.99)).collect();
    // The floor has no miss path: a GET of a missing key is not comparable.
    miss_p50[0] = f64::NAN;
    miss_p99[0] = f64::NAN;
    rows.push(Row {
        metric: "miss latency p50, query 0 ms".into(),
        unit: "µs",
        values: miss_p50,
        ratios: None,
        higher_is_better: false,
    });
    rows.push(Row {
        metric: "miss latency p99, query 0 ms".into(),
        unit: "µs",
        values: miss_p99,
        ratios: None,
        higher_is_better: false,
    });

    let callers = 1000;
    let stampede = stampede(&arms, callers).await?;
    let mut runs = vec![f64::NAN; ARMS.len()];
    let mut slowest = vec![f64::NAN; ARMS.len()];
    for arm in 1..ARMS.len() {
        runs[arm] = stampede[arm].0 as f64;
        slowest[arm] = stampede[arm].1;
    }
    rows.push(Row {
        metric: format!(
            "queries for {callers} cold callers, 50 ms query (arms 3, 3b: single_flight)"
        ),
        unit: "runs",
        values: runs,
        ratios: None,
        higher_is_better: false,
    });
    rows.push(Row {
        metric: format!("slowest of the {callers} cold callers"),
        unit: "ms",
        values: slowest,
        ratios: None,
        higher_is_better: false,
    });

    let table = table(&rows, &arms);
    println!("\n{table}");
    println!(
        "Ratios are to arm 2 (hand-written). Latency: lower is better; throughput: higher is better."
    );
    let stats = Cache::installed().map(|c| c.stats().total);
    println!("#[redis_cached] counters (arm 3): {stats:?}");
    println!(
        "#[redis_cached] counters (arm 3b): {:?}",
        msgpack_cache().stats().total
    );

    let csv_path = out_dir.join("bench.csv");
    std::fs::write(&csv_path, csv(&rows, &arms))?;
    let png_path = out_dir.join("hit_latency.png");
    plot(&png_path, &hits)?;
    println!("wrote {} and {}", csv_path.display(), png_path.display());

    local_tier::run(&url, quick, &out_dir).await?;
    if std::env::var_os("BENCH_NO_CLUSTER").is_none() {
        cluster::run(quick, &out_dir).await?;
    }
    Ok(())
}

// --------------------------------------------------------- the local tier

/// The local tier (`local = "..."`) against the hand-written Redis arm and
/// against moka used by hand with the same TTL (the physical floor of an
/// in-process copy: a hash lookup and a clone).
mod local_tier {
    use super::*;

    static LOCAL_CACHE: OnceLock<Cache> = OnceLock::new();

    fn local_cache() -> &'static Cache {
        LOCAL_CACHE.get().expect("set in run")
    }

    /// L3: this project with a local tier.
    #[redis_cached(key = "bench:local:<id>", ttl = 600, local = "60s", cache = local_cache())]
    async fn ours_local(id: u64) -> Result<User, DbError> {
        query(2, id).await
    }

    /// The hot-key workload without a local tier.
    #[redis_cached(key = "bench:zipf:<id>", ttl = 600, single_flight, cache = local_cache())]
    async fn zipf_redis(id: u64) -> Result<User, DbError> {
        query(2, id).await
    }

    /// The hot-key workload with a local tier.
    #[redis_cached(key = "bench:zipf-local:<id>", ttl = 600, local = "60s", single_flight, cache = local_cache())]
    async fn zipf_local(id: u64) -> Result<User, DbError> {
        query(2, id).await
    }

    /// A write of the hot-key workload, without a local tier.
    #[invalidates(zipf_redis(id), cache = local_cache())]
    async fn zipf_write(id: u64) -> Result<(), DbError> {
        black_box(id);
        Ok(())
    }

    static UNSHARED_CACHE: OnceLock<Cache> = OnceLock::new();

    fn unshared_cache() -> &'static Cache {
        UNSHARED_CACHE.get().expect("set in run")
    }

    /// The hot-key workload without a local tier, each call's read sent
    /// at once (`share_reads(false)`).
    #[redis_cached(key = "bench:zipf-unshared:<id>", ttl = 600, single_flight, cache = unshared_cache())]
    async fn zipf_unshared(id: u64) -> Result<User, DbError> {
        query(2, id).await
    }

    /// A write of [`zipf_unshared`]'s workload.
    #[invalidates(zipf_unshared(id), cache = unshared_cache())]
    async fn zipf_write_unshared(id: u64) -> Result<(), DbError> {
        black_box(id);
        Ok(())
    }

    /// A write of the hot-key workload, with a local tier.
    #[invalidates(zipf_local(id), cache = local_cache())]
    async fn zipf_write_local(id: u64) -> Result<(), DbError> {
        black_box(id);
        Ok(())
    }

    /// The hot-key workload's arms.
    pub(super) const HOT_NAMES: [&str; 4] = [
        "hand-written",
        "#[redis_cached]",
        "#[redis_cached(local)]",
        "#[redis_cached], share_reads(false)",
    ];

    /// One call of the hot-key workload's `arm`: a read of `id`, or (`write`)
    /// a write of it, which invalidates the arm's entry.
    async fn hot_call(
        conn: &mut redis::aio::MultiplexedConnection,
        arm: usize,
        id: u64,
        write: bool,
    ) -> Result<(), Error> {
        match (arm, write) {
            (0, true) => {
                redis::cmd("DEL")
                    .arg(format!("bench:hand-zipf:{id}"))
                    .query_async::<()>(conn)
                    .await?;
            }
            (0, false) => {
                black_box(hand_written_at(conn, &format!("bench:hand-zipf:{id}"), id).await?);
            }
            (1, true) => zipf_write(id).await?,
            (1, false) => {
                black_box(zipf_redis(id).await?);
            }
            (2, true) => zipf_write_local(id).await?,
            (2, false) => {
                black_box(zipf_local(id).await?);
            }
            (_, true) => zipf_write_unshared(id).await?,
            (_, false) => {
                black_box(zipf_unshared(id).await?);
            }
        }
        Ok(())
    }

    /// Commands Redis has processed so far.
    async fn commands_processed(
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> Result<u64, Error> {
        let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| "no total_commands_processed in INFO".into())
    }

    /// The hot-key workload: 64 tasks, ids Zipf-distributed (s = 1.1) over
    /// 10 000 keys, 5 % writes; hand-written, ours without and with the
    /// local tier, in turns. Requests per second and Redis commands per
    /// request, per arm.
    pub(super) async fn hot_keys(
        conn: &mut redis::aio::MultiplexedConnection,
        rounds: usize,
        turn: Duration,
    ) -> Result<[(f64, f64); 4], Error> {
        use rand::rngs::SmallRng;
        use rand::{RngExt, SeedableRng};
        use rand_distr::{Distribution, Zipf};
        let zipf = Zipf::new(10_000.0, 1.1)?;
        let mut totals = [(0u64, 0u64, Duration::ZERO); 4];
        for round in 0..rounds {
            for arm in rotation(round, 4) {
                let before = commands_processed(conn).await?;
                let started = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for task in 0..64u64 {
                    let mut conn = conn.clone();
                    tasks.spawn(async move {
                        let mut rng = SmallRng::seed_from_u64(round as u64 * 1000 + task);
                        let mut n = 0u64;
                        while started.elapsed() < turn {
                            let id = zipf.sample(&mut rng) as u64;
                            hot_call(&mut conn, arm, id, rng.random_bool(0.05)).await?;
                            n += 1;
                            // A local hit never yields: let the other
                            // tasks (and the connection) run.
                            if n.is_multiple_of(64) {
                                tokio::task::yield_now().await;
                            }
                        }
                        Ok::<u64, Error>(n)
                    });
                }
                let mut requests = 0;
                while let Some(done) = tasks.join_next().await {
                    requests += done??;
                }
                let elapsed = started.elapsed();
                // The INFO itself is one command.
                let commands = commands_processed(conn).await? - before - 1;
                totals[arm].0 += requests;
                totals[arm].1 += commands;
                totals[arm].2 += elapsed;
            }
        }
        Ok(totals.map(|(requests, commands, elapsed)| {
            (
                requests as f64 / elapsed.as_secs_f64(),
                commands as f64 / requests as f64,
            )
        }))
    }

    pub(super) const NAMES: [&str; 3] = [
        "L1. hand-written (Redis)",
        "L2. moka by hand",
        "L3. #[redis_cached(local)]",
    ];

    #[derive(Clone)]
    pub(super) struct LocalArms {
        conn: redis::aio::MultiplexedConnection,
        moka: moka::sync::Cache<u64, User>,
    }

    impl ArmSet for LocalArms {
        fn names(&self) -> &'static [&'static str] {
            &NAMES
        }

        fn reference(&self, _arm: usize) -> usize {
            0
        }

        fn call(
            &self,
            arm: usize,
            id: u64,
            _stampede: bool,
        ) -> impl Future<Output = Result<(), Error>> + Send {
            self.call_arm(arm, id)
        }
    }

    impl LocalArms {
        async fn call_arm(&self, arm: usize, id: u64) -> Result<(), Error> {
            match arm {
                0 => {
                    black_box(hand_written(&mut self.conn.clone(), id).await?);
                }
                1 => {
                    // As a user writes it: the copy, else Redis, kept.
                    let user = match self.moka.get(&id) {
                        Some(user) => user,
                        None => {
                            let user = hand_written(&mut self.conn.clone(), id).await?;
                            self.moka.insert(id, user.clone());
                            user
                        }
                    };
                    black_box(user);
                }
                _ => {
                    black_box(ours_local(id).await?);
                }
            }
            Ok(())
        }
    }

    /// The local tier's hit latency and throughput against L1 and L2.
    async fn local_hits(arms: &LocalArms, quick: bool, out_dir: &Path) -> Result<(), Error> {
        let (rounds, per_turn) = if quick { (6, 1000) } else { (20, 5000) };
        let hits = hit_latency(arms, rounds, per_turn).await?;
        let mut rows = latency_rows(&hits);
        let throughput_rounds = if quick { 6 } else { 20 };
        let (per_second, ratios) =
            hit_throughput(arms, 64, throughput_rounds, Duration::from_millis(150)).await?;
        rows.push(Row {
            metric: format!("hit throughput, c=64 (median of {throughput_rounds} rounds)"),
            unit: "calls/s",
            values: per_second,
            ratios: Some(ratios),
            higher_is_better: true,
        });
        println!("\nLocal tier, on the same Redis and value:\n");
        println!("{}", table(&rows, arms));
        println!(
            "Ratios are to L1 (hand-written, one Redis GET per hit). L3 against L2 (moka by hand): \
             hit latency p50 {:.2}×, throughput c=64 {:.2}×",
            rows[0].values[2] / rows[0].values[1],
            rows[2].values[2] / rows[2].values[1],
        );
        let counts = local_cache().stats();
        println!(
            "L3 counters: {} local hits, {} Redis hits, {} misses; {} copies, {} bytes",
            counts.total.local_hits,
            counts.total.hits,
            counts.total.misses,
            counts.local.entries,
            counts.local.bytes
        );
        let csv_path = out_dir.join("bench_local.csv");
        std::fs::write(&csv_path, csv(&rows, arms))?;
        println!("wrote {}", csv_path.display());
        Ok(())
    }

    pub(super) async fn run(url: &str, quick: bool, out_dir: &Path) -> Result<(), Error> {
        let cache = Cache::builder()
            .url(url)
            .tcp_nodelay(nodelay())
            .build()
            .await?;
        LOCAL_CACHE.set(cache).map_err(|_| "set once")?;
        let unshared = Cache::builder()
            .url(url)
            .tcp_nodelay(nodelay())
            .share_reads(false)
            .build()
            .await?;
        UNSHARED_CACHE.set(unshared).map_err(|_| "set once")?;
        let arms = LocalArms {
            conn: hand_connection(url).await?,
            moka: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        };
        // Warm: the first read of a key computes it, the next one keeps a
        // copy (once the tracking connection is open).
        let deadline = Instant::now() + Duration::from_secs(5);
        while local_cache().stats().local.entries < WARM_KEYS {
            if Instant::now() > deadline {
                return Err("the local tier kept no copies within 5 s".into());
            }
            for arm in 0..NAMES.len() {
                for id in 0..WARM_KEYS {
                    arms.call(arm, id, false).await?;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if profile_arm(&arms).await?.is_some() {
            return Ok(());
        }
        let hot_only = std::env::var_os("BENCH_HOT_ONLY").is_some();
        if !hot_only {
            local_hits(&arms, quick, out_dir).await?;
        }

        let (rounds, turn) = if quick {
            (2, Duration::from_millis(500))
        } else if hot_only {
            (6, Duration::from_secs(1))
        } else {
            (4, Duration::from_secs(1))
        };
        let figures = hot_keys(&mut arms.conn.clone(), rounds, turn).await?;
        let hand = figures[0].0;
        println!(
            "\nHot keys (Zipf s = 1.1 over 10 000 keys, 5 % writes, c=64, {rounds} interleaved rounds of {turn:?}):\n\
             | arm | requests/s | ratio to hand-written | Redis commands per request |\n|---|---:|---:|---:|"
        );
        for (name, (rate, commands)) in HOT_NAMES.iter().zip(figures) {
            println!(
                "| {name} | {} | {:.2}× | {commands:.2} |",
                human(rate, "calls/s"),
                rate / hand
            );
        }
        let stats = local_cache().stats();
        let unshared = unshared_cache().stats();
        for (name, stats) in [
            ("zipf_redis", &stats),
            ("zipf_local", &stats),
            ("zipf_unshared", &unshared),
        ] {
            let c = stats.function(name).unwrap_or_default();
            println!(
                "{name}: {} local hits, {} Redis hits, {} misses, {} coalesced, {} bypasses",
                c.local_hits, c.hits, c.misses, c.coalesced, c.bypasses
            );
        }
        println!("local tier: {:?}", stats.local);
        Ok(())
    }
}

// ------------------------------------------------------------ the cluster

/// The cluster arms: the same ~1 KB value on a local 3+3 Redis Cluster.
mod cluster {
    use super::*;
    use cache_harness::RedisCluster;
    use redis::cluster_async::ClusterConnection;

    static CLUSTER_CACHE: OnceLock<Cache> = OnceLock::new();

    fn cluster_cache() -> &'static Cache {
        CLUSTER_CACHE.get().expect("set in run")
    }

    /// C2: this project on the cluster.
    #[redis_cached(key = "bench:ours:<id>", ttl = 600, cache = cluster_cache())]
    async fn ours(id: u64) -> Result<User, DbError> {
        query(2, id).await
    }

    /// C4: a batch lookup on the cluster.
    #[redis_cached(key = "bench:ours:<ids>", ttl = 600, batch, cache = cluster_cache())]
    async fn ours_batch(ids: &[u64]) -> Result<HashMap<u64, User>, DbError> {
        let mut users = HashMap::new();
        for &id in ids {
            users.insert(id, query(2, id).await?);
        }
        Ok(users)
    }

    pub(super) const NAMES: [&str; 6] = [
        "C1. hand-written",
        "C1b. hand-written, bounded",
        "C2. #[redis_cached]",
        "C3. hand-written MGET of 10",
        "C3b. hand-written MGET, bounded",
        "C4. #[redis_cached(batch)] of 10",
    ];

    /// The bounds a cache call has, given to the bounded hand-written
    /// arms: the cache's default op timeout around each call, and the
    /// per-node response timeout its cluster connection is built with (so
    /// that a stalled node cannot hold the connection's slot refresh).
    const OP_TIMEOUT: Duration = Duration::from_millis(100);
    const NODE_TIMEOUT: Duration = Duration::from_millis(250);

    /// Calls the bounded arms gave up at [`OP_TIMEOUT`] and answered from
    /// the database instead, as a cache call fails open.
    pub(super) static TIMED_OUT: AtomicU64 = AtomicU64::new(0);

    /// `call` within [`OP_TIMEOUT`]; past it, `fallback` (the query), as a
    /// cache call would run its body. A timed-out call is counted, not an
    /// error: on a loaded 2-core machine the tail of 64 callers passes
    /// 100 ms, and a benchmark that stopped there measured nothing.
    async fn bounded<T, F: Future<Output = Result<T, Error>>>(
        call: impl Future<Output = Result<T, Error>>,
        fallback: impl FnOnce() -> F,
    ) -> Result<T, Error> {
        match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(answer) => answer,
            Err(_) => {
                TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                fallback().await
            }
        }
    }

    /// The database's answer for a batch, for a bounded arm that timed out.
    async fn query_batch(ids: &[u64]) -> Result<HashMap<u64, User>, Error> {
        let mut users = HashMap::with_capacity(ids.len());
        for &id in ids {
            users.insert(id, query(1, id).await?);
        }
        Ok(users)
    }

    /// Keys of one batch: 10 ids 10 apart, so 10 different slots.
    fn batch_ids(id: u64) -> Vec<u64> {
        (0..10).map(|k| (id + k * 10) % WARM_KEYS).collect()
    }

    #[derive(Clone)]
    pub(super) struct ClusterArms {
        conn: ClusterConnection,
        /// With [`NODE_TIMEOUT`], for the bounded arms.
        bounded: ClusterConnection,
    }

    impl ArmSet for ClusterArms {
        fn names(&self) -> &'static [&'static str] {
            &NAMES
        }

        fn reference(&self, arm: usize) -> usize {
            if arm < 3 { 0 } else { 3 }
        }

        fn call(
            &self,
            arm: usize,
            id: u64,
            _stampede: bool,
        ) -> impl Future<Output = Result<(), Error>> + Send {
            let this = self.clone();
            async move {
                match arm {
                    0 => {
                        black_box(hand_written(&mut this.conn.clone(), id).await?);
                    }
                    1 => {
                        let mut conn = this.bounded.clone();
                        let call = hand_written(&mut conn, id);
                        black_box(bounded(call, || async { Ok(query(1, id).await?) }).await?);
                    }
                    2 => {
                        black_box(ours(id).await?);
                    }
                    3 => {
                        let ids = batch_ids(id);
                        black_box(this.hand_written_batch(this.conn.clone(), &ids).await?);
                    }
                    4 => {
                        let ids = batch_ids(id);
                        let call = this.hand_written_batch(this.bounded.clone(), &ids);
                        black_box(bounded(call, || query_batch(&ids)).await?);
                    }
                    _ => {
                        black_box(ours_batch(&batch_ids(id)).await?);
                    }
                }
                Ok(())
            }
        }
    }

    impl ClusterArms {
        /// One `MGET` (split by slot by the cluster connection), then each
        /// miss computed and `SET`.
        async fn hand_written_batch(
            &self,
            mut conn: ClusterConnection,
            ids: &[u64],
        ) -> Result<HashMap<u64, User>, Error> {
            let keys: Vec<String> = ids.iter().map(|id| format!("bench:hand:{id}")).collect();
            let cached: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
            let mut users = HashMap::with_capacity(ids.len());
            for ((&id, key), bytes) in ids.iter().zip(&keys).zip(cached) {
                if let Some(user) = bytes.and_then(|b| serde_json::from_slice(&b).ok()) {
                    users.insert(id, user);
                    continue;
                }
                let user = query(1, id).await?;
                redis::cmd("SET")
                    .arg(key)
                    .arg(serde_json::to_vec(&user)?)
                    .arg("EX")
                    .arg(TTL_SECS)
                    .query_async::<()>(&mut conn)
                    .await?;
                users.insert(id, user);
            }
            Ok(users)
        }
    }

    /// Seconds of CPU and commands processed so far, per primary.
    fn server_work(cluster: &RedisCluster, primaries: &[u16]) -> Vec<(f64, u64)> {
        primaries
            .iter()
            .map(|&port| {
                let field = |section: &str, name: &str| -> f64 {
                    cluster
                        .cli(port, &["INFO", section])
                        .unwrap_or_default()
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}:")))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0.0)
                };
                let cpu = field("cpu", "used_cpu_user") + field("cpu", "used_cpu_sys");
                let commands = field("stats", "total_commands_processed") as u64;
                (cpu, commands)
            })
            .collect()
    }

    pub(super) async fn run(quick: bool, out_dir: &Path) -> Result<(), Error> {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start).await?;
        let seeds = cluster.seeds();
        println!("\nRedis Cluster: 3 primaries, 3 replicas on this machine ({seeds:?})");
        // Every arm on the same TCP settings: see `nodelay`.
        let nodelay = nodelay();
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(nodelay);
        println!(
            "TCP_NODELAY {} in every arm",
            if nodelay { "on" } else { "off (BENCH_NAGLE)" }
        );
        let cache = Cache::builder()
            .cluster(seeds.clone())
            .tcp_nodelay(nodelay)
            .build()
            .await?;
        CLUSTER_CACHE.set(cache).map_err(|_| "set once")?;
        let client = redis::cluster::ClusterClientBuilder::new(seeds.clone())
            .tcp_settings(tcp.clone())
            .build()?;
        let bounded = redis::cluster::ClusterClientBuilder::new(seeds)
            .tcp_settings(tcp)
            .response_timeout(NODE_TIMEOUT)
            .build()?;
        let arms = ClusterArms {
            conn: client.get_async_connection().await?,
            bounded: bounded.get_async_connection().await?,
        };
        for round in 0..2 {
            for arm in rotation(round, NAMES.len()) {
                for id in 0..WARM_KEYS {
                    arms.call(arm, id, false).await?;
                }
            }
        }

        if profile_arm(&arms).await?.is_some() {
            return Ok(());
        }
        if std::env::var_os("BENCH_THROUGHPUT_ONLY").is_some() {
            for concurrency in [16, 64] {
                let (_, ratios) =
                    hit_throughput(&arms, concurrency, 30, Duration::from_millis(150)).await?;
                println!(
                    "c={concurrency}: median per-round ratio to C1: C1b {:.3}×, C2 {:.3}×; \
                     to C3: C3b {:.3}×, C4 {:.3}×",
                    ratios[1], ratios[2], ratios[4], ratios[5]
                );
            }
            return Ok(());
        }
        let (rounds, per_turn) = if quick { (6, 300) } else { (20, 1000) };
        let hits = hit_latency(&arms, rounds, per_turn).await?;
        let mut rows = latency_rows(&hits);
        let primaries = cluster.primaries();
        let turn = Duration::from_millis(150);
        let throughput_rounds = if quick { 6 } else { 30 };
        let mut per_command = Vec::new();
        for concurrency in [16, 64] {
            let before = server_work(&cluster, &primaries);
            let started = Instant::now();
            let (per_second, ratios) =
                hit_throughput(&arms, concurrency, throughput_rounds, turn).await?;
            let elapsed = started.elapsed().as_secs_f64();
            let after = server_work(&cluster, &primaries);
            let (cpu, commands) = before.iter().zip(&after).fold((0.0, 0), |acc, (b, a)| {
                (acc.0 + (a.0 - b.0), acc.1 + (a.1 - b.1))
            });
            per_command.push((concurrency, cpu, commands, elapsed));
            rows.push(Row {
                metric: format!(
                    "hit throughput, c={concurrency} (median of {throughput_rounds} rounds)"
                ),
                unit: "calls/s",
                values: per_second,
                ratios: Some(ratios),
                higher_is_better: true,
            });
        }
        println!("\n{}", table(&rows, &arms));
        println!(
            "Ratios: C1b and C2 to C1, C3b and C4 to C3. A batch call reads 10 keys in 10 slots \
             on the 3 primaries. The bounded arms pay what a cache call's bounds cost: a Tokio \
             timer of {OP_TIMEOUT:?} per call and one of {NODE_TIMEOUT:?} per node request; \
             {} of their calls passed {OP_TIMEOUT:?} and were answered by the query instead.",
            TIMED_OUT.load(Ordering::Relaxed)
        );
        for row in rows
            .iter()
            .filter(|r| r.unit == "calls/s" && r.ratios.is_some())
        {
            println!(
                "{}: C2 to C1b {:.3}×, C4 to C3b {:.3}× (ratios of the medians)",
                row.metric,
                row.values[2] / row.values[1],
                row.values[5] / row.values[4]
            );
        }
        for (concurrency, cpu, commands, elapsed) in per_command {
            let micros = cpu * 1e6 / commands.max(1) as f64;
            println!(
                "c={concurrency}: the 3 primaries processed {commands} commands in {elapsed:.1} s \
                 ({:.0}k/s) using {:.2} s of CPU: {micros:.1} µs of server CPU per command, \
                 the primaries busy {:.0} % of one core together; one core per primary \
                 would serve about {:.0}k commands/s each",
                commands as f64 / elapsed / 1e3,
                cpu,
                cpu / elapsed * 100.0,
                1e3 / micros.max(f64::MIN_POSITIVE),
            );
        }
        println!(
            "#[redis_cached] counters (cluster): {:?}",
            cluster_cache().stats().total
        );
        let csv_path = out_dir.join("bench_cluster.csv");
        std::fs::write(&csv_path, csv(&rows, &arms))?;
        println!("wrote {}", csv_path.display());
        Ok(())
    }
}
