//! Tags, measured against untagged functions on the same Redis:
//!
//! 1. **A hit and a miss**: a function with two tags, and one whose value
//!    names its two tags (`tags_from`), against one without, the 1 KB row
//!    of the other benchmarks, arms interleaved in each round: p50 of a
//!    hit of one caller (c=1), calls per second of 64 (c=64), and p50 of
//!    a miss (the entry invalidated before each call), with the ratios.
//! 2. **Invalidating a tag of N entries**, N = 1,000, 10,000 and 100,000:
//!    the time of `invalidate_tag` (median of 5), which must not grow with
//!    N, and a read afterwards that recomputes.
//! 3. **What the bookkeeping keeps in Redis**: 1,000,000 tagged entries
//!    stored (small values, 10,000 distinct tags), then 10,000 tag
//!    invalidations: tag keys, and the memory they take, before and after.
//!
//! ```text
//! cargo run --release -p cache-bench --bin tags
//! BENCH_QUICK=1 cargo run --release -p cache-bench --bin tags   # 100,000 entries in part 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_bench::{User, row};
use cache_harness::benchmark_redis;
use cache_runtime::{Cache, redis_cached};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct DbError;

#[redis_cached(key = "untagged:<id>", ttl = 3600)]
async fn untagged(id: u64) -> Result<User, DbError> {
    Ok(row(id))
}

#[redis_cached(key = "tagged:<id>", ttl = 3600, tags = ["user:<id>", "users"])]
async fn tagged(id: u64) -> Result<User, DbError> {
    Ok(row(id))
}

#[redis_cached(key = "derived:<id>", ttl = 3600, tags_from = user_tags)]
async fn derived(id: u64) -> Result<User, DbError> {
    Ok(row(id))
}

/// The tags a row names: the same two as `tagged`'s.
fn user_tags(user: &User) -> [String; 2] {
    [format!("user:{}", user.id), "users".to_owned()]
}

/// The arms, in the order of the figures: ours, then the floor of a
/// tagged hit on this client, by hand on one multiplexed connection (the
/// entry's `GET`; the entry's `GET` and its two tags' `MGET`, pipelined).
const ARMS: [&str; 6] = [
    "untagged",
    "two tags",
    "tags_from",
    "GET by hand",
    "GET+MGET by hand",
    "GET tracked, hand",
];
/// The arms of ours (which also have a miss measured).
const OURS: usize = 3;

/// The connection of the arms by hand.
static BARE: std::sync::OnceLock<redis::aio::MultiplexedConnection> = std::sync::OnceLock::new();
/// The last arm's: RESP3 with `CLIENT TRACKING ON OPTIN`, as the cache's
/// tracking connection is, where a tagged hit reads its entry alone,
/// untracked (the floor of that design: no tag work at all).
static TRACKED: std::sync::OnceLock<redis::aio::MultiplexedConnection> = std::sync::OnceLock::new();

static MEMBER_RUNS: AtomicU64 = AtomicU64::new(0);

/// A member of a group: the entries of part 2 and 3.
#[redis_cached(key = "member:<group>:<id>", ttl = 3600, tags = ["group:<group>"])]
async fn member(group: u64, id: u64) -> Result<u64, DbError> {
    MEMBER_RUNS.fetch_add(1, Ordering::Relaxed);
    Ok(group ^ id)
}

const KEYS: u64 = 1_000;
/// Rounds of part 1: each measures every arm's c=1 latency (one call of
/// each arm in turn, 500 times) and c=64 throughput (each arm for
/// [`SPAN`] in turn), in an order that moves by one arm each round. Short
/// turns and many rounds: this machine's speed drifts by tens of percent
/// within seconds (a 1 s turn of one arm ranged 0.6x-1.8x in one run).
const ROUNDS: usize = 20;
const SPAN: Duration = Duration::from_millis(250);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

async fn call(arm: usize, id: u64) {
    let user = match arm {
        0 => untagged(id).await,
        1 => tagged(id).await,
        2 => derived(id).await,
        5 => return tracked_by_hand(id).await,
        _ => return by_hand(arm == 4, id).await,
    };
    std::hint::black_box(user.ok());
}

