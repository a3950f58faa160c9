//! The five everyday situations that broke the README's promises (a write
//! never leaves a stale value behind; Redis trouble never makes a service
//! worse), each reproduced on a real `redis-server` the way a user would hit
//! it. Each test prints the figure it measures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_harness::{RedisServer, raw, raw_connection, wait_for};
use cache_runtime::{Cache, invalidates, redis_cached};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

#[derive(Debug, PartialEq)]
struct DbError;

/// A table of versioned rows behind a cache. Reads can be held at a gate
/// after they have read the row, to place a write inside a computation.
struct Table {
    cache: Cache,
    rows: Arc<Mutex<HashMap<u64, Option<u64>>>>,
    reads: AtomicU64,
    gate: Notify,
    gated: Mutex<bool>,
    read_started: Notify,
}

impl Table {
    fn new(cache: Cache) -> Table {
        Table {
            cache,
            rows: Arc::default(),
            reads: AtomicU64::new(0),
            gate: Notify::new(),
            gated: Mutex::new(false),
            read_started: Notify::new(),
        }
    }

    /// The same rows behind another cache: another process's view.
    fn sharing_rows_with(cache: Cache, table: &Table) -> Table {
        Table {
            rows: table.rows.clone(),
            ..Table::new(cache)
        }
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Version 1 until written; `None` once deleted.
    fn version(&self, id: u64) -> Option<u64> {
        *self.rows.lock().unwrap().entry(id).or_insert(Some(1))
    }

    async fn read(&self, id: u64) -> Option<Row> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let version = self.version(id);
        let gated = *self.gated.lock().unwrap();
        if gated {
            self.read_started.notify_one();
            self.gate.notified().await;
        }
        version.map(|version| Row { id, version })
    }

    #[redis_cached(key = "row:<id>", ttl = 60, cache = self.cache)]
    async fn get(&self, id: u64) -> Result<Row, DbError> {
        self.read(id).await.ok_or(DbError)
    }

    #[redis_cached(key = "flight:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn get_coalesced(&self, id: u64) -> Result<Row, DbError> {
        self.read(id).await.ok_or(DbError)
    }

    #[redis_cached(key = "dist:<id>", ttl = 60, single_flight = "distributed", cache = self.cache)]
    async fn get_distributed(&self, id: u64) -> Result<Row, DbError> {
        self.read(id).await.ok_or(DbError)
    }

    #[redis_cached(key = "maybe:<id>", ttl = "300ms", stale = "30s", cache = self.cache)]
    async fn find(&self, id: u64) -> Option<Row> {
        self.read(id).await
    }

    #[redis_cached(key = "stale:<id>", ttl = "300ms", stale = "30s", cache = self.cache)]
    async fn get_stale(&self, id: u64) -> Result<Row, DbError> {
        self.read(id).await.ok_or(DbError)
    }

    #[invalidates(Self::get_coalesced(id), cache = self.cache)]
    async fn bump(&self, id: u64) -> Result<(), DbError> {
        let mut rows = self.rows.lock().unwrap();
        let version = rows.entry(id).or_insert(Some(1));
        *version = version.map(|v| v + 1);
        Ok(())
    }

    fn delete_row(&self, id: u64) {
        self.rows.lock().unwrap().insert(id, None);
    }
}

/// Calls `get(id)` every 20 ms until one is a hit; the time it took.
async fn time_to_first_hit(table: &Table, id: u64, limit: Duration) -> Option<Duration> {
    wait_for(limit, Duration::from_millis(20), async || {
        let hits = table.cache.stats().total.hits;
        let _ = table.get(id).await;
        table.cache.stats().total.hits > hits
    })
    .await
}

/// 1. Redis stalls, the breaker opens; after the cool-down the next call
///    is the probe, and a request timeout drops it while the probe is
///    pending. The cache must come back once Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_dropped_by_a_request_timeout_does_not_disable_the_cache() {
    let server = RedisServer::start();
    let cooldown = Duration::from_millis(300);
    let cache = Cache::builder()
        .url(server.url())
        .op_timeout(Duration::from_millis(100))
        .circuit_breaker(2, cooldown)
        .build()
        .await
        .unwrap();
    let table = Table::new(cache);
    table.get(1).await.unwrap();
    // Its store's reply in, before the server stops answering.
    table.cache.settled().await;

    server.freeze();
    for id in [2, 3] {
        table.get(id).await.unwrap(); // each waits out one op timeout
    }
    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    // The call that starts the probe, under the caller's 20 ms deadline:
    // dropped while the probe is pending, unless it no longer waits for it.
    let dropped = tokio::time::timeout(Duration::from_millis(20), table.get(1))
        .await
        .is_err();
    server.thaw();
    let thawed = Instant::now();

    let first_hit = time_to_first_hit(&table, 1, Duration::from_secs(3)).await;
    let stats = table.cache.stats().total;
    println!(
        "probe under a request timeout (the call that started it dropped: {dropped}): first hit \
         {:?} after Redis answered again (cool-down {cooldown:?}); bypasses {}",
        first_hit, stats.bypasses
    );
    let first_hit = first_hit.expect("the cache came back after the stall");
    assert!(
        thawed.elapsed() >= first_hit,
        "measured from the thaw: {first_hit:?}"
    );
    assert!(
        first_hit <= cooldown * 2 + Duration::from_millis(300),
        "within one cool-down and a probe: {first_hit:?}"
    );
}

