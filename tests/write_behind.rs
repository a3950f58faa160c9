//! `#[write_behind]` and the flusher end to end, on a real `redis-server`
//! (and the shared cluster): reads see pending writes, per-key order,
//! batching, a database that fails for a while, a poison change, and
//! processes killed (`SIGKILL`) in the middle of a flush and of writes,
//! beside the tutorials' list queue, which loses the changes in flight.
//!
//! The `crash_worker` test does nothing unless `WRITE_BEHIND_WORKER` is
//! set: it is the worker process of the crash test.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_harness::{RedisCluster, RedisServer, Target, raw, raw_connection, wait_for};
use cache_runtime::{Cache, Change, WriteBehindError, WriteQueue, redis_cached, write_behind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Row {
    key: u64,
    seq: u64,
    text: String,
}

#[derive(Debug)]
enum DbError {
    Missing,
    Cache(WriteBehindError),
}

impl From<WriteBehindError> for DbError {
    fn from(error: WriteBehindError) -> Self {
        DbError::Cache(error)
    }
}

const ROWS: WriteQueue<Row> = WriteQueue::new("rows").shards(4);

/// A database in process memory, with a log of every flush.
#[derive(Default)]
struct Db {
    rows: Mutex<HashMap<u64, Row>>,
    reads: AtomicU64,
    /// Each flush's keys and seqs, in the order flushes ran.
    flushes: Mutex<Vec<Vec<(u64, u64)>>>,
    down: AtomicBool,
}

impl Db {
    fn flush(&self, changes: &[Change<Row>]) -> Result<(), String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("database down".into());
        }
        if changes.iter().any(|c| c.value.text == "poison") {
            return Err("constraint violated".into());
        }
        let mut rows = self.rows.lock().unwrap();
        for change in changes {
            rows.insert(change.value.key, change.value.clone());
        }
        self.flushes
            .lock()
            .unwrap()
            .push(changes.iter().map(|c| (c.value.key, c.value.seq)).collect());
        Ok(())
    }
}

struct Store {
    cache: Cache,
    db: Arc<Db>,
}

impl Store {
    #[redis_cached(key = "row:<key>", ttl = 60, cache = self.cache)]
    async fn get(&self, key: u64) -> Result<Row, DbError> {
        self.db.reads.fetch_add(1, Ordering::SeqCst);
        self.db
            .rows
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or(DbError::Missing)
    }

    #[write_behind(Self::get(key), queue = ROWS, cache = self.cache)]
    async fn save(&self, key: u64, seq: u64, text: &str) -> Result<Row, DbError> {
        Ok(Row {
            key,
            seq,
            text: text.to_owned(),
        })
    }
}

async fn store(target: &Target, prefix: &str) -> Store {
    let cache = target
        .builder()
        .prefix(format!("{prefix}-{}", std::process::id()))
        .op_timeout(Duration::from_secs(1))
        .replica_wait(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    Store {
        cache,
        db: Arc::new(Db::default()),
    }
}

fn spawn_flusher(store: &Store, coalesce: bool) -> cache_runtime::Flusher {
    let db = Arc::clone(&store.db);
    let builder = store
        .cache
        .flusher(&ROWS, move |changes: Vec<Change<Row>>| {
            let db = Arc::clone(&db);
            async move { db.flush(&changes) }
        })
        .batch(50)
        .lease(Duration::from_secs(3))
        .flush_timeout(Duration::from_secs(1))
        .max_attempts(3)
        .poll(Duration::from_millis(20));
    let builder = if coalesce {
        builder.coalesce()
    } else {
        builder
    };
    builder.spawn().unwrap()
}

async fn drained(store: &Store) {
    let done = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(50),
        async || {
            store
                .cache
                .write_queue_status(&ROWS)
                .await
                .is_ok_and(|s| s.pending == 0)
        },
    )
    .await;
    assert!(done.is_some(), "the queue did not drain in 60 s");
}

