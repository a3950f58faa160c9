//! A lock, a rate limit and a session as Redis tutorials write them, done right on the cache's
//! connection (`examples/patterns.rs`), against a real `redis-server`; and
//! the tutorials' own lock release (a plain `DEL`), which frees another
//! holder's lock.

#[path = "../examples/patterns.rs"]
mod patterns;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_harness::{RedisServer, raw, raw_connection};
use cache_runtime::{Cache, CacheError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_is_held_by_one_caller_at_a_time() {
    let server = RedisServer::start();
    let cache = Arc::new(Cache::connect(&server.url()).await.unwrap());
    let inside = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let entries = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (cache, inside, most, entries) =
                (cache.clone(), inside.clone(), most.clone(), entries.clone());
            tokio::spawn(async move {
                for _ in 0..20 {
                    let held = loop {
                        if let Some(held) = patterns::lock(&cache, "job", Duration::from_secs(5))
                            .await
                            .unwrap()
                        {
                            break held;
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    };
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_micros(100)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    entries.fetch_add(1, Ordering::SeqCst);
                    assert!(held.release(&cache).await.unwrap());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    println!(
        "lock: {} entries by 16 callers, at most {} inside at once",
        entries.load(Ordering::SeqCst),
        most.load(Ordering::SeqCst)
    );
    assert_eq!(most.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_expired_holder_cannot_release_the_next_ones_lock() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let first = patterns::lock(&cache, "report", Duration::from_millis(50))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let second = patterns::lock(&cache, "report", Duration::from_secs(5))
        .await
        .unwrap()
        .expect("the first lock expired");
    assert!(
        !first.release(&cache).await.unwrap(),
        "not the first's any more"
    );
    assert!(
        patterns::lock(&cache, "report", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none(),
        "the second still holds it"
    );
    // The tutorials' release, a plain DEL, would have freed the second's lock.
    let mut conn = raw_connection(&server).await;
    let deleted: u64 = raw(&mut conn, &[b"DEL", b"lock:report"]).await;
    assert_eq!(deleted, 1, "the naive release deletes whoever holds it");
    drop(second);
}

#[tokio::test]
async fn a_rate_limit_allows_its_limit_per_window() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let window = Duration::from_millis(300);
    let mut allowed = 0;
    for _ in 0..12 {
        if patterns::allow(&cache, "client", 5, window).await.unwrap() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5);
    let mut conn = raw_connection(&server).await;
    let ttl: i64 = raw(&mut conn, &[b"PTTL", b"rate:client"]).await;
    assert!(ttl > 0 && ttl <= 300, "the window always expires: {ttl}");
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    assert!(
        patterns::allow(&cache, "client", 5, window).await.unwrap(),
        "a new window"
    );
}

#[tokio::test]
async fn a_session_keeps_its_fields_and_slides_its_expiry() {
    let server = RedisServer::start();
    let cache = Cache::connect(&server.url()).await.unwrap();
    let idle = Duration::from_millis(300);
    patterns::save_session(&cache, "s1", &[("user", "42"), ("theme", "dark")], idle)
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fields = patterns::load_session(&cache, "s1", idle).await.unwrap();
        assert_eq!(
            fields.get("user").map(String::as_str),
            Some("42"),
            "read within its idle time"
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        patterns::load_session(&cache, "s1", idle)
            .await
            .unwrap()
            .is_empty(),
        "expired"
    );
}

#[tokio::test]
async fn the_escape_hatch_fails_fast_without_redis() {
    let memory = Cache::memory();
    assert!(matches!(
        patterns::lock(&memory, "x", Duration::from_secs(1)).await,
        Err(CacheError::NotRedis)
    ));
    let mut server = RedisServer::start();
    let cache = Cache::builder()
        .url(server.url())
        .circuit_breaker(2, Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    server.stop();
    for _ in 0..2 {
        assert!(
            patterns::allow(&cache, "c", 1, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
    let started = std::time::Instant::now();
    assert!(matches!(
        patterns::allow(&cache, "c", 1, Duration::from_secs(1)).await,
        Err(CacheError::CircuitOpen)
    ));
    println!(
        "with the breaker open, a command fails in {:?}",
        started.elapsed()
    );
}
