//! Fault injection: what a cached call does when Redis dies, stalls, holds
//! garbage, runs out of memory or rejects the password, and what it does with
//! huge values and hostile keys. Every test runs real `redis-server`
//! processes that it kills, pauses, freezes or misconfigures itself. The
//! tests of garbage, large values and hostile keys also run on a real local
//! Redis Cluster, shared by this file's tests; the cluster's own faults
//! (failover, resharding, a stalled shard) are in `cluster_faults.rs`.
//!
//! The README's "Failure behaviour" section is written from these tests'
//! output (`cargo test -p cache-harness --test faults -- --nocapture --test-threads 1`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_harness::{RawConnection, RedisCluster, RedisServer, Target, raw, raw_connection};
use cache_runtime::{
    Cache, CacheBuilder, Counts, KEPT_WHEN_HASHED, MAX_KEY_LEN, cache_put, invalidates,
    redis_cached,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

#[path = "support/logs.rs"]
mod logs;
use logs::Logs;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

fn user(id: u64) -> User {
    User {
        id,
        name: format!("user-{id}"),
    }
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A database behind a cache; counts the queries that reach it.
struct Db {
    cache: Cache,
    queries: AtomicU64,
    /// How long a query takes.
    latency: Duration,
    /// Sizes of the documents served by `document`, by id.
    document_sizes: Mutex<HashMap<u64, usize>>,
}

impl Db {
    fn new(cache: Cache) -> Db {
        Db {
            cache,
            queries: AtomicU64::new(0),
            latency: Duration::ZERO,
            document_sizes: Mutex::default(),
        }
    }

    fn with_latency(cache: Cache, latency: Duration) -> Db {
        Db {
            latency,
            ..Db::new(cache)
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }

    async fn query(&self) {
        self.queries.fetch_add(1, Ordering::SeqCst);
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    #[redis_cached(key = "user:<id>", ttl = 60, cache = self.cache)]
    async fn get_user(&self, id: u64) -> Result<User, DbError> {
        self.query().await;
        Ok(user(id))
    }

    #[redis_cached(key = "fresh:<id>", ttl = 60, stale = "30s", cache = self.cache)]
    async fn get_fresh_user(&self, id: u64) -> Result<User, DbError> {
        self.query().await;
        Ok(user(id))
    }

    #[redis_cached(key = "find:<name>", ttl = 60, cache = self.cache)]
    async fn find(&self, name: &str) -> Option<User> {
        self.query().await;
        let id = name.strip_prefix("user-")?.parse().ok()?;
        Some(user(id))
    }

    #[invalidates(Self::get_user(id), cache = self.cache)]
    async fn touch_user(&self, id: u64) -> Result<(), DbError> {
        self.query().await;
        Ok(())
    }

    #[redis_cached(key = "search:<query>", ttl = 60, cache = self.cache)]
    async fn search(&self, query: &str) -> String {
        self.query().await;
        query.to_owned()
    }

    #[redis_cached(key = "blob:<bytes>", ttl = 60, cache = self.cache)]
    async fn blob(&self, bytes: Vec<u8>) -> Vec<u8> {
        self.query().await;
        bytes
    }

    #[redis_cached(key = "doc:<id>", ttl = 60, cache = self.cache)]
    async fn document(&self, id: u64) -> Result<String, DbError> {
        self.query().await;
        let size = self.document_sizes.lock().unwrap()[&id];
        Ok(document_text(id, size))
    }

    #[cache_put(Self::document(id), cache = self.cache)]
    async fn resize_document(&self, id: u64, size: usize) -> Result<String, DbError> {
        self.query().await;
        self.document_sizes.lock().unwrap().insert(id, size);
        Ok(document_text(id, size))
    }
}

/// `size` bytes of text that differ from one document to the next.
fn document_text(id: u64, size: usize) -> String {
    let line = format!("document {id} of {size} bytes. ");
    line.chars().cycle().take(size).collect()
}

async fn redis_cache(server: &RedisServer, configure: fn(CacheBuilder) -> CacheBuilder) -> Cache {
    configure(Cache::builder().url(server.url()))
        .build()
        .await
        .unwrap()
}

// ---------------------------------------------------------------- Redis dies

/// 8 workers make mixed calls (reads, lookups by name, writes that
/// invalidate) for 10 s; Redis is SIGKILLed at 3 s and restarted, empty, at
/// 5 s. No call may fail or panic, and hits must resume soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_call_and_hits_resume() {
    const RUN: Duration = Duration::from_secs(10);
    let mut server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let db = Arc::new(Db::with_latency(cache.clone(), Duration::from_millis(1)));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..8 {
        let db = db.clone();
        workers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(worker);
            let (mut calls, mut wrong) = (0u64, 0u64);
            while started.elapsed() < RUN {
                let id = rng.u64(0..20);
                let right = match rng.u8(0..10) {
                    0 => db.touch_user(id).await.is_ok(),
                    1 => db.find(&format!("user-{id}")).await == Some(user(id)),
                    _ => db.get_user(id).await == Ok(user(id)),
                };
                calls += 1;
                wrong += u64::from(!right);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (calls, wrong)
        });
    }

    tokio::time::sleep_until((started + Duration::from_secs(3)).into()).await;
    let (before_kill, queries_before_kill) = (cache.stats().total, db.queries());
    server.stop();
    tokio::time::sleep_until((started + Duration::from_secs(5)).into()).await;
    let (during_outage, queries_in_outage) =
        (cache.stats().total, db.queries() - queries_before_kill);
    server.restart();
    let restarted = Instant::now();
    let mut first_hit_after = None;
    while restarted.elapsed() < Duration::from_secs(4) {
        if cache.stats().total.hits > during_outage.hits {
            first_hit_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let (mut calls, mut wrong, mut panicked) = (0, 0, 0);
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok((c, w)) => {
                calls += c;
                wrong += w;
            }
            Err(_) => panicked += 1,
        }
    }
    let end = cache.stats().total;
    println!(
        "killed under load: {calls} calls in {RUN:?}, {wrong} wrong or failed, {panicked} workers panicked"
    );
    println!(
        "  outage (2 s): {queries_in_outage} queries, errors {}, bypasses {}",
        during_outage.errors - before_kill.errors,
        during_outage.bypasses - before_kill.bypasses,
    );
    println!("  first hit {first_hit_after:?} after the restart; totals {end:?}");
    assert_eq!((wrong, panicked), (0, 0), "no call fails or panics");
    assert!(
        during_outage.bypasses > before_kill.bypasses,
        "the breaker skipped the dead Redis"
    );
    let first_hit_after = first_hit_after.expect("hits resume after the restart");
    assert!(
        first_hit_after <= Duration::from_secs(2),
        "hits resumed {first_hit_after:?} after the restart"
    );
}

#[tokio::test]
async fn starts_while_redis_is_down_then_uses_it_once_it_is_up() {
    let mut server = RedisServer::not_started();
    let cache = Cache::builder()
        .url(server.url())
        .circuit_breaker(5, Duration::from_millis(200))
        .build()
        .await
        .expect("a server that is down is not a connect error");
    let db = Db::new(cache);
    for _ in 0..5 {
        assert_eq!(db.get_user(2).await, Ok(user(2)));
    }
    assert_eq!(db.queries(), 5, "uncached while Redis is down");

    server.restart();
    let polls = polls_until_a_hit(&db, 2).await;
    println!(
        "late redis: queries = {}, first hit after {polls:?} polls of 50 ms",
        db.queries()
    );
    assert!(polls.is_some(), "the cache came into use once Redis was up");
}

/// Calls `get_user(id)` every 50 ms until one call is a hit; returns the
/// number of polls it took, or `None` after 5 s.
async fn polls_until_a_hit(db: &Db, id: u64) -> Option<usize> {
    let hits_before = db.cache.stats().total.hits;
    for attempt in 0..100 {
        db.get_user(id).await.unwrap();
        if db.cache.stats().total.hits > hits_before {
            return Some(attempt);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

// ------------------------------------------------------------- Redis stalls

/// How calls fared while Redis did not answer.
struct Stalled {
    calls: usize,
    slowest: Duration,
    /// Calls that waited out an op timeout.
    timed_out: usize,
    /// Calls made while the breaker was open, and the slowest of them.
    skipped: usize,
    slowest_skipped: Duration,
}

const STALL_OP_TIMEOUT: Duration = Duration::from_millis(200);
const STALL_QUERY: Duration = Duration::from_millis(20);

/// Makes calls one after another for `length` (half of them hits before the
/// stall, half new keys) and times each one.
async fn calls_while_stalled(db: &Db, length: Duration) -> Stalled {
    let started = Instant::now();
    let mut stalled = Stalled {
        calls: 0,
        slowest: Duration::ZERO,
        timed_out: 0,
        skipped: 0,
        slowest_skipped: Duration::ZERO,
    };
    while started.elapsed() < length {
        let id = if stalled.calls.is_multiple_of(2) {
            1
        } else {
            1000 + stalled.calls as u64
        };
        let before = db.cache.stats().total;
        let call = Instant::now();
        assert_eq!(db.get_user(id).await, Ok(user(id)));
        let took = call.elapsed();
        let after = db.cache.stats().total;
        stalled.calls += 1;
        stalled.slowest = stalled.slowest.max(took);
        if took >= STALL_OP_TIMEOUT {
            stalled.timed_out += 1;
        }
        if after.bypasses > before.bypasses && after.errors == before.errors {
            stalled.skipped += 1;
            stalled.slowest_skipped = stalled.slowest_skipped.max(took);
        }
    }
    stalled
}

async fn stall_test(
    name: &str,
    stall: impl FnOnce(&RedisServer),
    resume: impl FnOnce(&RedisServer),
) {
    let server = RedisServer::start();
    let cache = redis_cache(&server, |b| {
        b.op_timeout(STALL_OP_TIMEOUT)
            .circuit_breaker(3, Duration::from_secs(1))
    })
    .await;
    let db = Db::with_latency(cache, STALL_QUERY);
    db.get_user(1).await.unwrap();
    db.cache.settled().await;
    stall(&server);
    let stalled = calls_while_stalled(&db, Duration::from_millis(2500)).await;
    resume(&server);
    let stats = db.cache.stats().total;
    println!(
        "{name}: {} calls in 2.5 s, slowest {:?}, {} waited out the {STALL_OP_TIMEOUT:?} op timeout, \
         {} skipped the cache (slowest {:?}); errors {}, bypasses {}",
        stalled.calls,
        stalled.slowest,
        stalled.timed_out,
        stalled.skipped,
        stalled.slowest_skipped,
        stats.errors,
        stats.bypasses,
    );
    // Bound: one op timeout, the query, and scheduling noise. A call never
    // waits out two timeouts.
    let bound = STALL_OP_TIMEOUT + STALL_QUERY + Duration::from_millis(150);
    assert!(
        stalled.slowest <= bound,
        "{name}: {:?} > {bound:?}",
        stalled.slowest
    );
    assert!(
        stalled.skipped > stalled.calls / 2,
        "{name}: the breaker opened"
    );
    assert!(
        stalled.slowest_skipped < STALL_OP_TIMEOUT,
        "{name}: a call skipping the cache paid no timeout ({:?})",
        stalled.slowest_skipped
    );
    // 3 to open the breaker, then one probe per second of cool-down.
    assert!(
        stalled.timed_out <= 3 + 3,
        "{name}: {} timeouts",
        stalled.timed_out
    );

    let polls = polls_until_a_hit(&db, 1).await;
    println!("{name}: after the stall, first hit after {polls:?} polls of 50 ms");
    assert!(polls.is_some(), "{name}: hits resume");
}

#[tokio::test]
async fn client_pause_costs_at_most_one_timeout_per_call_then_none() {
    stall_test(
        "CLIENT PAUSE 3000 ALL",
        |server| {
            server.command("CLIENT PAUSE 3000 ALL").unwrap();
        },
        |_| std::thread::sleep(Duration::from_millis(600)),
    )
    .await;
}

#[tokio::test]
async fn sigstop_costs_at_most_one_timeout_per_call_then_none() {
    stall_test("SIGSTOP", RedisServer::freeze, RedisServer::thaw).await;
}

// ------------------------------------------------------------------ garbage

/// Reads the value stored under `key`, without a freshness header.
async fn stored_user(conn: &mut RawConnection, key: &str) -> Option<User> {
    let bytes: Option<Vec<u8>> = raw(conn, &[b"GET", key.as_bytes()]).await;
    let bytes = bytes?;
    let json = match bytes.iter().position(|&b| b == b'\n') {
        Some(newline) if bytes.starts_with(b"\x01fresh:") => &bytes[newline + 1..],
        _ => &bytes[..],
    };
    serde_json::from_slice(json).ok()
}

// The tests of bad data and odd sizes run on a standalone server and on
// the shared cluster (under a prefix of their own there, as tests in
// parallel share it).

/// A cache on `target` under `prefix`, configured further by `configure`;
/// `key` gives the Redis key of a template-rendered key.
async fn cache_on(
    target: &Target,
    prefix: &str,
    configure: fn(CacheBuilder) -> CacheBuilder,
) -> (Cache, impl Fn(&str) -> String) {
    let cache = configure(target.builder().prefix(prefix))
        .build()
        .await
        .unwrap();
    let prefix = prefix.to_owned();
    (cache, move |key: &str| format!("{prefix}:{key}"))
}

/// A name for a test's keys on the shared cluster, unique to this process.
fn on_the_cluster(test: &str) -> (Target, String) {
    let target = Target::cluster(RedisCluster::shared());
    (target, format!("{test}-{}", std::process::id()))
}

/// Each `test` on a private standalone server, and `test_on_a_cluster` on
/// the shared cluster: `body(target, prefix)`.
macro_rules! on_a_server_and_a_cluster {
    ($($test:ident, $on_a_cluster:ident: $body:ident($prefix:literal);)*) => {$(
        #[tokio::test]
        async fn $test() {
            let server = RedisServer::start();
            $body(&Target::server(&server), $prefix).await;
        }

        #[tokio::test]
        async fn $on_a_cluster() {
            let (target, prefix) = on_the_cluster($prefix);
            $body(&target, &prefix).await;
        }
    )*};
}

on_a_server_and_a_cluster! {
    garbage_in_a_key_is_a_miss_and_is_overwritten,
    garbage_in_a_key_is_a_miss_and_is_overwritten_on_a_cluster: garbage_in_a_key("garbage");
    large_values_round_trip, large_values_round_trip_on_a_cluster: large_values("large");
    values_above_the_size_limit_are_served_but_not_cached,
    values_above_the_size_limit_are_served_but_not_cached_on_a_cluster:
        values_above_the_size_limit("limit");
    hostile_keys_get_distinct_bounded_entries,
    hostile_keys_get_distinct_bounded_entries_on_a_cluster: hostile_keys("hostile");
}

async fn garbage_in_a_key(target: &Target, prefix: &str) {
    let (cache, key_of) = cache_on(target, prefix, |b| b).await;
    let db = Db::new(cache);
    let mut conn = target.raw().await;
    let mut rng = fastrand::Rng::with_seed(5);
    let real = serde_json::to_vec(&user(3)).unwrap();
    let mut garbage: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let len = rng.usize(0..200);
            (
                format!("random bytes #{i}"),
                (0..len).map(|_| rng.u8(..)).collect(),
            )
        })
        .collect();
    garbage.extend([
        (
            "older struct shape".into(),
            br#"{"id":3,"full_name":"x"}"#.to_vec(),
        ),
        ("truncated JSON".into(), real[..real.len() / 2].to_vec()),
        ("empty value".into(), Vec::new()),
        (
            "stray placeholder (no expiry)".into(),
            format!("\0lease:{:032x}:1000", 7).into_bytes(),
        ),
        ("malformed placeholder".into(), b"\0lease:soon".to_vec()),
        (
            "malformed freshness header".into(),
            [&b"\x01fresh:zz\n"[..], &real].concat(),
        ),
    ]);

    for (what, bytes) in &garbage {
        for (key, id) in [("user:3", 3), ("fresh:3", 3)] {
            let stored = key_of(key);
            raw::<()>(&mut conn, &[b"SET", stored.as_bytes(), bytes]).await;
            let queries = db.queries();
            let got = if key == "user:3" {
                db.get_user(id).await
            } else {
                db.get_fresh_user(id).await
            };
            assert_eq!(got, Ok(user(id)), "{what} under {key}");
            assert_eq!(db.queries(), queries + 1, "{what} under {key}: a miss");
            db.cache.settled().await;
            assert_eq!(
                stored_user(&mut conn, &stored).await,
                Some(user(id)),
                "{what} under {key}: overwritten"
            );
        }
    }
    // A key of another Redis type (WRONGTYPE) is also just a miss.
    let list = key_of("user:4");
    raw::<()>(&mut conn, &[b"LPUSH", list.as_bytes(), b"x"]).await;
    assert_eq!(db.get_user(4).await, Ok(user(4)));
    db.cache.settled().await;
    assert_eq!(stored_user(&mut conn, &list).await, Some(user(4)));

    let queries = db.queries();
    assert_eq!(db.get_user(3).await, Ok(user(3)));
    assert_eq!(db.get_fresh_user(3).await, Ok(user(3)));
    assert_eq!(db.queries(), queries, "the overwritten entries are hits");
    let stats = db.cache.stats().total;
    println!(
        "garbage: {} kinds under 2 keys each, plus a list: {stats:?}",
        garbage.len()
    );
    assert_eq!(
        stats.errors,
        2 * garbage.len() as u64 + 1,
        "each one counted"
    );
}

// -------------------------------------------------------------- large values

async fn large_values(target: &Target, prefix: &str) {
    // A 16 MiB value takes longer than the default 100 ms op timeout in a
    // debug build; the README says to raise it for large values.
    let (cache, _) = cache_on(target, prefix, |b| b.op_timeout(Duration::from_secs(5))).await;
    let db = Db::new(cache);
    for (id, size) in [(1, 1 << 20), (16, 16 << 20)] {
        db.document_sizes.lock().unwrap().insert(id, size);
        let queries = db.queries();
        let first = Instant::now();
        let miss = db.document(id).await.unwrap();
        let missed_in = first.elapsed();
        let second = Instant::now();
        let hit = db.document(id).await.unwrap();
        let hit_in = second.elapsed();
        println!("large value: {size} bytes, miss {missed_in:?}, hit {hit_in:?}");
        assert_eq!(miss.len(), size);
        assert_eq!(hit, miss, "{size} bytes round trip");
        assert_eq!(
            db.queries(),
            queries + 1,
            "{size} bytes: the second call is a hit"
        );
    }
    assert_eq!(db.cache.stats().total.oversized, 0);
}

async fn values_above_the_size_limit(target: &Target, prefix: &str) {
    let (cache, key_of) = cache_on(target, prefix, |b| {
        b.op_timeout(Duration::from_secs(5)).max_value_size(1 << 20)
    })
    .await;
    let db = Db::new(cache);
    let mut conn = target.raw().await;
    let (doc7, doc8) = (key_of("doc:7"), key_of("doc:8"));
    db.document_sizes.lock().unwrap().insert(7, 16 << 20);
    for _ in 0..2 {
        assert_eq!(db.document(7).await.unwrap().len(), 16 << 20);
    }
    assert_eq!(db.queries(), 2, "not cached: both calls ran the query");
    let exists: u64 = raw(&mut conn, &[b"EXISTS", doc7.as_bytes()]).await;
    assert_eq!(exists, 0, "no value and no placeholder left behind");

    // A write-through of an oversized value drops the old entry instead.
    db.document_sizes.lock().unwrap().insert(8, 100);
    db.document(8).await.unwrap();
    let exists: u64 = raw(&mut conn, &[b"EXISTS", doc8.as_bytes()]).await;
    assert_eq!(exists, 1);
    db.resize_document(8, 16 << 20).await.unwrap();
    let exists: u64 = raw(&mut conn, &[b"EXISTS", doc8.as_bytes()]).await;
    assert_eq!(
        exists, 0,
        "the old 100-byte document is not served after the write"
    );
    assert_eq!(db.document(8).await.unwrap().len(), 16 << 20);

    let stats = db.cache.stats().total;
    println!("size limit 1 MiB, 16 MiB values: {stats:?}");
    assert_eq!(stats.oversized, 4, "two reads, one put, one read after it");
    assert_eq!(
        stats.errors, 0,
        "a value too large to cache is not an error"
    );
}

// ------------------------------------------------------------- hostile keys

async fn hostile_keys(target: &Target, prefix: &str) {
    let (cache, key_of) = cache_on(target, prefix, |b| b).await;
    let db = Db::new(cache);
    let mut conn = target.raw().await;
    let long = "q".repeat(10 * 1024);
    let texts: Vec<String> = [
        ":", "*", "{", "}", "{user}", "\n", "\r\n", " ", "", "a:b", "a%3Ab", "%", "user:1", "\0",
        "é", "🦀", "?[]^",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        format!("{long}a"),
        format!("{long}b"),
        format!("a{long}"),
        format!("{long}:*{{}}\n"),
    ])
    .collect();
    let blobs: Vec<Vec<u8>> = vec![
        b"\xff".to_vec(),
        b"\xfe\xff".to_vec(),
        b"%FF".to_vec(),
        b"\xff".repeat(10 * 1024),
        [b"\xff".repeat(10 * 1024), b"\x00".to_vec()].concat(),
        Vec::new(),
    ];
    for _ in 0..2 {
        for text in &texts {
            assert_eq!(
                &db.search(text).await,
                text,
                "{:?}",
                &text[..text.len().min(20)]
            );
        }
        for bytes in &blobs {
            assert_eq!(&db.blob(bytes.clone()).await, bytes);
        }
    }
    let inputs = (texts.len() + blobs.len()) as u64;
    assert_eq!(
        db.queries(),
        inputs,
        "one entry per input: no two share a key"
    );

    // On a cluster, KEYS goes to every primary and the replies are joined.
    let pattern = key_of("*");
    let keys: Vec<String> = raw(&mut conn, &[b"KEYS", pattern.as_bytes()]).await;
    let unprefixed = key_of("").len();
    let longest = keys.iter().map(|k| k.len() - unprefixed).max().unwrap_or(0);
    let stats = db.cache.stats().total;
    println!(
        "hostile keys: {} inputs (up to 10 KiB) -> {} keys in Redis, longest {longest} bytes; {stats:?}",
        inputs,
        keys.len()
    );
    assert_eq!(keys.len() as u64, inputs);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len());
    assert!(longest <= KEPT_WHEN_HASHED + 2 + 64 && longest > MAX_KEY_LEN);
    assert_eq!(stats.errors, 0);
}

// ---------------------------------------------------------------- maxmemory

/// Calls `document(id)` for `ids` (10 KB each); panics on a wrong value.
async fn read_documents(db: &Db, ids: std::ops::Range<u64>) {
    for id in ids {
        db.document_sizes.lock().unwrap().insert(id, 10_000);
        assert_eq!(db.document(id).await.unwrap(), document_text(id, 10_000));
    }
}

async fn info_field(conn: &mut redis::aio::MultiplexedConnection, field: &str) -> String {
    let info: String = raw(conn, &[b"INFO", b"all"]).await;
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn evictions_under_allkeys_lru_are_plain_misses() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let db = Db::new(Cache::connect(&server.url()).await.unwrap());
    let mut conn = raw_connection(&server).await;
    read_documents(&db, 0..600).await; // 6 MB through a 2 MB Redis
    let first_pass = db.queries();
    read_documents(&db, 0..600).await;
    let stats = db.cache.stats().total;
    let evicted = info_field(&mut conn, "evicted_keys").await;
    println!(
        "maxmemory 2mb allkeys-lru: 600 x 10 KB twice, queries {first_pass} then {}, evicted_keys {evicted}; {stats:?}",
        db.queries() - first_pass
    );
    assert!(evicted.parse::<u64>().unwrap() > 0, "Redis evicted");
    assert!(db.queries() > first_pass, "evicted entries were misses");
    // A sequential scan is LRU's worst case; the latest entries are there.
    let queries = db.queries();
    read_documents(&db, 595..600).await;
    assert_eq!(db.queries(), queries, "what fits is still served");
    assert_eq!(stats.errors, 0, "an eviction is not an error");
}

#[tokio::test]
async fn out_of_memory_under_noeviction_is_a_counted_error_not_a_failed_call() {
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let db = Db::new(Cache::connect(&server.url()).await.unwrap());
    read_documents(&db, 0..600).await;
    let stats = db.cache.stats().total;
    println!("maxmemory 2mb noeviction: 600 x 10 KB: {stats:?}");
    assert!(stats.errors > 0, "OOM replies are counted");
    assert!(stats.sets > 0, "values were stored until memory ran out");
    assert_eq!(
        stats.bypasses, 0,
        "an OOM reply is not an outage: the breaker stays closed"
    );
    let queries = db.queries();
    read_documents(&db, 0..10).await;
    assert_eq!(db.queries(), queries, "what was stored is still served");
}

// ------------------------------------------------------------- credentials

/// Redis hangs (SIGSTOP) while 16 callers read and write as fast as they
/// can for 3 s: the tasks, queued clean-ups and log lines the cache spends
/// stay bounded, however many calls there are.
#[tokio::test]
async fn an_outage_costs_bounded_tasks_chores_and_log_lines_whatever_the_call_rate() {
    const RUN: Duration = Duration::from_secs(3);
    let logs = Logs::default();
    let _capture = logs.capture(); // one thread: every task's events
    let server = RedisServer::start();
    let cache = redis_cache(&server, |b| {
        b.op_timeout(Duration::from_millis(50))
            .circuit_breaker(3, Duration::from_millis(300))
    })
    .await;
    let db = Arc::new(Db::new(cache.clone()));
    db.get_user(1).await.unwrap();
    db.cache.settled().await;
    server.freeze();
    let metrics = tokio::runtime::Handle::current().metrics();
    let (mut calls, mut most_tasks, mut most_chores) = (0u64, 0, 0);
    let started = Instant::now();
    while started.elapsed() < RUN {
        let mut round = JoinSet::new();
        for i in 0..16u64 {
            let db = db.clone();
            round.spawn(async move {
                if i % 2 == 0 {
                    db.touch_user(i).await.unwrap();
                } else {
                    db.get_user(i).await.unwrap();
                }
            });
        }
        most_tasks = most_tasks.max(metrics.num_alive_tasks());
        while let Some(done) = round.join_next().await {
            done.unwrap();
        }
        calls += 16;
        most_chores = most_chores.max(cache_runtime::testing::pending_chores(&cache));
    }
    let lines = logs.text().lines().count();
    server.thaw();
    let thawed = Instant::now();
    while cache_runtime::testing::pending_chores(&cache) > 0
        && thawed.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let landed = thawed.elapsed();
    let stats = cache.stats().total;
    println!(
        "Redis hung for {RUN:?} under 16 callers: {calls} calls; at most {most_tasks} tasks alive \
         (16 callers + the cache's), at most {most_chores} clean-ups queued, {lines} log lines; \
         {} bypasses; the queued invalidations landed {landed:?} after Redis answered again, \
         {} lost",
        stats.bypasses, stats.lost_invalidations
    );
    assert_eq!(stats.lost_invalidations, 0);
    assert!(landed < Duration::from_secs(5), "{landed:?}");
    assert!(calls > 10_000, "the callers ran at full speed");
    assert!(
        most_tasks <= 16 + 4,
        "the janitor, a probe and the INFO reader at most: {most_tasks}"
    );
    assert!(most_chores <= 64 * 1024, "{most_chores} clean-ups queued");
    assert!(lines <= 12 * 4, "{lines} log lines in {RUN:?}");
}

async fn hit_after_miss(url: &str) -> Counts {
    let db = Db::new(Cache::connect(url).await.unwrap());
    assert_eq!(db.get_user(1).await, Ok(user(1)));
    assert_eq!(db.get_user(1).await, Ok(user(1)));
    assert_eq!(db.queries(), 1, "{url}: the second call is a hit");
    db.cache.stats().total
}

#[tokio::test]
async fn password_and_acl_user_in_the_url_work() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/", server.port());
    let stats = hit_after_miss(&url).await;
    assert_eq!(stats.errors, 0, "requirepass: {stats:?}");

    // The least an ACL user needs: the commands the cache sends.
    let server = RedisServer::start_with(&[
        "--user",
        "app",
        "on",
        ">apppw",
        "~*",
        "+get",
        "+getrange",
        "+strlen",
        "+set",
        "+del",
        "+evalsha",
        "+eval",
        "+script|load",
        "+ping",
        "+pttl",
        "+pexpire",
        "+role",
        "+wait",
    ]);
    let url = format!("redis://app:apppw@127.0.0.1:{}/", server.port());
    let mut stats = hit_after_miss(&url).await;
    // `stale` functions read the TTL with the value (a script calling PTTL).
    let db = Db::new(Cache::connect(&url).await.unwrap());
    db.get_fresh_user(1).await.unwrap();
    db.get_fresh_user(1).await.unwrap();
    db.touch_user(1).await.unwrap();
    let fresh = db.cache.stats().total;
    stats.errors += fresh.errors;
    println!(
        "ACL user with +get +getrange +strlen +set +del +evalsha +eval +script|load +ping +pttl +pexpire +role +wait: {stats:?}; \
         a stale function: {fresh:?}"
    );
    assert_eq!((stats.errors, fresh.hits), (0, 1), "ACL user: {stats:?}");
}