/// Writes are answered from the cache, read back at once (the entry has
/// no expiry while its change waits), flushed in batches in per-key order,
/// and the entries get their TTL back.
async fn writes_are_read_back_and_flushed_in_order(target: &Target, name: &str) {
    let store = store(target, name).await;
    let mut conn = target.raw().await;
    // Ten keys, twenty changes each, before any flusher runs.
    for seq in 1..=20 {
        for key in 0..10 {
            store.save(key, seq, &format!("v{seq}")).await.unwrap();
        }
    }
    let entry = store.cache.redis_key(&Store::get_cache_key(&3));
    let pttl: i64 = raw(&mut conn, &[b"PTTL", entry.as_bytes()]).await;
    assert_eq!(pttl, -1, "a pending entry has no expiry");
    for key in 0..10 {
        assert_eq!(store.get(key).await.unwrap().seq, 20);
    }
    assert_eq!(
        store.db.reads.load(Ordering::SeqCst),
        0,
        "reads came from the cache"
    );
    let status = store.cache.write_queue_status(&ROWS).await.unwrap();
    assert_eq!(status.pending, 200);
    assert!(status.oldest.is_some());
    let flusher = spawn_flusher(&store, false);
    drained(&store).await;
    flusher.stop().await;
    let rows = store.db.rows.lock().unwrap().clone();
    assert_eq!(rows.len(), 10);
    assert!(rows.values().all(|r| r.seq == 20), "{rows:?}");
    let flushes = store.db.flushes.lock().unwrap().clone();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for flush in &flushes {
        let mut keys: Vec<u64> = flush.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(
            keys.len(),
            flush.len(),
            "a batch held a key twice: {flush:?}"
        );
        for (key, seq) in flush {
            let before = last.insert(*key, *seq).unwrap_or(0);
            assert!(*seq > before, "key {key}: seq {seq} flushed after {before}");
        }
    }
    let pttl: i64 = raw(&mut conn, &[b"PTTL", entry.as_bytes()]).await;
    assert!(pttl > 0, "a flushed entry has its TTL back: {pttl}");
    let stats = store.cache.stats().write_behind["rows"];
    println!(
        "{name}: 200 changes of 10 keys, in order: {} flushes, {} batches counted; {} queued",
        flushes.len(),
        stats.batches,
        stats.queued
    );
    assert_eq!((stats.queued, stats.flushed), (200, 200));
    // Coalescing: one flush per key for the same writes.
    for seq in 21..=40 {
        for key in 0..10 {
            store.save(key, seq, &format!("v{seq}")).await.unwrap();
        }
    }
    let before = store.db.flushes.lock().unwrap().len();
    let flusher = spawn_flusher(&store, true);
    drained(&store).await;
    flusher.stop().await;
    let coalesced = store.db.flushes.lock().unwrap()[before..].concat();
    println!(
        "{name}: 200 more changes, coalesced: {} rows written",
        coalesced.len()
    );
    // Fewer rows written, each key's in order, ending at its last write.
    assert!(coalesced.len() < 200, "{}", coalesced.len());
    let mut last: HashMap<u64, u64> = HashMap::new();
    for (key, seq) in &coalesced {
        assert!(
            *seq > last.insert(*key, *seq).unwrap_or(20),
            "key {key} out of order"
        );
    }
    assert!(store.db.rows.lock().unwrap().values().all(|r| r.seq == 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_read_back_and_flushed_in_order_standalone() {
    let server = RedisServer::start();
    writes_are_read_back_and_flushed_in_order(&Target::server(&server), "wb-order").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_read_back_and_flushed_in_order_on_a_cluster() {
    let target = Target::cluster(RedisCluster::shared());
    writes_are_read_back_and_flushed_in_order(&target, "wb-order").await;
}

/// The database is down for a while: nothing is lost, nothing is
/// dead-lettered, the queue drains when it is back. A change that always
/// fails ends in the dead letters (its entry taken out of the cache)
/// while the others flow, and can be replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_database_loses_nothing_and_a_poison_change_is_dead_lettered() {
    let server = RedisServer::start();
    let target = Target::server(&server);
    let store = store(&target, "wb-fail").await;
    store.db.down.store(true, Ordering::SeqCst);
    let flusher = spawn_flusher(&store, false);
    for seq in 1..=5 {
        for key in 0..20 {
            store.save(key, seq, "ok").await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = store.cache.stats().write_behind["rows"];
    println!(
        "database down 2 s: {} failed flushes retried, {} dead letters",
        stats.retries, stats.dead_letters
    );
    assert!(stats.retries > 0);
    assert_eq!(
        stats.dead_letters, 0,
        "nothing is dead-lettered while nothing flushes"
    );
    assert_eq!(
        store.get(7).await.unwrap().seq,
        5,
        "reads see pending writes"
    );
    store.db.down.store(false, Ordering::SeqCst);
    store.save(100, 1, "poison").await.unwrap();
    for key in 0..20 {
        store.save(key, 6, "ok").await.unwrap();
    }
    drained(&store).await;
    flusher.stop().await;
    let rows = store.db.rows.lock().unwrap().clone();
    assert!((0..20).all(|key| rows.get(&key).is_some_and(|r| r.seq == 6)));
    assert!(!rows.contains_key(&100));
    let letters = store.cache.dead_letters("rows", 10).await.unwrap();
    println!(
        "poison change: dead-lettered after {} failures: {:?}",
        letters.first().map_or(0, |l| l.failures),
        letters.first().map(|l| &l.error)
    );
    assert_eq!(letters.len(), 1);
    assert!(letters[0].key.ends_with("row:100") && letters[0].failures >= 3);
    let entry = store.cache.redis_key(&Store::get_cache_key(&100));
    let mut conn = target.raw().await;
    let exists: i64 = raw(&mut conn, &[b"EXISTS", entry.as_bytes()]).await;
    assert_eq!(exists, 0, "a dead-lettered value is taken out of the cache");
    // The operator's tool shows it, and replays it. Replayed, it fails
    // again and goes back to the dead letters unless the database takes
    // it: here a fixed flush takes everything.
    let url = server.url();
    let prefix = format!("wb-fail-{}", std::process::id());
    let cachectl = async |args: &[&str]| {
        let mut argv = vec!["cachectl", "--url", &url, "--prefix", &prefix];
        argv.extend_from_slice(args);
        cache_cli::run(argv).await.expect("cachectl runs")
    };
    let shown = cachectl(&["dead-letters", "rows"]).await;
    println!("$ cachectl dead-letters rows\n{shown}");
    assert!(
        shown.starts_with("1 dead letter(s)")
            && shown.contains("row:100")
            && shown.contains("constraint violated")
    );
    let replayed = cachectl(&["replay", "rows"]).await;
    assert_eq!(replayed.trim(), "replayed 1 change(s) of queue rows");
    let db = Arc::clone(&store.db);
    let fixed = store
        .cache
        .flusher(&ROWS, move |changes: Vec<Change<Row>>| {
            let db = Arc::clone(&db);
            async move {
                let mut rows = db.rows.lock().unwrap();
                for change in changes {
                    rows.insert(change.value.key, change.value);
                }
                Ok::<_, String>(())
            }
        })
        .poll(Duration::from_millis(20))
        .spawn()
        .unwrap();
    drained(&store).await;
    fixed.stop().await;
    assert_eq!(store.db.rows.lock().unwrap()[&100].text, "poison");
    assert!(
        store
            .cache
            .dead_letters("rows", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A value written again (A, then B, then A): when the first A is
/// flushed, the entry, which holds the same bytes but for the third
/// change, keeps no expiry; it is settled only by its own change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_value_keeps_its_pending_entry() {
    let server = RedisServer::start();
    let target = Target::server(&server);
    let store = store(&target, "wb-repeat").await;
    store.save(500, 1, "A").await.unwrap();
    store.save(500, 1, "poison").await.unwrap(); // never flushes
    store.save(500, 1, "A").await.unwrap();
    let flusher = spawn_flusher(&store, false);
    let flushed = wait_for(
        Duration::from_secs(20),
        Duration::from_millis(20),
        async || store.db.rows.lock().unwrap().contains_key(&500),
    )
    .await;
    assert!(flushed.is_some(), "the first change was not flushed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry = store.cache.redis_key(&Store::get_cache_key(&500));
    let mut conn = target.raw().await;
    let pttl: i64 = raw(&mut conn, &[b"PTTL", entry.as_bytes()]).await;
    flusher.stop().await;
    println!("A, B (failing), A: after the first A's flush the entry's PTTL is {pttl}");
    assert_eq!(pttl, -1, "the pending third change's entry got an expiry");
    assert_eq!(store.get(500).await.unwrap().text, "A");
}

/// A write-behind write on a cache that cannot queue it fails, with the
/// cache's error: it is not written around the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_cache_cannot_queue_is_an_error() {
    let mut server = RedisServer::start();
    let store = store(&Target::server(&server), "wb-down").await;
    store.save(1, 1, "a").await.unwrap();
    server.stop();
    let failed = store.save(1, 2, "b").await;
    assert!(
        matches!(
            failed,
            Err(DbError::Cache(WriteBehindError::Unavailable(_)))
        ),
        "{failed:?}"
    );
}

/// The same on `Cache::memory()`: a service's tests run their
/// write-behind writes and flushers without Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_backend_queues_and_flushes_the_same_way() {
    let store = Store {
        cache: Cache::memory(),
        db: Arc::new(Db::default()),
    };
    for seq in 1..=5 {
        for key in 0..3 {
            store.save(key, seq, "ok").await.unwrap();
        }
    }
    store.save(9, 1, "poison").await.unwrap();
    assert_eq!(store.get(1).await.unwrap().seq, 5);
    assert_eq!(store.db.reads.load(Ordering::SeqCst), 0);
    let status = store.cache.write_queue_status(&ROWS).await.unwrap();
    assert_eq!(status.pending, 16);
    let flusher = spawn_flusher(&store, false);
    // Traffic goes on (key 3): a poison change is judged against flushes
    // that succeed after its first failure.
    let mut seq = 0;
    let done = wait_for(
        Duration::from_secs(30),
        Duration::from_millis(20),
        async || {
            seq += 1;
            store.save(3, seq, "ok").await.unwrap();
            store
                .cache
                .write_queue_status(&ROWS)
                .await
                .is_ok_and(|s| s.dead == 1)
        },
    )
    .await;
    assert!(
        done.is_some(),
        "the poison change was not dead-lettered: {:?}",
        store.cache.stats().write_behind
    );
    drained(&store).await;
    flusher.stop().await;
    let rows = store.db.rows.lock().unwrap().clone();
    assert!((0..3).all(|key| rows[&key].seq == 5) && !rows.contains_key(&9));
    let mut last: HashMap<u64, u64> = HashMap::new();
    for flush in store.db.flushes.lock().unwrap().iter() {
        for (key, seq) in flush {
            assert!(*seq > last.insert(*key, *seq).unwrap_or(0));
        }
    }
    let letters = store.cache.dead_letters("rows", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0].key.ends_with("row:9"));
    assert_eq!(store.cache.replay_dead_letters("rows").await.unwrap(), 1);
    let status = store.cache.write_queue_status(&ROWS).await.unwrap();
    assert_eq!((status.pending, status.dead), (1, 0));
}

// ---------------------------------------------------------------------
// Crash test: worker processes write and flush; two are killed.
// ---------------------------------------------------------------------

/// The database of the crash test: a second `redis-server`, shared by
/// the processes. A flush writes a row only if its version is newer
/// (`(millis, seq)` compared as numbers), and counts the changes it saw
/// again; every change it saw goes to the set `applied`.
const DB_FLUSH: &str = r"local dup = 0
for i = 1, #KEYS do
  local base = (i - 1) * 3
  redis.call('SADD', 'applied', KEYS[i] .. '=' .. ARGV[base + 1])
  local cur = redis.call('HMGET', KEYS[i], 'ms', 'sq')
  local ms, sq = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  if cur[1] and (tonumber(cur[1]) > ms or (tonumber(cur[1]) == ms and tonumber(cur[2]) >= sq)) then
    dup = dup + 1
  else
    redis.call('HSET', KEYS[i], 'value', ARGV[base + 1], 'ms', ms, 'sq', sq)
  end
end
redis.call('INCRBY', 'dups', dup)
return dup";

/// One flush of the crash test's changes into its database ([`DB_FLUSH`]).
async fn db_flush(
    db: &mut redis::aio::MultiplexedConnection,
    changes: &[Change<String>],
) -> Result<(), String> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(DB_FLUSH).arg(changes.len());
    for change in changes {
        cmd.arg(format!("row:{}", change.key));
    }
    for change in changes {
        cmd.arg(&change.value)
            .arg(change.version.millis)
            .arg(change.version.seq);
    }
    let _: i64 = cmd.query_async(db).await.map_err(|e| e.to_string())?;
    Ok(())
}

struct CrashWorker {
    cache: Cache,
}

impl CrashWorker {
    #[redis_cached(key = "crash:<key>", ttl = 60, cache = self.cache)]
    async fn get(&self, key: &str) -> Result<String, DbError> {
        let _ = key;
        Err(DbError::Missing)
    }

    #[write_behind(Self::get(key), queue = CRASH, cache = self.cache)]
    async fn set(&self, key: &str, value: String) -> Result<String, DbError> {
        Ok(value)
    }
}

const CRASH: WriteQueue<String> = WriteQueue::new("crash").shards(4);

/// A worker: `tasks` writers, each on keys of its own, appending
/// `invoke`/`ack` lines to its log; a flusher of `CRASH` into the
/// database (each flush takes 150 ms, and says so in `inflight`); and the
/// naive arm: the same writes pushed on a list (`LPUSH`), popped and
/// flushed by the same slow flush.
async fn crash_worker_run(config: &str) {
    let parts: Vec<&str> = config.split(' ').collect();
    let [target, db_url, log, id, prefix] = parts[..] else {
        panic!("WRITE_BEHIND_WORKER: {config}");
    };
    let target: Target = target.parse().unwrap();
    let cache = target
        .builder()
        .prefix(prefix)
        .op_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let db = redis::Client::open(db_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let worker = Arc::new(CrashWorker {
        cache: cache.clone(),
    });
    let flush_db = db.clone();
    let _flusher = cache
        .flusher(&CRASH, move |changes: Vec<Change<String>>| {
            let mut db = flush_db.clone();
            async move {
                let _: () = redis::cmd("SET")
                    .arg(format!("inflight:ours:{}", std::process::id()))
                    .arg(1)
                    .arg("PX")
                    .arg(1000)
                    .query_async(&mut db)
                    .await
                    .map_err(|e| e.to_string())?;
                db_flush(&mut db, &changes).await?;
                // Written and not yet acknowledged: a kill now makes the
                // next holder flush these changes again.
                tokio::time::sleep(Duration::from_millis(150)).await;
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(format!("inflight:ours:{}", std::process::id()))
                    .query_async(&mut db)
                    .await;
                Ok::<_, String>(())
            }
        })
        .batch(20)
        .lease(Duration::from_secs(2))
        .flush_timeout(Duration::from_millis(600))
        .poll(Duration::from_millis(20))
        .spawn()
        .unwrap();
    // The naive arm's flusher: RPOP a batch, flush it slowly.
    let mut naive_db = db.clone();
    tokio::spawn(async move {
        loop {
            let popped: Vec<String> = redis::cmd("RPOP")
                .arg("naive:queue")
                .arg(20)
                .query_async(&mut naive_db)
                .await
                .unwrap_or_default();
            if popped.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let _: Result<(), _> = redis::cmd("SET")
                .arg(format!("inflight:naive:{}", std::process::id()))
                .arg(1)
                .arg("PX")
                .arg(1000)
                .query_async(&mut naive_db)
                .await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            for change in popped {
                let _: Result<(), _> = redis::cmd("SADD")
                    .arg("naive:applied")
                    .arg(&change)
                    .query_async(&mut naive_db)
                    .await;
            }
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(format!("inflight:naive:{}", std::process::id()))
                .query_async(&mut naive_db)
                .await;
        }
    });
    let log = Arc::new(Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap(),
    ));
    // Each key's newest acknowledged value, for the readers' check.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    // Readers: a key of any writer task, read from the cache, must not be
    // older than its newest write acknowledged before the read began.
    // The same reads from the database (what a cache that dropped the
    // pending entry would serve) are the naive arm: they lag.
    for reader in 0..2u64 {
        let worker = Arc::clone(&worker);
        let log = Arc::clone(&log);
        let acked = Arc::clone(&acked);
        let mut db = db.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            for n in 0u64.. {
                let key = format!("{id}-{}-{}", (n * 7 + reader) % 8, n % 5);
                let before = acked.lock().unwrap().get(&key).copied();
                let read = worker.get(&key).await;
                if let (Some(before), Ok(read)) = (before, read)
                    && read.parse::<u64>().is_ok_and(|read| read < before)
                {
                    line(&log, format!("stale {key} {read}"));
                }
                line(&log, "read".to_owned());
                let row: Result<Option<String>, _> = redis::cmd("HGET")
                    .arg(format!("row:crash:{key}"))
                    .arg("value")
                    .query_async(&mut db)
                    .await;
                if let (Some(before), Ok(row)) = (before, row)
                    && row
                        .and_then(|r| r.parse::<u64>().ok())
                        .is_none_or(|row| row < before)
                {
                    line(&log, "stale-db".to_owned());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    let writers: Vec<_> = (0..8)
        .map(|task| {
            let worker = Arc::clone(&worker);
            let log = Arc::clone(&log);
            let acked = Arc::clone(&acked);
            let mut db = db.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                for n in 0u64.. {
                    let key = format!("{id}-{task}-{}", n % 5);
                    let value = format!("{n}");
                    line(&log, format!("invoke {key} {value}"));
                    match worker.set(&key, value.clone()).await {
                        Ok(_) => {
                            line(&log, format!("ack {key} {value}"));
                            acked.lock().unwrap().insert(key.clone(), n);
                            // Read your write, from the cache.
                            if let Ok(read) = worker.get(&key).await
                                && read != value
                            {
                                line(&log, format!("stale {key} {read}"));
                            }
                        }
                        Err(error) => {
                            line(&log, format!("fail {key} {value} {error:?}"));
                        }
                    }
                    // The naive arm: the tutorials' list queue.
                    let _: Result<(), _> = redis::cmd("LPUSH")
                        .arg("naive:queue")
                        .arg(format!("{key}={value}"))
                        .query_async(&mut db)
                        .await;
                    line(&log, format!("naive {key} {value}"));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
}

/// Appends one line to a worker's log in one `write` (a process killed
/// mid-line would leave half of one for the checker otherwise).
fn line(log: &Mutex<std::fs::File>, text: String) {
    log.lock()
        .unwrap()
        .write_all(format!("{text}\n").as_bytes())
        .unwrap();
}

/// A worker process of `killed_processes_lose_no_acknowledged_write_*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_worker() {
    let Ok(config) = std::env::var("WRITE_BEHIND_WORKER") else {
        return;
    };
    crash_worker_run(&config).await;
}

fn spawn_worker(
    target: &Target,
    db: &RedisServer,
    log: &std::path::Path,
    id: &str,
    prefix: &str,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_worker",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            "WRITE_BEHIND_WORKER",
            format!("{target} {} {} {id} {prefix}", db.url(), log.display()),
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigkill(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// What the logs say each key's database row must be: its last
/// acknowledged value, or a value written after it whose write did not
/// return (the process died, or it failed: it may have been queued);
/// every acknowledged change (`row:crash:<key>=<value>`); every change
/// pushed on the list (`<key>=<value>`); reads older than a write
/// acknowledged before they began, the readers' reads, and their reads of
/// the database that were older.
type Expected = (
    BTreeMap<String, (Option<u64>, Vec<u64>)>,
    Vec<String>,
    Vec<String>,
    (usize, usize, usize),
);

fn expected(logs: &[String]) -> Expected {
    let (mut stale, mut reads, mut stale_db) = (0, 0, 0);
    let mut ours: BTreeMap<String, (Option<u64>, Vec<u64>)> = BTreeMap::new();
    let (mut acked, mut naive) = (Vec::new(), Vec::new());
    for text in logs {
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            match parts[..] {
                ["invoke", key, value, ..] => {
                    let entry = ours.entry(key.to_owned()).or_default();
                    entry.1.extend(value.parse::<u64>().ok());
                }
                ["ack", key, value] => {
                    let Ok(value) = value.parse::<u64>() else {
                        continue;
                    };
                    let entry = ours.entry(key.to_owned()).or_default();
                    entry.0 = Some(value);
                    entry.1.retain(|v| *v > value);
                    acked.push(format!("row:crash:{key}={value}"));
                }
                ["stale", ..] => stale += 1,
                ["read"] => reads += 1,
                ["stale-db"] => stale_db += 1,
                ["naive", key, value] => naive.push(format!("{key}={value}")),
                _ => {}
            }
        }
    }
    (ours, acked, naive, (stale, reads, stale_db))
}

async fn wait_inflight(db: &mut redis::aio::MultiplexedConnection, arm: &str, pid: u32) -> bool {
    let key = format!("inflight:{arm}:{pid}");
    wait_for(
        Duration::from_secs(20),
        Duration::from_millis(5),
        async || raw::<i64>(db, &[b"EXISTS", key.as_bytes()]).await == 1,
    )
    .await
    .is_some()
}

async fn killed_processes_lose_no_acknowledged_write(target: &Target, name: &str) {
    let db = RedisServer::start();
    let prefix = format!("crash-{name}-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("wb-crash-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logs: Vec<_> = (0..3)
        .map(|i| dir.join(format!("worker-{i}.log")))
        .collect();
    let mut workers: Vec<_> = (0..3)
        .map(|i| spawn_worker(target, &db, &logs[i], &format!("w{i}"), &prefix))
        .collect();
    let mut conn = raw_connection(&db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A worker dies in the middle of a flush of ours (the one found
    // flushing; every worker flushes the list too, slowly).
    let pids: Vec<u32> = workers.iter().map(std::process::Child::id).collect();
    let mut flushing = None;
    wait_for(
        Duration::from_secs(20),
        Duration::from_millis(5),
        async || {
            for (i, pid) in pids.iter().enumerate() {
                let key = format!("inflight:ours:{pid}");
                if raw::<i64>(&mut conn, &[b"EXISTS", key.as_bytes()]).await == 1 {
                    flushing = Some(i);
                    return true;
                }
            }
            false
        },
    )
    .await;
    let first = flushing.unwrap_or(0);
    let naive = wait_inflight(&mut conn, "naive", pids[first]).await;
    sigkill(&mut workers[first]);
    println!(
        "{name}: worker {first} killed (in a flush of ours: {}, of the list's: {naive})",
        flushing.is_some()
    );
    // Another dies while it appends writes; the last one after.
    tokio::time::sleep(Duration::from_millis(700)).await;
    for (i, worker) in workers.iter_mut().enumerate() {
        if i != first {
            sigkill(worker);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Recovery: one process flushes what is left (the dead ones' shards
    // after their leases), and the list's remainder.
    let cache = target
        .builder()
        .prefix(prefix.as_str())
        .op_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let flush_db = conn.clone();
    let flusher = cache
        .flusher(&CRASH, move |changes: Vec<Change<String>>| {
            let mut db = flush_db.clone();
            async move {
                db_flush(&mut db, &changes).await?;
                Ok::<_, String>(())
            }
        })
        .poll(Duration::from_millis(20))
        .spawn()
        .unwrap();
    loop {
        let popped: Vec<String> = raw(&mut conn, &[b"RPOP", b"naive:queue", b"100"]).await;
        if popped.is_empty() {
            break;
        }
        for change in popped {
            let _: i64 = raw(&mut conn, &[b"SADD", b"naive:applied", change.as_bytes()]).await;
        }
    }
    let done = wait_for(
        Duration::from_secs(60),
        Duration::from_millis(100),
        async || {
            cache
                .write_queue_status(&CRASH)
                .await
                .is_ok_and(|s| s.pending == 0)
        },
    )
    .await;
    flusher.stop().await;
    assert!(done.is_some(), "{name}: changes stuck in the queue");
    let texts: Vec<String> = logs
        .iter()
        .map(|l| std::fs::read_to_string(l).unwrap_or_default())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    let (ours, acked_changes, naive, (stale, reads, stale_db)) = expected(&texts);
    let (mut wrong, mut acked_keys, mut pending_applied) = (Vec::new(), 0, 0);
    for (key, (acked, unreturned)) in &ours {
        let row: Option<String> = raw(
            &mut conn,
            &[b"HGET", format!("row:crash:{key}").as_bytes(), b"value"],
        )
        .await;
        let row: Option<u64> = row.map(|r| r.parse().unwrap());
        acked_keys += usize::from(acked.is_some());
        let fine = row == *acked || row.is_some_and(|r| unreturned.contains(&r));
        pending_applied += usize::from(row.is_some() && row != *acked && fine);
        if !fine {
            wrong.push((key.clone(), *acked, row));
        }
    }
    let dups: Option<u64> = raw(&mut conn, &[b"GET", b"dups"]).await;
    let applied: std::collections::HashSet<String> =
        raw::<Vec<String>>(&mut conn, &[b"SMEMBERS", b"applied"])
            .await
            .into_iter()
            .collect();
    let unflushed = acked_changes
        .iter()
        .filter(|c| !applied.contains(*c))
        .count();
    let naive_applied: std::collections::HashSet<String> =
        raw::<Vec<String>>(&mut conn, &[b"SMEMBERS", b"naive:applied"])
            .await
            .into_iter()
            .collect();
    let naive_lost = naive.iter().filter(|c| !naive_applied.contains(*c)).count();
    println!(
        "{name}: write-behind: {} keys, {acked_keys} with acknowledged writes, {} rows wrong, {pending_applied} rows hold a write that had not returned when its process died; {} changes flushed twice (harmless: versioned)",
        ours.len(),
        wrong.len(),
        dups.unwrap_or(0)
    );
    println!(
        "{name}: write-behind: {} acknowledged changes, {unflushed} never seen by a flush",
        acked_changes.len()
    );
    println!(
        "{name}: the tutorials' list queue: {} changes pushed, {naive_lost} never written (popped by a process that died)",
        naive.len()
    );
    println!(
        "{name}: history: {reads} reads of other tasks' keys and every write's read-back; {stale} older than a write acknowledged before the read began; the same keys read from the database: {stale_db} older"
    );
    assert!(
        stale_db > 0,
        "{name}: the database never lagged: the history check proves nothing"
    );
    assert_eq!(
        stale, 0,
        "{name}: a read was older than the write it followed"
    );
    assert!(
        wrong.is_empty(),
        "{name}: acknowledged writes lost: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    assert!(acked_keys > 0);
    assert_eq!(unflushed, 0, "{name}: acknowledged changes never flushed");
    assert!(
        naive_lost > 0,
        "{name}: the naive arm lost nothing: the kill missed its flush"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processes_lose_no_acknowledged_write_standalone() {
    let server = RedisServer::start();
    killed_processes_lose_no_acknowledged_write(&Target::server(&server), "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_processes_lose_no_acknowledged_write_on_a_cluster() {
    killed_processes_lose_no_acknowledged_write(
        &Target::cluster(RedisCluster::shared()),
        "cluster",
    )
    .await;
}