/// A tagged hit by hand: the entry, and with `tags` its tags' tokens in
/// the same request; the JSON after the header decoded as ours does.
async fn by_hand(tags: bool, id: u64) {
    let mut conn = BARE.get().expect("connected").clone();
    let key = format!("tagbench:tagged:{id}");
    let entry: Vec<u8> = if tags {
        let (entry, tokens): (Vec<u8>, Vec<Option<Vec<u8>>>) = redis::pipe()
            .get(&key)
            .cmd("MGET")
            .arg(format!("tagbench:\0tag:user:{id}"))
            .arg("tagbench:\0tag:users")
            .query_async(&mut conn)
            .await
            .expect("a read");
        std::hint::black_box(tokens);
        entry
    } else {
        redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("a read")
    };
    decode(&entry);
}

/// A tagged hit's entry read by hand on a tracking connection, decoded as
/// ours is.
async fn tracked_by_hand(id: u64) {
    let mut conn = TRACKED.get().expect("connected").clone();
    let key = format!("tagbench:tagged:{id}");
    let entry: Vec<u8> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("a read");
    decode(&entry);
}

/// The JSON after a tagged entry's header, decoded as ours does.
fn decode(entry: &[u8]) {
    let value = entry
        .iter()
        .position(|&b| b == b'\n')
        .map_or(entry, |at| &entry[at + 1..]);
    std::hint::black_box(serde_json::from_slice::<User>(value).ok());
}

/// The key of `arm`'s entry for `id`, under the cache's prefix.
fn key_of(arm: usize, id: u64) -> cache_runtime::CacheKey<User> {
    match arm {
        0 => untagged_cache_key(&id),
        1 => tagged_cache_key(&id),
        _ => derived_cache_key(&id),
    }
}

/// How many hits 64 callers of one arm make in `length`.
async fn hits_of_64(arm: usize, length: Duration) -> u64 {
    hits_of(64, arm, length).await
}

