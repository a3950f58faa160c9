//! Sentinel and TLS deployments, real and local:
//!
//! - **Sentinel** (one primary, one replica, three sentinels): cached calls,
//!   invalidations and `#[cache_put]` through `Cache::builder().sentinel`,
//!   then `SENTINEL FAILOVER` under a mixed load of reads and writes,
//!   checked on recorded histories ([`cache_harness::history`]): no call
//!   fails, no read is stale, and the hits come back on the new primary.
//! - **TLS** with mutual authentication, on a standalone server and on a
//!   3+3 cluster (`--tls-cluster yes`): certificates made at test time; a
//!   cache without the client certificate is refused by the server and
//!   runs uncached (fail-open), never failing a call.
//! - The **local tier** (`local = "10s"`) through the failover: its copies
//!   are read on a tracking connection to the primary in use, dropped when
//!   the cache moves to another primary, and checked with the rest.
//! - **Sentinel over TLS with passwords**: a TLS-only Sentinel deployment
//!   whose nodes and sentinels require passwords, through a failover; a
//!   cache without the sentinels' password runs uncached.
//!
//! `SENTINEL_FAULT_SECONDS` sets the length of the load around the
//! failover (default 6 s).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache_harness::history::{self, Histories};
use cache_harness::{RedisCluster, RedisSentinel, Secured, TlsFiles, TlsServer};
use cache_runtime::{Cache, WriteDurability, cache_put, invalidates, redis_cached};
use serde::{Deserialize, Serialize};

const ROWS: u64 = 32;
const TASKS: usize = 16;
/// A call slower than this failed, as a service's request timeout would say.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const ARMS: [&str; 5] = ["row", "spread", "batch", "local", "tagged"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    id: u64,
    version: u64,
}

#[derive(Debug)]
struct DbError;

struct Store {
    cache: Cache,
    rows: Mutex<HashMap<u64, u64>>,
    histories: Histories,
    failed: AtomicU64,
    db_reads: AtomicU64,
}

impl Store {
    fn new(cache: Cache) -> Arc<Store> {
        Arc::new(Store {
            cache,
            rows: Mutex::new(HashMap::new()),
            histories: history::histories(&ARMS),
            failed: AtomicU64::new(0),
            db_reads: AtomicU64::new(0),
        })
    }

