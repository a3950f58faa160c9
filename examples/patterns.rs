//! Three Redis patterns as tutorials teach them, done right, on the cache's own
//! connection (`Cache::command`, which fails fast while the cache's
//! circuit breaker is open and is bounded by its op timeout):
//!
//! - a **lock**: `SET key token NX PX ttl` in one command (the tutorials'
//!   `SETNX` then `EXPIRE` leaves a lock without expiry if the process dies
//!   between them), released by a compare-and-delete script, so a holder
//!   whose lock expired cannot release the next holder's;
//! - a **rate limit** (fixed window): `INCR` and `PEXPIRE ... NX` in one
//!   `MULTI`, so a window always expires, and a caller never sees a
//!   counter without one;
//! - a **session**: the fields (`HSET`) and the expiry (`PEXPIRE`) in one
//!   `MULTI`, and a read that slides the expiry.
//!
//! ```text
//! cargo run --example patterns
//! ```
//! `tests/patterns.rs` runs each against a real `redis-server`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use cache_runtime::{Cache, CacheError, redis};

/// A lock held until [`Lock::release`] or its expiry.
#[derive(Debug)]
pub struct Lock {
    key: String,
    token: String,
}

/// Takes the lock `name` for at most `ttl`, if no one holds it.
pub async fn lock(cache: &Cache, name: &str, ttl: Duration) -> Result<Option<Lock>, CacheError> {
    let key = format!("lock:{name}");
    // Unique to this holder: two `RandomState`s never share their keys.
    let token = format!(
        "{:016x}{:016x}",
        RandomState::new().hash_one(&key),
        RandomState::new().hash_one(&key)
    );
    let taken: Option<String> = cache
        .command(
            redis::cmd("SET")
                .arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64),
        )
        .await?;
    Ok(taken.map(|_| Lock { key, token }))
}

impl Lock {
    /// Gives the lock back if it is still this holder's; whether it was.
    pub async fn release(self, cache: &Cache) -> Result<bool, CacheError> {
        const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
        let released: i64 = cache
            .command(
                redis::cmd("EVAL")
                    .arg(RELEASE)
                    .arg(1)
                    .arg(&self.key)
                    .arg(&self.token),
            )
            .await?;
        Ok(released == 1)
    }
}

/// Whether one more call of `who` is allowed in the current window of
/// `window`, at most `limit` calls per window.
pub async fn allow(
    cache: &Cache,
    who: &str,
    limit: u64,
    window: Duration,
) -> Result<bool, CacheError> {
    let key = format!("rate:{who}");
    let (count, _): (u64, i64) = cache
        .pipeline(
            redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(&key)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(window.as_millis().max(1) as u64)
                .arg("NX"),
        )
        .await?;
    Ok(count <= limit)
}

/// Stores a session's fields, expiring after `idle` without a read.
pub async fn save_session(
    cache: &Cache,
    id: &str,
    fields: &[(&str, &str)],
    idle: Duration,
) -> Result<(), CacheError> {
    let key = format!("session:{id}");
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("DEL").arg(&key).ignore();
    pipe.cmd("HSET").arg(&key);
    for (field, value) in fields {
        pipe.arg(*field).arg(*value);
    }
    pipe.ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(idle.as_millis().max(1) as u64)
        .ignore();
    cache.pipeline::<()>(&pipe).await
}

/// A session's fields (empty if it expired), and its expiry pushed back
/// by `idle`.
pub async fn load_session(
    cache: &Cache,
    id: &str,
    idle: Duration,
) -> Result<HashMap<String, String>, CacheError> {
    let key = format!("session:{id}");
    let (fields, _): (HashMap<String, String>, i64) = cache
        .pipeline(
            redis::pipe()
                .atomic()
                .cmd("HGETALL")
                .arg(&key)
                .cmd("PEXPIRE")
                .arg(&key)
                .arg(idle.as_millis().max(1) as u64),
        )
        .await?;
    Ok(fields)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let backend = cache_examples::example_backend().await?;
    let Some(url) = backend.url else {
        println!("these patterns need Redis: {}", backend.description);
        return Ok(());
    };
    let cache = Cache::builder().url(url).prefix("patterns").build().await?;

    let held = lock(&cache, "nightly-report", Duration::from_secs(10)).await?;
    let second = lock(&cache, "nightly-report", Duration::from_secs(10)).await?;
    println!(
        "lock: first caller {}, second {}",
        held.is_some(),
        second.is_some()
    );
    if let Some(held) = held {
        println!("released: {}", held.release(&cache).await?);
    }

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let cache = cache.clone();
        calls.spawn(async move { allow(&cache, "client-42", 5, Duration::from_secs(1)).await });
    }
    let allowed = calls
        .join_all()
        .await
        .into_iter()
        .filter(|a| matches!(a, Ok(true)))
        .count();
    println!("rate limit: {allowed} of 8 calls allowed (5 per second)");

    save_session(
        &cache,
        "s1",
        &[("user", "42"), ("theme", "dark")],
        Duration::from_secs(1800),
    )
    .await?;
    println!(
        "session: {:?}",
        load_session(&cache, "s1", Duration::from_secs(1800)).await?
    );
    Ok(())
}