/// How many hits `callers` callers of one arm make in `length`.
async fn hits_of(callers: u64, arm: usize, length: Duration) -> u64 {
    let calls = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + length;
    let tasks: Vec<_> = (0..callers)
        .map(|task| {
            let calls = calls.clone();
            tokio::spawn(async move {
                let mut id = task;
                while Instant::now() < end {
                    call(arm, id % KEYS).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    id += callers;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    calls.load(Ordering::Relaxed)
}

/// Part 1: p50 of a hit at c=1, calls per second at c=64 and p50 of a
/// miss, per arm.
async fn hits(cache: &Cache) {
    for id in 0..KEYS {
        for arm in 0..ARMS.len() {
            call(arm, id).await;
        }
    }
    let mut latencies = [(); ARMS.len()].map(|()| Vec::new());
    let mut throughput = [(); ARMS.len()].map(|()| Vec::new());
    let mut misses = [(); OURS].map(|()| Vec::new());
    for round in 0..ROUNDS {
        for i in 0..500 {
            for turn in 0..ARMS.len() {
                let arm = (round + turn) % ARMS.len();
                let started = Instant::now();
                call(arm, i % KEYS).await;
                latencies[arm].push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        for turn in 0..ARMS.len() {
            let arm = (round + turn) % ARMS.len();
            let calls = hits_of_64(arm, SPAN).await;
            throughput[arm].push(calls as f64 / SPAN.as_secs_f64());
        }
        for turn in 0..OURS {
            let arm = (round + turn) % OURS;
            for i in 0..50 {
                let _ = cache.invalidate(&key_of(arm, i)).await;
                let started = Instant::now();
                call(arm, i).await;
                misses[arm].push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    // Each round's throughput against untagged's in the same round (the
    // turns next to each other in time): their median, and the middle
    // half of the rounds.
    let paired: Vec<Vec<f64>> = (0..ARMS.len())
        .map(|arm| {
            let mut ratios: Vec<f64> = (0..ROUNDS)
                .map(|round| throughput[arm][round] / throughput[0][round])
                .collect();
            ratios.sort_by(f64::total_cmp);
            ratios
        })
        .collect();
    for arm in latencies
        .iter_mut()
        .chain(&mut throughput)
        .chain(&mut misses)
    {
        arm.sort_by(f64::total_cmp);
    }
    println!("1. a 1 KB row, {ROUNDS} rounds, arms interleaved; ratios to untagged:");
    for arm in 0..ARMS.len() {
        let p50 = percentile(&latencies[arm], 0.5);
        let p99 = percentile(&latencies[arm], 0.99);
        let rps = percentile(&throughput[arm], 0.5);
        let ratio = |of: &[Vec<f64>], value: f64| value / percentile(&of[0], 0.5);
        let miss = misses.get(arm).map_or(String::new(), |miss| {
            let miss = percentile(miss, 0.5);
            format!("; miss p50 {miss:.0} µs ({:.2}x)", ratio(&misses, miss))
        });
        println!(
            "   {:<17} hit c=1 p50 {p50:.1} µs ({:.2}x, p99 {p99:.1} µs); c=64 {rps:.0} calls/s ({:.2}x, middle half of rounds {:.2}x-{:.2}x){miss}",
            ARMS[arm],
            ratio(&latencies, p50),
            percentile(&paired[arm], 0.5),
            percentile(&paired[arm], 0.25),
            percentile(&paired[arm], 0.75),
        );
    }
    let median = |of: &[Vec<f64>], arm: usize| percentile(&of[arm], 0.5);
    println!(
        "   two tags against none: ours c=1 p50 {:.2}x, c=64 {:.2}x; the floor, by hand: {:.2}x, {:.2}x",
        median(&latencies, 1) / median(&latencies, 0),
        median(&paired, 1),
        median(&latencies, 4) / median(&latencies, 3),
        median(&paired, 4) / median(&paired, 3),
    );
    println!(
        "   a GET on a tracking connection by hand against a plain one: c=1 p50 {:.2}x, c=64 {:.2}x",
        median(&latencies, 5) / median(&latencies, 3),
        median(&paired, 5) / median(&paired, 3),
    );
}

/// The CPU time this process (not the Redis it started) has used so
/// far, from `/proc/self/stat` (user and system, in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Part 2: `invalidate_tag` of a group of `n` entries.
async fn invalidate_groups(cache: &Cache) -> Result<(), Error> {
    println!("2. invalidate_tag of a tag with N entries (median of 5):");
    for (group, n) in [
        (1_000_001, 1_000),
        (1_000_002, 10_000),
        (1_000_003, 100_000),
    ] {
        fill(group, n, 64).await;
        let mut took = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            cache.invalidate_tag(&format!("group:{group}")).await?;
            took.push(started.elapsed().as_secs_f64() * 1e6);
        }
        took.sort_by(f64::total_cmp);
        let before = MEMBER_RUNS.load(Ordering::Relaxed);
        member(group, n / 2).await.map_err(|_| "db")?;
        let recomputed = MEMBER_RUNS.load(Ordering::Relaxed) - before;
        println!(
            "   N = {n:>7}: {:.0} µs (min {:.0}, max {:.0}); a read afterwards recomputed: {}",
            took[2],
            took[0],
            took[4],
            recomputed == 1
        );
    }
    Ok(())
}

/// Stores `n` entries of `group` with `tasks` callers.
async fn fill(group: u64, n: u64, tasks: u64) {
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            tokio::spawn(async move {
                let mut id = task;
                while id < n {
                    let _ = member(group, id).await;
                    id += tasks;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
}

/// Tag keys under the cache's prefix, and the bytes `MEMORY USAGE` gives
/// them, by `SCAN`.
async fn tag_keys(conn: &mut redis::aio::MultiplexedConnection) -> Result<(u64, u64), Error> {
    let (mut cursor, mut keys, mut bytes) = (0u64, 0u64, 0u64);
    loop {
        let (next, found): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("tagbench:\0tag:*")
            .arg("COUNT")
            .arg(1_000)
            .query_async(conn)
            .await?;
        for key in found {
            keys += 1;
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .query_async(conn)
                .await?;
            bytes += used.unwrap_or(0);
        }
        if next == 0 {
            return Ok((keys, bytes));
        }
        cursor = next;
    }
}

async fn used_memory(conn: &mut redis::aio::MultiplexedConnection) -> Result<u64, Error> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// Part 3: the bookkeeping of many tagged writes and tag invalidations.
async fn bookkeeping(url: &str) -> Result<(), Error> {
    let entries: u64 = if std::env::var_os("BENCH_QUICK").is_some() {
        100_000
    } else {
        1_000_000
    };
    const TAGS: u64 = 10_000;
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
    let empty = used_memory(&mut conn).await?;
    let started = Instant::now();
    let handles: Vec<_> = (0..64u64)
        .map(|task| {
            tokio::spawn(async move {
                let mut i = task;
                while i < entries {
                    let _ = member(i % TAGS, i).await;
                    i += 64;
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    let filled = started.elapsed();
    let full = used_memory(&mut conn).await?;
    let (keys, bytes) = tag_keys(&mut conn).await?;
    let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    println!(
        "3. {entries} tagged entries stored over {TAGS} tags in {:.1} s: {dbsize} keys, used_memory {:.1} MB ({:.1} MB more than empty); tag keys {keys}, {:.2} MB ({} bytes per tag)",
        filled.as_secs_f64(),
        full as f64 / 1e6,
        (full - empty) as f64 / 1e6,
        bytes as f64 / 1e6,
        bytes / keys.max(1)
    );
    let cache = Cache::installed().ok_or("no cache installed")?;
    let started = Instant::now();
    for tag in 0..TAGS {
        cache.invalidate_tag(&format!("group:{tag}")).await?;
    }
    let invalidated = started.elapsed();
    let after = used_memory(&mut conn).await?;
    let (keys, bytes) = tag_keys(&mut conn).await?;
    println!(
        "   then {TAGS} tag invalidations in {:.1} s: used_memory {:.1} MB; tag keys {keys}, {:.2} MB: the bookkeeping does not grow (the invalidated entries stay until their TTL, never served)",
        invalidated.as_secs_f64(),
        after as f64 / 1e6,
        bytes as f64 / 1e6
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (url, _server) = benchmark_redis()?;
    let cache = Cache::builder()
        .url(url.clone())
        .prefix("tagbench")
        .build()
        .await?;
    cache.install();
    let bare = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let _ = BARE.set(bare);
    let (pushes, _) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(pushes);
    let mut tracked = redis::Client::open(format!("{url}?protocol=resp3"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    redis::cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("OPTIN")
        .query_async::<()>(&mut tracked)
        .await?;
    let _ = TRACKED.set(tracked);
    // `BENCH_PROFILE_ARM=tagged` (or `untagged`, `tags_from`): that arm alone at c=64
    // (`BENCH_PROFILE_C=1` for one caller) for 5 s, for a profiler.
    if let Ok(arm) = std::env::var("BENCH_PROFILE_ARM") {
        let at = match arm.as_str() {
            "tagged" => 1,
            "tags_from" => 2,
            _ => 0,
        };
        for id in 0..KEYS {
            call(at, id).await;
        }
        let callers = std::env::var("BENCH_PROFILE_C")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(64);
        // `BENCH_PROFILE_C=0`: one caller on the main thread, as part 1's
        // latencies are measured.
        let cpu = process_cpu();
        let calls = if callers == 0 {
            let (mut calls, end) = (0, Instant::now() + Duration::from_secs(5));
            while Instant::now() < end {
                call(at, calls % KEYS).await;
                calls += 1;
            }
            calls
        } else {
            hits_of(callers, at, Duration::from_secs(5)).await
        };
        let cpu = process_cpu() - cpu;
        let total = cache.stats().total;
        println!(
            "{arm}: {} calls/s, {:.2} µs of this process's CPU a call; {} hits, {} misses, {} errors, {} bypasses",
            calls / 5,
            cpu.as_secs_f64() * 1e6 / calls as f64,
            total.hits,
            total.misses,
            total.errors,
            total.bypasses
        );
        return Ok(());
    }
    hits(&cache).await;
    invalidate_groups(&cache).await?;
    bookkeeping(&url).await?;
    Ok(())
}