    async fn db_read(&self, id: u64) -> Row {
        let version = *self.rows.lock().unwrap().get(&id).unwrap_or(&0);
        self.db_reads.fetch_add(1, Ordering::Relaxed);
        if fastrand::bool() {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(..1_000))).await;
        }
        Row { id, version }
    }

    #[redis_cached(key = "row:<id>", ttl = 60, single_flight, cache = self.cache)]
    async fn row(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.db_read(id).await)
    }

    #[redis_cached(key = "spread:<id>", ttl = 60, stale = "30s", single_flight = "distributed", cache = self.cache)]
    async fn spread(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.db_read(id).await)
    }

    #[redis_cached(key = "batch:<ids>", ttl = 60, batch, cache = self.cache)]
    async fn batch(&self, ids: &[u64]) -> Result<HashMap<u64, Row>, DbError> {
        let mut rows = HashMap::new();
        for &id in ids {
            rows.insert(id, self.db_read(id).await);
        }
        Ok(rows)
    }

    /// With a local tier, kept right through the failover.
    #[redis_cached(key = "local:<id>", ttl = 60, local = "10s", single_flight, cache = self.cache)]
    async fn local(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.db_read(id).await)
    }

    /// Invalidated by its tag only.
    #[redis_cached(key = "tagged:<id>", ttl = 60, tags = ["row:<id>"], single_flight, cache = self.cache)]
    async fn tagged(&self, id: u64) -> Result<Row, DbError> {
        Ok(self.db_read(id).await)
    }

    #[invalidates(Self::row(id), Self::spread(id), Self::batch(id), Self::local(id), tag = "row:<id>", cache = self.cache)]
    async fn write(&self, id: u64) -> Result<u64, DbError> {
        let mut rows = self.rows.lock().unwrap();
        let version = rows.entry(id).or_insert(0);
        *version += 1;
        Ok(*version)
    }

    /// Writes the row and stores the new value (write-through).
    #[cache_put(Self::row(id), cache = self.cache)]
    async fn put(&self, id: u64) -> Result<Row, DbError> {
        let version = self.write_uncached(id);
        Ok(Row { id, version })
    }

    fn write_uncached(&self, id: u64) -> u64 {
        let mut rows = self.rows.lock().unwrap();
        let version = rows.entry(id).or_insert(0);
        *version += 1;
        *version
    }

    async fn read(&self, arm: &str, id: u64) -> Result<u64, DbError> {
        let row = match arm {
            "row" => self.row(id).await?,
            "spread" => self.spread(id).await?,
            "local" => self.local(id).await?,
            "tagged" => self.tagged(id).await?,
            _ => {
                let mut rows = self.batch(&[id, (id + 7) % ROWS]).await?;
                rows.remove(&id).ok_or(DbError)?
            }
        };
        Ok(row.version)
    }

    /// One random operation (a write one time in ten), recorded.
    async fn operate(&self) {
        let id = fastrand::u64(..ROWS);
        let arm: &'static str = if fastrand::u8(..10) == 0 {
            history::WRITES
        } else {
            ARMS[fastrand::usize(..ARMS.len())]
        };
        let done = history::run_recorded(&self.histories, arm, id, REQUEST_TIMEOUT, async {
            if arm == history::WRITES {
                self.write(id).await
            } else {
                self.read(arm, id).await
            }
        })
        .await;
        if !done {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Hits and calls of every function so far.
    fn served(&self) -> (u64, u64) {
        let stats = self.cache.stats();
        ARMS.iter().fold((0, 0), |(served, calls), arm| {
            let counts = stats
                .functions
                .iter()
                .find(|(name, _)| name.ends_with(arm))
                .map(|(_, c)| *c)
                .unwrap_or_default();
            (
                served + counts.hits + counts.local_hits + counts.stale_hits + counts.coalesced,
                calls + counts.calls(),
            )
        })
    }

    /// Stale reads in the history, and stale rows read at rest.
    async fn check(&self, phase: &str) -> (usize, usize) {
        let stale = history::check_arms(phase, &self.histories, &ARMS);
        let at_rest = history::stale_at_rest(
            phase,
            ROWS,
            &ARMS,
            |id| *self.rows.lock().unwrap().get(&id).unwrap_or(&0),
            async |arm, id| self.read(arm, id).await.unwrap_or(u64::MAX),
        )
        .await;
        println!(
            "{phase}: {at_rest} stale at rest; {} failed calls",
            self.failed.load(Ordering::Relaxed)
        );
        (stale, at_rest)
    }
}

fn phase_length() -> Duration {
    cache_harness::history::seconds_from_env("SENTINEL_FAULT_SECONDS", 6)
}

/// Cached calls, invalidations and a write-through on `store`'s cache:
/// the same outcomes as on one server.
async fn round_trips(store: &Store) {
    assert_eq!(store.row(1).await.unwrap().version, 0);
    assert_eq!(store.row(1).await.unwrap().version, 0);
    store.write(1).await.unwrap();
    assert_eq!(store.row(1).await.unwrap().version, 1, "read your write");
    let put = store.put(1).await.unwrap();
    assert_eq!(put.version, 2);
    let reads = store.db_reads.load(Ordering::Relaxed);
    assert_eq!(store.row(1).await.unwrap().version, 2, "the put's value");
    assert_eq!(
        store.db_reads.load(Ordering::Relaxed),
        reads,
        "served from the cache"
    );
    let rows = store.batch(&[1, 2, 3]).await.unwrap();
    assert_eq!(rows.len(), 3);
    let stats = store.cache.stats();
    let row = stats.function("row").unwrap();
    assert!(row.hits >= 2, "hits: {row:?}");
    assert_eq!(row.errors, 0, "no cache error: {row:?}");
}