/// 2. A lease write that timed out on the client lands on the server when
///    the pause ends; nobody releases it. With `single_flight =
///    "distributed"`, the next caller of that key (another process) waits
///    for the whole lease. Also when the caller is cancelled while taking
///    the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_write_that_timed_out_on_the_client_does_not_stall_its_key() {
    let server = RedisServer::start();
    let connect = || async {
        Cache::builder()
            .url(server.url())
            .op_timeout(Duration::from_millis(100))
            .lease(Duration::from_secs(10))
            .build()
            .await
            .unwrap()
    };
    let (first, second) = (Table::new(connect().await), Table::new(connect().await));
    let mut conn = raw_connection(&server).await;

    for (case, id, cancel) in [("timed out", 1, false), ("cancelled", 2, true)] {
        server.command("CLIENT PAUSE 400 WRITE").unwrap();
        if cancel {
            let call = first.get_distributed(id);
            let _ = tokio::time::timeout(Duration::from_millis(30), call).await;
        } else {
            first.get_distributed(id).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await; // the pause ends
        let left: Option<Vec<u8>> =
            raw(&mut conn, &[b"GET", format!("dist:{id}").as_bytes()]).await;
        let placeholder_left = left.is_some_and(|b| b.starts_with(b"\0lease:"));

        // Another process asks for the key.
        let started = Instant::now();
        let waited = tokio::time::timeout(Duration::from_secs(3), second.get_distributed(id)).await;
        let took = started.elapsed();
        println!(
            "lease write {case} under CLIENT PAUSE 400 WRITE: placeholder left after the pause: \
             {placeholder_left}; next caller in another process waited {took:?}{}",
            if waited.is_err() {
                " (gave up at 3 s)"
            } else {
                ""
            }
        );
        assert!(waited.is_ok(), "{case}: the next caller waited {took:?}");
        assert!(!placeholder_left, "{case}: the placeholder was compensated");
        assert!(took < Duration::from_millis(500), "{case}: {took:?}");
    }
}

/// 3. A reads the row and is still computing; a write updates the row and
///    its `#[invalidates]` returns; B calls after that. B must not be given
///    A's pre-write value, whether B is in A's process or another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_keeps_read_your_writes() {
    let server = RedisServer::start();
    let shared = Cache::connect(&server.url()).await.unwrap();
    let other_process = Cache::connect(&server.url()).await.unwrap();
    let table = Arc::new(Table::new(shared));
    let other = Table::sharing_rows_with(other_process, &table);

    for (case, id, writer) in [("same process", 1, &*table), ("another process", 2, &other)] {
        *table.gated.lock().unwrap() = true;
        let a = {
            let table = table.clone();
            tokio::spawn(async move { table.get_coalesced(id).await })
        };
        table.read_started.notified().await; // A has read version 1
        *table.gated.lock().unwrap() = false;
        // The write: the row changes, then the key is invalidated, through
        // this process's cache or another one's.
        writer.bump(id).await.unwrap();
        let b = {
            let table = table.clone();
            tokio::spawn(async move { table.get_coalesced(id).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await; // B has joined, if it joins
        table.gate.notify_one();
        let a = a.await.unwrap().unwrap();
        let b = b.await.unwrap().unwrap();
        println!(
            "single_flight, write from {case}: A (started before the write) got version {}, \
             B (started after it) got version {}",
            a.version, b.version
        );
        assert_eq!(a.version, 1);
        assert_eq!(b.version, 2, "{case}: B started after the write");
    }
}

/// 4. A `stale` refresh that answers `None` replaces the entry: calls after
///    it get `None`, not the old `Some`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_answers_none_replaces_the_entry() {
    let server = RedisServer::start();
    let table = Table::new(Cache::connect(&server.url()).await.unwrap());
    assert_eq!(table.find(1).await, Some(Row { id: 1, version: 1 }));
    tokio::time::sleep(Duration::from_millis(400)).await; // past the 300 ms TTL
    table.delete_row(1);
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(table.find(1).await);
    }
    let old = answers.iter().filter(|a| a.is_some()).count();
    println!(
        "stale refresh answered None: {old} of 5 calls after it got the old Some; reads {}",
        table.reads()
    );
    assert_eq!(old, 0, "{answers:?}");
}

/// 5. `Cache::memory()` stores a `stale` refresh like Redis does, so the
///    body runs once per refresh, not on every call after expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_backend_stores_stale_refreshes() {
    // Kept until the end of the test (and stopped then): a leaked server
    // outlived the test process.
    let server = RedisServer::start();
    for (name, cache) in [
        ("memory", Cache::memory()),
        ("redis", Cache::connect(&server.url()).await.unwrap()),
    ] {
        let table = Table::new(cache);
        table.get_stale(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await; // past the TTL
        for _ in 0..10 {
            table.get_stale(1).await.unwrap();
        }
        println!(
            "{name}: 1 call, then 10 calls after the TTL: {} body runs",
            table.reads()
        );
        assert_eq!(table.reads(), 2, "{name}: the first call and one refresh");
    }
}
