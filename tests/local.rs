//! The local tier (`local = "..."`): copies in process memory that the
//! server keeps right. Every kind of change to a key on the server drops
//! the copy (a write of another cache, `SET`/`DEL` from another client,
//! expiry, eviction, `FLUSHDB`); a lost tracking connection or a restarted
//! server drops every copy; the writing process drops its own copies
//! before its write returns; memory stays within `local_capacity`. A
//! naive local tier (test code: moka with a TTL, nothing else) serves the
//! stale values that these tests show the real one does not.
//!
//! All on real `redis-server`s; several processes in `tests/local_processes.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_harness::{RedisCluster, RedisServer, Target, raw, raw_connection};
use cache_runtime::{Cache, LocalInvalidation, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

/// A table whose rows have versions, read through a cached function with a
/// local tier.
struct Repo {
    cache: Cache,
    version: AtomicU64,
    queries: AtomicU64,
}

impl Repo {
    fn new(cache: Cache) -> Self {
        Repo {
            cache,
            version: AtomicU64::new(1),
            queries: AtomicU64::new(0),
        }
    }

    #[redis_cached(key = "row:<id>", ttl = 60, local = "10s", cache = self.cache)]
    async fn get(&self, id: u64) -> Result<Row, String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Ok(Row {
            id,
            version: self.version.load(Ordering::SeqCst),
        })
    }

    /// A batch of the same rows: the copies single lookups made answer
    /// their ids.
    #[redis_cached(key = "row:<ids>", ttl = 60, batch, local = "10s", cache = self.cache)]
    async fn get_many(&self, ids: &[u64]) -> Result<HashMap<u64, Row>, String> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        let version = self.version.load(Ordering::SeqCst);
        Ok(ids.iter().map(|&id| (id, Row { id, version })).collect())
    }

    #[invalidates(Self::get(id), cache = self.cache)]
    async fn bump(&self, id: u64) -> Result<(), String> {
        let _ = id;
        self.version.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Reads `id` until it is answered locally (tracking is opened on first
/// use, and the first read of a key computes it).
async fn warm(repo: &Repo, id: u64) {
    let hits = repo.cache.stats().total.local_hits;
    let deadline = Instant::now() + Duration::from_secs(5);
    while repo.cache.stats().total.local_hits == hits {
        assert!(Instant::now() < deadline, "no local hit within 5 s");
        repo.get(id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long until `get(id)` stops answering `version`, polled every 100 µs.
async fn until_dropped(repo: &Repo, id: u64, version: u64) -> Duration {
    let started = Instant::now();
    loop {
        let row = repo.get(id).await.unwrap();
        if row.version != version {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the local copy of row {id} outlived its change for 3 s"
        );
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

#[tokio::test]
async fn a_local_hit_sends_nothing_to_redis() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    warm(&repo, 1).await;
    let mut conn = raw_connection(&server).await;
    let before: String = raw(&mut conn, &[b"INFO", b"stats"]).await;
    let commands = |info: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    for _ in 0..1000 {
        assert_eq!(repo.get(1).await.unwrap().version, 1);
    }
    let after: String = raw(&mut conn, &[b"INFO", b"stats"]).await;
    // The INFO itself, at most one heartbeat PING of the tracking
    // connection per second, and the cache's own INFO every 10 s.
    let sent = commands(&after) - commands(&before);
    println!("1000 local hits: {sent} commands processed by Redis meanwhile");
    assert!(sent <= 4, "{sent} commands for 1000 local hits");
    let stats = repo.cache.stats();
    assert!(stats.total.local_hits >= 1000);
    assert_eq!(repo.queries.load(Ordering::SeqCst), 1);
    assert_eq!(stats.local.entries, 1);
    assert!(stats.local.bytes > 0);
}

/// Every kind of change on the server reaches the copy: the copy is gone
/// within the delivery delay printed, where a naive local tier would serve
/// the old version until its TTL.
#[tokio::test]
async fn every_kind_of_server_change_drops_the_copy() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    let other = Repo::new(Cache::connect(&server.url()).await.unwrap());
    let mut conn = raw_connection(&server).await;
    let mut naive = NaiveLocal::default();
    let changes: [(&str, u64); 6] = [
        ("#[invalidates] of another cache", 1),
        ("SET from another client", 2),
        ("DEL from another client", 3),
        ("expiry", 4),
        ("FLUSHDB", 5),
        ("eviction", 6),
    ];
    for (change, id) in changes {
        warm(&repo, id).await;
        let version = repo.get(id).await.unwrap().version;
        naive.fill(id, version);
        repo.version.fetch_add(1, Ordering::SeqCst);
        let key = format!("row:{id}");
        match change {
            "#[invalidates] of another cache" => other.bump(id).await.unwrap(),
            "SET from another client" => {
                let row = format!("{{\"id\":{id},\"version\":0}}");
                raw::<()>(&mut conn, &[b"SET", key.as_bytes(), row.as_bytes()]).await;
            }
            "DEL from another client" => raw::<()>(&mut conn, &[b"DEL", key.as_bytes()]).await,
            "expiry" => raw::<()>(&mut conn, &[b"PEXPIRE", key.as_bytes(), b"20"]).await,
            "FLUSHDB" => raw::<()>(&mut conn, &[b"FLUSHDB"]).await,
            "eviction" => {
                // Any key may be evicted once memory is short: fill until
                // this one is.
                raw::<()>(
                    &mut conn,
                    &[b"CONFIG", b"SET", b"maxmemory-policy", b"allkeys-random"],
                )
                .await;
                let used: String = raw(&mut conn, &[b"INFO", b"memory"]).await;
                let used: u64 = used
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap();
                let limit = (used + 4 * 1024 * 1024).to_string();
                raw::<()>(
                    &mut conn,
                    &[b"CONFIG", b"SET", b"maxmemory", limit.as_bytes()],
                )
                .await;
                let filler = vec![b'x'; 16 * 1024];
                for n in 0..2000u32 {
                    let exists: u64 = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
                    if exists == 0 {
                        break;
                    }
                    let name = format!("filler:{n}");
                    raw::<()>(&mut conn, &[b"SET", name.as_bytes(), &filler]).await;
                }
                let exists: u64 = raw(&mut conn, &[b"EXISTS", key.as_bytes()]).await;
                assert_eq!(exists, 0, "the key was never evicted");
                raw::<()>(&mut conn, &[b"CONFIG", b"SET", b"maxmemory", b"0"]).await;
            }
            _ => unreachable!(),
        }
        let took = until_dropped(&repo, id, version).await;
        let stats = repo.cache.stats().local;
        println!(
            "{change:32} local copy dropped after {took:?} ({} invalidations, {} flushes so far)",
            stats.invalidations, stats.flushes
        );
        assert_eq!(
            naive.get(id),
            Some(version),
            "the naive tier still serves version {version}"
        );
    }
    let stats = repo.cache.stats();
    println!(
        "local: {} invalidations, {} flushes",
        stats.local.invalidations, stats.local.flushes
    );
    assert!(
        stats.local.invalidations >= 5,
        "every change but FLUSHDB drops one copy"
    );
    assert!(stats.local.flushes >= 1, "FLUSHDB drops every copy");
}

/// The same on the shared Redis Cluster: each primary tracks the keys
/// read on a connection to it, so a change on any shard reaches the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_change_reaches_the_copy_on_a_cluster() {
    let target = Target::cluster(RedisCluster::shared());
    let prefix = format!("local-{}", std::process::id());
    let repo = Repo::new(target.cache(Some(&prefix)).await);
    let other = Repo::new(target.cache(Some(&prefix)).await);
    let mut conn = target.raw().await;
    // Ids whose keys fall on every shard, four changes each.
    for id in 1..=12u64 {
        warm(&repo, id).await;
        let version = repo.get(id).await.unwrap().version;
        repo.version.fetch_add(1, Ordering::SeqCst);
        let key = format!("{prefix}:row:{id}");
        let change = match id % 4 {
            0 => {
                other.bump(id).await.unwrap();
                "#[invalidates] of another cache"
            }
            1 => {
                let row = format!("{{\"id\":{id},\"version\":0}}");
                raw::<()>(&mut conn, &[b"SET", key.as_bytes(), row.as_bytes()]).await;
                "SET from another client"
            }
            2 => {
                raw::<()>(&mut conn, &[b"DEL", key.as_bytes()]).await;
                "DEL from another client"
            }
            _ => {
                raw::<()>(&mut conn, &[b"PEXPIRE", key.as_bytes(), b"20"]).await;
                "expiry"
            }
        };
        let took = until_dropped(&repo, id, version).await;
        println!("cluster, {change:32} local copy of row {id} dropped after {took:?}");
    }
    let stats = repo.cache.stats();
    println!(
        "cluster: {:?}; {} local hits",
        stats.local, stats.total.local_hits
    );
    assert!(
        stats.local.invalidations >= 12,
        "every change dropped its copy"
    );
}

/// A batch answers from the copies single lookups made, and the others
/// from Redis or the body; a copy dropped by a change is not used.
#[tokio::test]
async fn a_batch_uses_the_local_copies() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    for id in 1..=4 {
        warm(&repo, id).await;
    }
    repo.get(5).await.unwrap(); // in Redis, no copy yet
    let queries = repo.queries.load(Ordering::SeqCst);
    let rows = repo.get_many(&[1, 2, 3, 4, 5, 6]).await.unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(
        repo.queries.load(Ordering::SeqCst),
        queries + 1,
        "one body run, for id 6"
    );
    let batch = repo.cache.stats().function("get_many").unwrap();
    println!(
        "batch of 6: {} local hits, {} Redis hits, {} misses",
        batch.local_hits, batch.hits, batch.misses
    );
    assert_eq!((batch.local_hits, batch.hits, batch.misses), (4, 1, 1));

    // A change from another client drops the copy of row 2: the batch
    // reads it from Redis (or computes it) instead.
    let mut conn = raw_connection(&server).await;
    raw::<()>(&mut conn, &[b"SET", b"row:2", b"{\"id\":2,\"version\":7}"]).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let rows = repo.get_many(&[1, 2]).await.unwrap();
        if rows[&2].version == 7 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the batch kept serving the old copy of row 2"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Where the server cannot track (a proxy), the caches announce their
/// writes on a pub/sub channel: another cache's write drops the copy; a
/// change made without the cache is not announced, and the copy lives on
/// (for up to its `local` time); a lost subscription drops every copy.
#[tokio::test]
async fn a_broadcast_keeps_copies_right_without_tracking() {
    let server = RedisServer::start();
    let build = || {
        Cache::builder()
            .url(server.url())
            .prefix("bc")
            .local_invalidation(LocalInvalidation::Broadcast)
            .build()
    };
    let writer = Repo::new(build().await.unwrap());
    let reader = Repo::new(build().await.unwrap());
    let mut conn = raw_connection(&server).await;
    warm(&reader, 1).await;
    let clients: String = raw(&mut conn, &[b"CLIENT", b"LIST"]).await;
    assert!(!clients.contains(" flags=t "), "no tracking: {clients}");
    assert!(clients.contains(" flags=P "), "a subscriber: {clients}");

    // Another cache's write: announced, the copy goes.
    let version = reader.get(1).await.unwrap().version;
    reader.version.fetch_add(1, Ordering::SeqCst);
    writer.bump(1).await.unwrap();
    let took = until_dropped(&reader, 1, version).await;
    println!("broadcast: another cache's write dropped the copy after {took:?}");

    // A change made without the cache is not announced.
    warm(&reader, 2).await;
    let version = reader.get(2).await.unwrap().version;
    raw::<()>(
        &mut conn,
        &[b"SET", b"bc:row:2", b"{\"id\":2,\"version\":0}"],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        reader.get(2).await.unwrap().version,
        version,
        "a change without the cache is not seen until the copy's time is up"
    );

    // The subscription is lost: every copy goes.
    let flushes = reader.cache.stats().local.flushes;
    let clients: String = raw(&mut conn, &[b"CLIENT", b"LIST"]).await;
    let subscribers: Vec<String> = clients
        .lines()
        .filter(|l| l.contains(" flags=P "))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    for id in &subscribers {
        raw::<()>(&mut conn, &[b"CLIENT", b"KILL", b"ID", id.as_bytes()]).await;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while reader.cache.stats().local.flushes == flushes {
        assert!(
            Instant::now() < deadline,
            "no flush after the subscription was lost"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        reader.get(2).await.unwrap().version,
        0,
        "the SET is seen now"
    );
    // And the subscription comes back by itself.
    warm(&reader, 3).await;
}

/// An answer of nothing (`cache_none`) is kept locally like a value, and
/// dropped like one.
#[tokio::test]
async fn a_cached_none_is_kept_and_dropped_locally() {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    #[redis_cached(key = "none:<id>", ttl = 60, local = "10s", cache_none, skip(cache), cache = cache)]
    async fn find(cache: &Cache, id: u64) -> Option<Row> {
        let _ = cache;
        CALLS.fetch_add(1, Ordering::SeqCst);
        (id > 1_000).then_some(Row { id, version: 1 })
    }
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().total.local_hits == 0 {
        assert!(Instant::now() < deadline, "no local hit");
        assert_eq!(find(&cache, 7).await, None);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(CALLS.load(Ordering::SeqCst), 1, "the None was cached");
    cache_harness::landed(cache.invalidate(&find_cache_key(&7)).await);
    assert_eq!(find(&cache, 7).await, None);
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        2,
        "the invalidation reached the local copy"
    );
}

/// With `stale`, a copy lives only while the entry is fresh: after the
/// TTL, calls go to Redis, which serves the stale value while one caller
/// refreshes it.
#[tokio::test]
async fn a_copy_never_outlives_the_entrys_freshness() {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    #[redis_cached(key = "fresh:<id>", ttl = "300ms", stale = "10s", local = "10s", skip(cache), cache = cache)]
    async fn fresh(cache: &Cache, id: u64) -> Row {
        let _ = cache;
        Row {
            id,
            version: VERSION.load(Ordering::SeqCst),
        }
    }
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().total.local_hits == 0 {
        assert!(Instant::now() < deadline, "no local hit");
        fresh(&cache, 1).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    VERSION.store(2, Ordering::SeqCst);
    // Past the TTL: the copy is gone, the stale value comes from Redis,
    // and a refresh brings version 2.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let local_hits = cache.stats().total.local_hits;
    let deadline = Instant::now() + Duration::from_secs(3);
    while fresh(&cache, 1).await.version != 2 {
        assert!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = cache.stats().total;
    println!(
        "stale + local: {} local hits after the TTL, {} stale hits, {} refreshes",
        stats.local_hits - local_hits,
        stats.stale_hits,
        stats.refreshes
    );
    assert!(
        stats.stale_hits + stats.refreshes >= 1,
        "Redis served the stale value"
    );
}

/// Read-your-writes in one process is exact: right after the write
/// returns, the next read sees it, with no wait for the server's message.
#[tokio::test]
async fn the_writer_never_reads_its_old_copy() {
    let server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    warm(&repo, 1).await;
    for _ in 0..500 {
        let before = repo.get(1).await.unwrap().version;
        repo.bump(1).await.unwrap();
        let after = repo.get(1).await.unwrap().version;
        assert!(after > before, "read {after} after writing past {before}");
        // And a local hit again before the next write, most of the time.
        repo.get(1).await.unwrap();
    }
    let stats = repo.cache.stats();
    println!(
        "500 writes: {} local hits, {} Redis hits, {} misses",
        stats.total.local_hits, stats.total.hits, stats.total.misses
    );
    assert!(stats.total.local_hits > 0);
}

/// `CLIENT KILL` of the tracking connection, and a restart of Redis: every
/// copy goes, so a change made while the tracking connection was down is
/// never hidden by a copy.
#[tokio::test]
async fn a_lost_tracking_connection_drops_every_copy() {
    let mut server = RedisServer::start();
    let repo = Repo::new(Cache::connect(&server.url()).await.unwrap());
    let mut conn = raw_connection(&server).await;
    for id in 1..=10 {
        warm(&repo, id).await;
    }
    let flushes = repo.cache.stats().local.flushes;
    let clients: String = raw(&mut conn, &[b"CLIENT", b"LIST"]).await;
    let tracking = clients
        .lines()
        .find(|l| l.contains(" flags=t "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .expect("a client with tracking on")
        .to_owned();
    // The change lands in the same instant as the kill: it is one the
    // tracking connection can no longer report.
    repo.version.fetch_add(1, Ordering::SeqCst);
    let mut pipe = redis::pipe();
    pipe.cmd("CLIENT").arg("KILL").arg("ID").arg(&tracking);
    pipe.cmd("SET").arg("row:3").arg("{\"id\":3,\"version\":0}");
    pipe.query_async::<()>(&mut conn).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while repo.cache.stats().local.flushes == flushes {
        assert!(Instant::now() < deadline, "no flush after CLIENT KILL");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(repo.get(3).await.unwrap().version, 0, "the SET is seen");
    assert_eq!(repo.cache.stats().local.entries, 0);
    // Tracking comes back by itself.
    warm(&repo, 4).await;

    server.restart();
    let flushes = repo.cache.stats().local.flushes;
    let deadline = Instant::now() + Duration::from_secs(3);
    while repo.cache.stats().local.flushes == flushes {
        assert!(Instant::now() < deadline, "no flush after a restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The restarted server is empty: the next read computes the current
    // version, not the copy's.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let row = repo.get(4).await.unwrap();
        assert!(row.version >= 2, "served the copy from before the restart");
        if repo.cache.stats().total.local_hits > 0 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Blob {
    bytes: String,
}

/// Many more keys than fit: the local tier stays within its bound.
#[tokio::test]
async fn memory_stays_within_local_capacity() {
    #[redis_cached(key = "blob:<id>", ttl = 60, local = "60s", skip(cache), cache = cache)]
    async fn blob(cache: &Cache, id: u64) -> Blob {
        let _ = cache;
        Blob {
            bytes: format!("{id:0>1000}"),
        }
    }
    let server = RedisServer::start();
    let capacity = 1024 * 1024;
    let cache = Cache::builder()
        .url(server.url())
        .local_capacity(capacity)
        .build()
        .await
        .unwrap();
    let keys = 20_000u64;
    let mut largest = 0;
    for round in 0..2 {
        for id in 0..keys {
            blob(&cache, id).await;
            if id % 1000 == 0 {
                largest = largest.max(cache.stats().local.bytes);
            }
        }
        let stats = cache.stats();
        println!(
            "round {round}: {keys} keys of ~1 KB: {} copies, {} bytes held (bound {capacity}), at most {largest} seen",
            stats.local.entries, stats.local.bytes
        );
    }
    let stats = cache.stats();
    assert!(stats.local.entries > 0, "copies were kept");
    assert!(largest <= capacity, "{largest} bytes > {capacity}");
    assert!(stats.local.entries < keys / 10);
}

/// A naive local tier as a hand-written one would be: a TTL, nothing else.
#[derive(Default)]
struct NaiveLocal {
    copies: std::collections::HashMap<u64, (u64, Instant)>,
}

impl NaiveLocal {
    fn fill(&mut self, id: u64, version: u64) {
        self.copies
            .insert(id, (version, Instant::now() + Duration::from_secs(10)));
    }

    fn get(&self, id: u64) -> Option<u64> {
        self.copies
            .get(&id)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| *v)
    }
}

/// A row read by every process through a local tier; written by one.
struct Delivery {
    cache: Cache,
    db: redis::aio::MultiplexedConnection,
}

impl Delivery {
    async fn new(url: &str) -> Delivery {
        Delivery {
            cache: Cache::connect(url).await.unwrap(),
            db: redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        }
    }

    #[redis_cached(key = "delivery:<id>", ttl = 60, local = "30s", single_flight, cache = self.cache)]
    async fn row(&self, id: u64) -> Result<u64, String> {
        let version: Option<u64> = raw(
            &mut self.db.clone(),
            &[b"GET", format!("db:{id}").as_bytes()],
        )
        .await;
        Ok(version.unwrap_or(0))
    }

    #[invalidates(Self::row(id), cache = self.cache)]
    async fn write(&self, id: u64) -> Result<u64, String> {
        Ok(raw(
            &mut self.db.clone(),
            &[b"INCR", format!("db:{id}").as_bytes()],
        )
        .await)
    }
}

fn history_length() -> Duration {
    cache_harness::history::seconds_from_env("LOCAL_SECONDS", 6)
}

/// Rows of the delivery test, each polled by a task of its own in every
/// reader process.
const DELIVERY_ROWS: u64 = 20;

/// Wall-clock nanoseconds: comparable between processes of one machine.
fn wall_nanos() -> u128 {
    cache_harness::history::now()
}

/// Every write of one process reaches the local tier of three others, each
/// busy reading: for each write and each reader, the time from the write's
/// return to the reader's first read of the new version (delivery of the
/// invalidation, the reader noticing, and its read from Redis). Prints the
/// distribution. Writes go on for `LOCAL_SECONDS` (default 6) or until
/// `LOCAL_WRITES` (default 5000), one every millisecond or so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_every_process() {
    let server = RedisServer::start();
    let writes: usize = std::env::var("LOCAL_WRITES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let spacing = Duration::from_millis(1);
    let warmup = Duration::from_millis(1000);
    let length = warmup + history_length() + Duration::from_millis(500);
    let until = wall_nanos() + length.as_nanos();
    let dir = std::env::temp_dir().join(format!("local-delivery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let readers: Vec<_> = (0..3)
        .map(|i| {
            let out = dir.join(format!("reader-{i}.txt"));
            let child = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "delivery_reader",
                    "--exact",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(
                    "LOCAL_READER",
                    format!("{} {} {until}", server.url(), out.display()),
                )
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let writer = Delivery::new(&server.url()).await;
    tokio::time::sleep(warmup).await;
    let mut written = Vec::with_capacity(writes);
    // Writes stop in time for the readers to see the last ones.
    let last_write = until - Duration::from_millis(500).as_nanos();
    for n in 0..writes {
        if wall_nanos() > last_write {
            break;
        }
        let id = n as u64 % DELIVERY_ROWS;
        let version = writer.write(id).await.unwrap();
        written.push((id, version, wall_nanos()));
        tokio::time::sleep(spacing).await;
    }
    // The readers spin on both cores: the writer gets its turns late.
    assert!(written.len() >= 300, "only {} writes", written.len());
    let mut delays = Vec::new();
    let mut missed = 0;
    for (mut child, out) in readers {
        assert!(child.wait().unwrap().success(), "a reader failed");
        let seen: Vec<(u64, u64, u128)> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|line| {
                let mut parts = line.split(' ').map(|p| p.parse::<u128>().unwrap());
                let mut next = || parts.next().unwrap();
                (next() as u64, next() as u64, next())
            })
            .collect();
        for &(id, version, end) in &written {
            let first = seen
                .iter()
                .filter(|(i, v, _)| *i == id && *v >= version)
                .map(|(_, _, at)| *at)
                .min();
            match first {
                Some(at) => delays.push(Duration::from_nanos(at.saturating_sub(end) as u64)),
                None => missed += 1,
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    delays.sort();
    let at = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
    println!(
        "{} writes x 3 reader processes ({} deliveries): the new version seen after p50 {:?}, p99 {:?}, max {:?}; {missed} never seen",
        written.len(),
        delays.len(),
        at(0.50),
        at(0.99),
        at(1.0)
    );
    assert_eq!(missed, 0, "a reader never saw a write");
    assert!(
        at(1.0) < Duration::from_secs(1),
        "a write took {:?} to reach a reader",
        at(1.0)
    );
}

/// A reader process of `invalidations_reach_every_process`: one task per
/// row reads it as fast as it can and notes each new version it sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_reader() {
    let Ok(config) = std::env::var("LOCAL_READER") else {
        return;
    };
    let parts: Vec<&str> = config.split(' ').collect();
    let [url, out, until] = parts[..] else {
        panic!("LOCAL_READER: {config}");
    };
    let until: u128 = until.parse().unwrap();
    let reader = std::sync::Arc::new(Delivery::new(url).await);
    let tasks: Vec<_> = (0..DELIVERY_ROWS)
        .map(|id| {
            let reader = reader.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut last = None;
                while wall_nanos() < until {
                    let version = reader.row(id).await.unwrap();
                    if last != Some(version) {
                        last = Some(version);
                        seen.push(format!("{id} {version} {}", wall_nanos()));
                    }
                    tokio::task::yield_now().await;
                }
                seen
            })
        })
        .collect();
    let mut lines = Vec::new();
    for task in tasks {
        lines.extend(task.await.unwrap());
    }
    let counts = reader.cache.stats().total;
    println!(
        "reader: {} local hits, {} Redis hits",
        counts.local_hits, counts.hits
    );
    std::fs::write(out, lines.join("\n")).unwrap();
}