/// What waiting for the replicas (the default) costs a write:
/// `Cache::invalidate` (a `DEL`, and with it a `WAIT 1` on a connection of
/// its own) against the primary with one replica, beside the opt-out
/// (`WriteDurability::PrimaryOnly`), the two arms interleaved. Printed,
/// not asserted.
async fn write_cost(deployment: &RedisSentinel) {
    let build = |durable: bool| {
        let builder = Cache::builder()
            .sentinel(RedisSentinel::SERVICE, deployment.sentinel_urls())
            .prefix("cost");
        let builder = if durable {
            builder
        } else {
            builder.write_durability(WriteDurability::PrimaryOnly)
        };
        builder.build()
    };
    let arms = [build(false).await.unwrap(), build(true).await.unwrap()];
    cache_harness::print_write_cost("Sentinel", &arms[0], &arms[1], |id| {
        Store::row_cache_key(&(id % ROWS))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_serves_the_primary_and_follows_a_failover_under_load() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_test_writer()
        .try_init();
    let deployment = Arc::new(RedisSentinel::start());
    let cache = Cache::builder()
        .sentinel(RedisSentinel::SERVICE, deployment.sentinel_urls())
        .prefix("sentinel")
        .build()
        .await
        .unwrap();
    let store = Store::new(cache.clone());
    round_trips(&store).await;
    // The same load through a cache without the fence (the replay of
    // recent invalidations on a new primary) and whose writes do not wait
    // for the replica, to show what the two prevent.
    let naive = Store::new(
        Cache::builder()
            .sentinel(RedisSentinel::SERVICE, deployment.sentinel_urls())
            .prefix("naive")
            .without_sentinel_fence()
            .write_durability(WriteDurability::PrimaryOnly)
            .build()
            .await
            .unwrap(),
    );
    write_cost(&deployment).await;
    let first = deployment.primary_port().unwrap();
    assert!(
        deployment
            .cli(first, &["EXISTS", "sentinel:row:1"])
            .is_some_and(|n| n == "1"),
        "the entry is on the primary Sentinel names"
    );

    // SENTINEL FAILOVER under load.
    let length = phase_length();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = if task % 2 == 0 { &store } else { &naive };
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    store.operate().await;
                }
            })
        })
        .collect();
    let sampler = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((Instant::now(), store.served()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        })
    };
    tokio::time::sleep(length / 3).await;
    let failover_at = Instant::now();
    let took = {
        let deployment = deployment.clone();
        tokio::task::spawn_blocking(move || deployment.failover(Duration::from_secs(30)))
            .await
            .unwrap()
    };
    let switched_at = failover_at + took;
    tokio::time::sleep(
        length
            .saturating_sub(length / 3 + took)
            .max(Duration::from_secs(2)),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let samples: Vec<(Instant, (u64, u64))> = sampler.await.unwrap();
    let second = deployment.primary_port().unwrap();
    assert_ne!(first, second, "the replica was promoted");

    // Hit ratio before, during and after; the longest stretch without a hit.
    let at = |t: Instant| {
        samples
            .iter()
            .rfind(|(when, _)| *when <= t)
            .or(samples.first())
            .map_or((0, 0), |(_, s)| *s)
    };
    let ratio = |from: Instant, to: Instant| {
        let ((s0, c0), (s1, c1)) = (at(from), at(to));
        let calls = c1.saturating_sub(c0);
        (
            if calls == 0 {
                0.0
            } else {
                (s1 - s0) as f64 * 100.0 / calls as f64
            },
            calls,
        )
    };
    let started = samples.first().map_or(failover_at, |(t, _)| *t);
    let ended = samples.last().map_or(switched_at, |(t, _)| *t);
    let (before, _) = ratio(started, failover_at);
    let (during, during_calls) = ratio(failover_at, switched_at);
    let (after, after_calls) = ratio(switched_at, ended);
    let longest_gap = samples
        .windows(2)
        .filter(|pair| pair[1].1.0 == pair[0].1.0)
        .map(|pair| pair[1].0 - pair[0].0)
        .fold(Duration::ZERO, |longest, gap| longest.max(gap));
    let resumed = samples
        .windows(2)
        .find(|pair| pair[1].0 > switched_at && pair[1].1.0 > pair[0].1.0)
        .map(|pair| pair[1].0.saturating_duration_since(switched_at));
    println!(
        "sentinel failover: primary {first} -> {second} in {:.2} s (SENTINEL FAILOVER until both \
         nodes report their new roles); hit ratio {before:.1} % before, {during:.1} % of \
         {during_calls} calls during, {after:.1} % of {after_calls} after; longest stretch \
         without a hit {:.0} ms; first hit {:?} after the switch",
        took.as_secs_f64(),
        longest_gap.as_secs_f64() * 1000.0,
        resumed,
    );
    let stats = store.cache.stats();
    println!(
        "sentinel failover: local tier {:?}; {} local hits",
        stats.local,
        stats.function("local").map_or(0, |c| c.local_hits)
    );
    assert!(
        stats.local.flushes >= 1,
        "moving to the new primary dropped every local copy"
    );
    let (stale, at_rest) = store.check("sentinel failover").await;
    let (naive_stale, _) = naive.check("sentinel failover, without the fence").await;
    assert_eq!(store.failed.load(Ordering::Relaxed), 0, "no call may fail");
    assert_eq!(naive.failed.load(Ordering::Relaxed), 0, "no call may fail");
    assert_eq!((stale, at_rest), (0, 0), "no stale value");
    assert!(
        naive_stale > 0,
        "without the fence and the wait for replicas, the invalidations the old primary took \
         during the failover are lost"
    );
    assert!(after > 20.0, "hits came back on the new primary: {after}");
    assert!(
        deployment
            .cli(second, &["DBSIZE"])
            .is_some_and(|n| n != "0"),
        "the cache writes to the new primary"
    );
}