#[tokio::test]
async fn a_wrong_password_is_logged_and_fails_open_until_it_is_right() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let wrong = format!("redis://:wrong@127.0.0.1:{}/", server.port());
    for (what, url) in [("no password", server.url()), ("wrong password", wrong)] {
        let logs = Logs::default();
        let _capture = logs.capture();
        let db = Db::new(Cache::connect(&url).await.expect("not a connect error"));
        for _ in 0..20 {
            assert_eq!(db.get_user(1).await, Ok(user(1)), "{what}");
        }
        let stats = db.cache.stats().total;
        let logged = logs.text();
        let rejected = logged
            .lines()
            .filter(|line| line.contains("rejected the credentials"))
            .collect::<Vec<_>>();
        println!("{what}: 20 calls, queries {}, {stats:?}", db.queries());
        println!("{what}: logged {rejected:#?}");
        assert_eq!(db.queries(), 20, "{what}: every call ran uncached");
        assert!(!rejected.is_empty(), "{what}: logged clearly:\n{logged}");
        assert!(rejected.iter().all(|line| line.contains("ERROR")), "{what}");
        assert!(
            stats.bypasses > 10,
            "{what}: the breaker stops the attempts"
        );

        if what == "wrong password" {
            // The operator changes the server's password to the one the
            // service has: the cache comes into use without a restart.
            let admin = format!("redis://:s3cret@127.0.0.1:{}/", server.port());
            let mut conn = redis::Client::open(admin)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            raw::<()>(&mut conn, &[b"CONFIG", b"SET", b"requirepass", b"wrong"]).await;
            let polls = polls_until_a_hit(&db, 1).await;
            println!(
                "wrong password made right on the server: first hit after {polls:?} polls of 50 ms"
            );
            assert!(polls.is_some(), "hits resume once the password is right");
        }
    }
}
