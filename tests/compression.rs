//! `CacheBuilder::compress_above`: large values are stored compressed
//! (lz4, self-describing), small ones as they are; caches with and without
//! compression read each other's entries; a corrupt or oversized
//! compressed entry is garbage that is recomputed and overwritten, never a
//! panic. On a real `redis-server`.

use std::sync::atomic::{AtomicU64, Ordering};

use cache_harness::{RedisServer, raw, raw_connection};
use cache_runtime::{Cache, redis_cached};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    id: u64,
    rows: Vec<String>,
}

struct Reports {
    cache: Cache,
    runs: AtomicU64,
}

impl Reports {
    #[redis_cached(key = "report:<id>:<rows>", ttl = 60, cache = self.cache)]
    async fn report(&self, id: u64, rows: usize) -> Report {
        let _ = rows;
        self.runs.fetch_add(1, Ordering::SeqCst);
        Report {
            id,
            rows: (0..rows)
                .map(|n| format!("row {n} of report {id}"))
                .collect(),
        }
    }
}

#[tokio::test]
async fn large_values_are_compressed_and_every_cache_reads_them() {
    let server = RedisServer::start();
    let compressing = Reports {
        cache: Cache::builder()
            .url(server.url())
            .compress_above(4096)
            .build()
            .await
            .unwrap(),
        runs: AtomicU64::new(0),
    };
    let plain = Reports {
        cache: Cache::connect(&server.url()).await.unwrap(),
        runs: AtomicU64::new(0),
    };
    let mut conn = raw_connection(&server).await;

    // A large value: compressed in Redis, the same value on a hit.
    let big = compressing.report(1, 1000).await;
    compressing.cache.settled().await;
    let stored: Vec<u8> = raw(&mut conn, &[b"GET", b"report:1:1000"]).await;
    let json = serde_json::to_vec(&big).unwrap();
    println!(
        "a {} B JSON value stored as {} B ({:.1}×)",
        json.len(),
        stored.len(),
        json.len() as f64 / stored.len() as f64
    );
    assert_eq!(stored[0], 3, "the compressed entry's mark");
    assert!(stored.len() < json.len() / 4);
    assert_eq!(compressing.report(1, 1000).await, big);
    // A cache without compression reads it too.
    assert_eq!(plain.report(1, 1000).await, big);
    assert_eq!(plain.runs.load(Ordering::SeqCst), 0, "a hit");

    // A small value stays readable JSON.
    compressing.report(2, 3).await;
    compressing.cache.settled().await;
    let stored: Vec<u8> = raw(&mut conn, &[b"GET", b"report:2:3"]).await;
    assert_eq!(stored[0], b'{', "readable in redis-cli");

    // An uncompressed large entry (written before compression was on) is
    // read by the compressing cache.
    let older = plain.report(3, 1000).await;
    plain.cache.settled().await;
    let stored: Vec<u8> = raw(&mut conn, &[b"GET", b"report:3:1000"]).await;
    assert_eq!(stored[0], b'{');
    let runs = compressing.runs.load(Ordering::SeqCst);
    assert_eq!(compressing.report(3, 1000).await, older);
    assert_eq!(compressing.runs.load(Ordering::SeqCst), runs, "a hit");

    // Garbage behind the mark, and a header claiming 4 GiB: recomputed
    // and overwritten, counted as errors.
    let mut bomb = vec![3u8];
    bomb.extend_from_slice(&u32::MAX.to_le_bytes());
    bomb.extend_from_slice(b"\x10ab");
    for (key, bytes) in [
        (&b"report:4:1000"[..], &b"\x03\x00\x10\x00\x00garbage"[..]),
        (b"report:5:1000", &bomb[..]),
    ] {
        raw::<()>(&mut conn, &[b"SET", key, bytes]).await;
    }
    let runs = compressing.runs.load(Ordering::SeqCst);
    compressing.report(4, 1000).await;
    compressing.report(5, 1000).await;
    compressing.cache.settled().await;
    assert_eq!(
        compressing.runs.load(Ordering::SeqCst),
        runs + 2,
        "recomputed"
    );
    let stats = compressing.cache.stats().total;
    assert!(stats.errors >= 2, "counted: {stats:?}");
    let stored: Vec<u8> = raw(&mut conn, &[b"GET", b"report:5:1000"]).await;
    assert_eq!(stored[0], 3, "overwritten with a good entry");
    assert_eq!(compressing.report(5, 1000).await.rows.len(), 1000);
}