/// A cache from `builder` that trusts `ca` and presents `client`'s
/// certificate if given.
async fn over_tls(
    builder: cache_runtime::CacheBuilder,
    ca: &TlsFiles,
    client: Option<&TlsFiles>,
) -> Cache {
    let builder = builder.tls_root_certificate(ca.ca_pem());
    let builder = match client {
        Some(tls) => builder.tls_client_certificate(tls.client_cert_pem(), tls.client_key_pem()),
        None => builder,
    };
    builder.build().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_a_standalone_server_and_fail_open_without_a_client_certificate() {
    let tls = TlsFiles::generate();
    let server = TlsServer::start(&tls);
    let cache = over_tls(Cache::builder().url(server.url()), &tls, Some(&tls)).await;
    let store = Store::new(cache);
    round_trips(&store).await;
    assert_eq!(
        server.cli(&["EXISTS", "row:1"]).as_deref(),
        Some("1"),
        "stored over TLS"
    );
    println!("tls standalone: {:?}", store.cache.stats().function("row"));

    // The server requires a client certificate: without one the handshake
    // fails, and calls run uncached instead of failing.
    let refused = over_tls(Cache::builder().url(server.url()), &tls, None).await;
    let store = Store::new(refused);
    for _ in 0..3 {
        assert_eq!(store.row(9).await.unwrap().version, 0);
    }
    let row = store.cache.stats().function("row").unwrap();
    println!("tls without a client certificate: {row:?}");
    assert_eq!(row.hits, 0, "never served from the cache");
    assert_eq!(store.db_reads.load(Ordering::Relaxed), 3, "every call ran");

    // A CA that did not sign the server's certificate is refused too.
    let other = TlsFiles::generate();
    let untrusted = over_tls(Cache::builder().url(server.url()), &other, Some(&tls)).await;
    let store = Store::new(untrusted);
    assert_eq!(store.row(9).await.unwrap().version, 0);
    assert_eq!(store.cache.stats().function("row").unwrap().hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_a_cluster() {
    let tls = TlsFiles::generate();
    let cluster = RedisCluster::start_tls(&tls);
    let started = Instant::now();
    let cache = over_tls(Cache::builder().cluster(cluster.seeds()), &tls, Some(&tls)).await;
    // `build` reads the slot map and connects to every primary (TLS
    // handshakes included), so that the first calls are served.
    println!(
        "tls cluster: build took {:?} (slot map, TLS to every primary)",
        started.elapsed()
    );
    let store = Store::new(cache);
    round_trips(&store).await;
    // Keys on every shard: a batch of 24 rows spans the three primaries.
    let ids: Vec<u64> = (0..24).collect();
    assert_eq!(store.batch(&ids).await.unwrap().len(), 24);
    let reads = store.db_reads.load(Ordering::Relaxed);
    assert_eq!(store.batch(&ids).await.unwrap().len(), 24);
    assert_eq!(
        store.db_reads.load(Ordering::Relaxed),
        reads,
        "the second batch is all hits, from every shard over TLS"
    );
    println!("tls cluster: {:?}", store.cache.stats().function("batch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_over_tls_with_passwords_follows_a_failover() {
    const NODES: &str = "node-secret";
    const SENTINELS: &str = "sentinel-secret";
    let tls = TlsFiles::generate();
    let deployment = RedisSentinel::start_secured(Secured {
        tls: &tls,
        node_password: NODES,
        sentinel_password: SENTINELS,
    });
    // The nodes' password rides in the URLs; the sentinels' is separate.
    let urls: Vec<String> = deployment
        .sentinel_urls()
        .iter()
        .map(|url| url.replace("rediss://", &format!("rediss://:{NODES}@")))
        .collect();
    assert!(urls[0].starts_with("rediss://"), "{urls:?}");
    let secured = |password: Option<&str>| {
        let builder = Cache::builder().sentinel(RedisSentinel::SERVICE, urls.clone());
        match password {
            Some(password) => builder.sentinel_password(password),
            None => builder,
        }
    };
    let store = Store::new(over_tls(secured(Some(SENTINELS)), &tls, Some(&tls)).await);
    round_trips(&store).await;
    println!(
        "sentinel over TLS with passwords: {:?}",
        store.cache.stats().function("row")
    );

    let took = tokio::task::block_in_place(|| deployment.failover(Duration::from_secs(30)));
    println!("sentinel over TLS: SENTINEL FAILOVER took {took:?}");
    // Writes and hits go on, on the new primary, over TLS.
    store.write(1).await.unwrap();
    let written = store.rows.lock().unwrap()[&1];
    let hits_before = store.cache.stats().function("row").unwrap().hits;
    let started = Instant::now();
    loop {
        assert_eq!(
            store.row(1).await.unwrap().version,
            written,
            "read your write"
        );
        if store.cache.stats().function("row").unwrap().hits > hits_before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no hit on the new primary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "sentinel over TLS: hits again {:?} after the failover",
        started.elapsed()
    );

    // Sentinels asked without their password, or with a wrong one, refuse:
    // calls run uncached.
    for password in [None, Some("wrong")] {
        let refused = Store::new(over_tls(secured(password), &tls, Some(&tls)).await);
        for _ in 0..3 {
            refused.row(9).await.unwrap();
        }
        let row = refused.cache.stats().function("row").unwrap();
        println!("sentinel password {password:?}: {row:?}");
        assert_eq!(row.hits, 0, "never served from the cache");
        assert_eq!(
            refused.db_reads.load(Ordering::Relaxed),
            3,
            "every call ran"
        );
    }
}
