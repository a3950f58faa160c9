//! The `Cache` handle: backend, prefix, timeouts, circuit breaker, codec and
//! statistics, and the cache-aside lookup that generated code runs.

use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::backend::{Backend, MemoryBackend, RedisBackend};
use crate::breaker::{Breaker, Permit};
use crate::codec::Codec;
use crate::error::CacheError;
use crate::key::CacheKey;
use crate::lease::{self, Lease, Stored};
use crate::outcome::Outcome;
use crate::site::Site;
use crate::stats::{Event, Recorder, Stats};

const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(100);
const DEFAULT_BREAKER_FAILURES: u32 = 5;
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
const DEFAULT_MEMORY_CAPACITY: u64 = 256 * 1024 * 1024;
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Pauses between background retries of a failed invalidation (7.7 s in all,
/// past the circuit breaker's default cool-down).
const INVALIDATION_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

static INSTALLED: RwLock<Option<Cache>> = RwLock::new(None);

/// A handle to a cache: Redis or in-process memory. Cheap to clone; clones
/// share the connection, the circuit breaker and the statistics.
///
/// ```
/// # #[tokio::main] async fn main() -> Result<(), cache_runtime::CacheError> {
/// use cache_runtime::Cache;
///
/// // `Cache::connect("redis://127.0.0.1:6379").await?` for Redis.
/// let cache = Cache::memory();
/// cache.install(); // the default for every #[redis_cached] function
/// assert_eq!(cache.stats().total.hits, 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Cache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Backend,
    prefix: Option<String>,
    op_timeout: Duration,
    lease: Duration,
    codec: Codec,
    breaker: Breaker,
    stats: Recorder,
}

/// Configures a [`Cache`]; from [`Cache::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct CacheBuilder {
    backend: Option<BackendChoice>,
    prefix: Option<String>,
    op_timeout: Duration,
    lease: Duration,
    codec: Codec,
    breaker_failures: u32,
    breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
enum BackendChoice {
    Url(String),
    Memory { capacity_bytes: u64 },
}

impl CacheBuilder {
    /// Use the Redis server at `url` (`redis://[user:password@]host:port[/db]`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.backend = Some(BackendChoice::Url(url.into()));
        self
    }

    /// Keep entries in this process (moka), bounded to 256 MiB.
    pub fn memory(self) -> Self {
        self.memory_capacity(DEFAULT_MEMORY_CAPACITY)
    }

    /// Keep entries in this process, bounded to `bytes` (keys and values);
    /// the least recently used are evicted past it.
    pub fn memory_capacity(mut self, bytes: u64) -> Self {
        self.backend = Some(BackendChoice::Memory {
            capacity_bytes: bytes,
        });
        self
    }

    /// Prepend `prefix:` to every key, e.g. to share one Redis between services.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// How long one cache operation may take before the call gives up on the
    /// cache and runs uncached. Default 100 ms.
    pub fn op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// How long a miss holds the key's lease while it computes the value.
    /// A value computed for longer is not stored; a caller that crashed
    /// blocks storing for at most this long. Default 10 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How values are encoded. Default [`Codec::Json`].
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// After `failures` consecutive failed operations, skip the cache for
    /// `cooldown`, then let one call probe it. Default 5 failures, 1 s.
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Builds the cache. Fails only on bad configuration (a malformed URL, a
    /// prefix with spaces): a Redis server that is down is not an error; calls
    /// run uncached until it is reachable. Call inside a Tokio runtime.
    pub async fn build(mut self) -> Result<Cache, CacheError> {
        if let Some(prefix) = &self.prefix
            && (prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(CacheError::InvalidPrefix(prefix.clone()));
        }
        let breaker = self.breaker();
        let backend = match self.backend.take() {
            None => return Err(CacheError::NoBackend),
            Some(BackendChoice::Memory { capacity_bytes }) => {
                Backend::Memory(MemoryBackend::new(capacity_bytes))
            }
            Some(BackendChoice::Url(url)) => {
                let redis = RedisBackend::new(&url)?;
                // Connect now so that the first calls are served, but never
                // fail start-up on it.
                let first_contact = self.op_timeout.max(Duration::from_millis(500));
                match tokio::time::timeout(first_contact, redis.ping()).await {
                    Ok(Ok(())) => tracing::debug!("connected to Redis"),
                    outcome => {
                        let reason = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {first_contact:?}"),
                        };
                        tracing::warn!(%reason, "Redis is not reachable yet; calls run uncached until it is");
                        breaker.record_failure(true);
                    }
                }
                Backend::Redis(redis)
            }
        };
        Ok(self.assemble(backend, breaker))
    }

    fn breaker(&self) -> Breaker {
        Breaker::new(self.breaker_failures, self.breaker_cooldown)
    }

    fn assemble(self, backend: Backend, breaker: Breaker) -> Cache {
        Cache {
            inner: Arc::new(Inner {
                backend,
                prefix: self.prefix,
                op_timeout: self.op_timeout,
                lease: self.lease,
                codec: self.codec,
                breaker,
                stats: Recorder::default(),
            }),
        }
    }
}

impl Cache {
    /// Connects to Redis with the defaults (100 ms op timeout, JSON, no
    /// prefix). Fails only on a malformed URL; see [`CacheBuilder::build`].
    pub async fn connect(url: &str) -> Result<Cache, CacheError> {
        Cache::builder().url(url).build().await
    }

    /// A builder for a cache with non-default settings.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            backend: None,
            prefix: None,
            op_timeout: DEFAULT_OP_TIMEOUT,
            lease: DEFAULT_LEASE,
            codec: Codec::default(),
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
        }
    }

    /// An in-process cache (256 MiB) with the same TTL semantics as Redis,
    /// for tests and single-process services.
    pub fn memory() -> Cache {
        let builder = Cache::builder();
        let breaker = builder.breaker();
        builder.assemble(
            Backend::Memory(MemoryBackend::new(DEFAULT_MEMORY_CAPACITY)),
            breaker,
        )
    }

    /// Makes this cache the process-wide default of `#[redis_cached]`
    /// functions that have no `cache = ...` argument, replacing any cache
    /// installed before.
    pub fn install(&self) {
        *INSTALLED.write().unwrap_or_else(PoisonError::into_inner) = Some(self.clone());
    }

    /// The installed cache, if any.
    pub fn installed() -> Option<Cache> {
        INSTALLED
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Deletes a key, e.g. `cache.invalidate(&get_user_cache_key(&42))`,
    /// including a lease placeholder, so that a value being computed from
    /// data read before now is not stored. Returns whether an entry was there.
    pub async fn invalidate<V>(&self, key: &CacheKey<V>) -> Result<bool, CacheError> {
        let redis_key = self.redis_key(key);
        let permit = self.inner.breaker.permit();
        if permit == Permit::Skip {
            self.inner.stats.record(None, Event::Bypass);
            return Err(CacheError::CircuitOpen);
        }
        let deleted = self
            .guarded(
                permit,
                self.inner.backend.delete(std::slice::from_ref(&redis_key)),
            )
            .await;
        match &deleted {
            Ok(_) => self.inner.stats.record(None, Event::Invalidation),
            Err(e) => {
                self.inner.stats.record(None, Event::Error);
                tracing::warn!(key = %redis_key, error = %e, "cache invalidation failed");
            }
        }
        deleted.map(|n| n > 0)
    }

    /// A snapshot of the counters, in total and per function.
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    /// The key as stored in Redis: `prefix:key`, or the key itself.
    pub fn redis_key<V>(&self, key: &CacheKey<V>) -> String {
        match &self.inner.prefix {
            Some(prefix) => format!("{prefix}:{key}"),
            None => key.as_str().to_owned(),
        }
    }

    /// The codec values are stored with.
    pub fn codec(&self) -> Codec {
        self.inner.codec
    }

    /// Runs a backend operation under the op timeout and feeds the circuit
    /// breaker. Only unavailability (I/O, timeout) counts against Redis; an
    /// error reply such as `OOM` or `WRONGTYPE` does not.
    async fn guarded<T>(
        &self,
        permit: Permit,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        // The memory backend cannot stall, and needs no Tokio timer.
        let outcome = if matches!(inner.backend, Backend::Memory(_)) {
            operation.await
        } else {
            match tokio::time::timeout(inner.op_timeout, operation).await {
                Ok(outcome) => outcome,
                Err(_) => Err(CacheError::Timeout(inner.op_timeout)),
            }
        };
        let unavailable = match &outcome {
            Ok(_) => false,
            Err(CacheError::Timeout(_)) => true,
            Err(CacheError::Redis(e)) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
            }
            Err(_) => false,
        };
        if unavailable {
            if inner.breaker.record_failure(permit == Permit::Probe) {
                tracing::warn!(
                    "cache unavailable: skipping it for a moment (circuit breaker open); calls run uncached"
                );
            }
        } else {
            inner.breaker.record_success();
        }
        outcome
    }

    /// Cache-aside with a lease: `GET`; on a hit decode and return. On a miss
    /// take the lease, run `body`, and store what it returns only if no write
    /// invalidated the key meanwhile (see [`crate::lease`]). Any cache
    /// failure runs `body` and is counted, never returned.
    pub(crate) async fn get_or_compute<S, R, F>(
        &self,
        site: &'static Site,
        redis_key: String,
        body: F,
    ) -> R
    where
        S: Outcome<R>,
        F: Future<Output = R>,
    {
        let inner = &*self.inner;
        let permit = inner.breaker.permit();
        if permit == Permit::Skip {
            inner.stats.record(Some(site), Event::Bypass);
            return body.await;
        }
        let claim = match self.guarded(permit, inner.backend.get(&redis_key)).await {
            Ok(Some(bytes)) => match lease::inspect(&bytes) {
                Stored::Value => match inner.codec.decode::<S::Value>(&bytes) {
                    Ok(value) => {
                        inner.stats.record(Some(site), Event::Hit);
                        return S::from_hit(value);
                    }
                    Err(error) => {
                        inner.stats.record(Some(site), Event::Error);
                        tracing::warn!(key = %redis_key, %error, "undecodable cache entry: recomputing and overwriting it");
                        Claim::Overwrite
                    }
                },
                // Someone else holds the lease and will store the value.
                Stored::Leased => Claim::Nothing,
                Stored::Stray => {
                    inner.stats.record(Some(site), Event::Error);
                    tracing::warn!(key = %redis_key, "stray lease placeholder without expiry: recomputing and overwriting it");
                    Claim::Overwrite
                }
            },
            Ok(None) => Claim::IfAbsent,
            Err(error) if is_unavailability(&error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache read failed: running uncached");
                return body.await;
            }
            // An error reply about this key (e.g. WRONGTYPE: someone stored a
            // list there) is bad data like an undecodable value: overwrite it.
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key = %redis_key, %error, "unreadable cache entry: recomputing and overwriting it");
                Claim::Overwrite
            }
        };
        inner.stats.record(Some(site), Event::Miss);
        let lease = self.take_lease(site, &redis_key, claim).await;
        // Gives the lease back if `body` panics or the call is cancelled, so
        // that other callers can store the value before the lease expires.
        let mut held = HeldLease {
            cache: self,
            key: &redis_key,
            lease,
        };
        let result = body.await;
        if let Some(lease) = held.lease.take() {
            match S::cacheable(&result) {
                Some(value) => self.store_leased(site, &redis_key, &lease, value).await,
                None => self.release(&redis_key, &lease).await,
            }
        }
        result
    }

    /// Writes a lease placeholder; `None` when another caller holds the key
    /// or the cache failed (then the value is computed but not stored).
    async fn take_lease(
        &self,
        site: &'static Site,
        redis_key: &str,
        claim: Claim,
    ) -> Option<Lease> {
        let inner = &*self.inner;
        let lease = Lease::new(inner.lease);
        let lease_millis = duration_millis(inner.lease);
        let permit = inner.breaker.permit();
        let taken = match claim {
            Claim::Nothing => return None,
            _ if permit == Permit::Skip => return None,
            Claim::IfAbsent => {
                let set = inner
                    .backend
                    .set_if_absent(redis_key, lease.placeholder(), lease_millis);
                self.guarded(permit, set).await
            }
            Claim::Overwrite => {
                let set = inner
                    .backend
                    .set(redis_key, lease.placeholder().to_vec(), lease_millis);
                self.guarded(permit, set).await.map(|()| true)
            }
        };
        match taken {
            Ok(true) => Some(lease),
            // A value or another caller's lease arrived since the `GET`.
            Ok(false) => None,
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache lease failed: the value will not be stored");
                None
            }
        }
    }

    /// Replaces the caller's placeholder with the value, unless a write
    /// deleted or replaced it meanwhile.
    async fn store_leased<V: Serialize>(
        &self,
        site: &'static Site,
        redis_key: &str,
        lease: &Lease,
        value: &V,
    ) {
        let inner = &*self.inner;
        let bytes = match inner.codec.encode(value) {
            Ok(bytes) => bytes,
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache value could not be encoded");
                self.release(redis_key, lease).await;
                return;
            }
        };
        let permit = inner.breaker.permit();
        if permit == Permit::Skip {
            inner.stats.record(Some(site), Event::Bypass);
            return;
        }
        let set =
            inner
                .backend
                .compare_and_set(redis_key, lease.placeholder(), bytes, site.ttl_millis());
        match self.guarded(permit, set).await {
            Ok(true) => inner.stats.record(Some(site), Event::Set),
            Ok(false) => {
                inner.stats.record(Some(site), Event::DroppedSet);
                tracing::debug!(key = %redis_key, "key invalidated while computing: value not stored");
            }
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache write failed");
            }
        }
    }

    /// Gives a lease back: deletes the caller's placeholder, if still there.
    async fn release(&self, redis_key: &str, lease: &Lease) {
        let inner = &*self.inner;
        let permit = inner.breaker.permit();
        if permit == Permit::Skip {
            return;
        }
        let delete = inner
            .backend
            .compare_and_delete(redis_key, lease.placeholder());
        if let Err(error) = self.guarded(permit, delete).await {
            inner.stats.record(None, Event::Error);
            tracing::debug!(key = %redis_key, %error, "cache lease release failed; it expires by itself");
        }
    }

    /// After a successful write: deletes `keys`, waiting at most one op
    /// timeout. If the cache cannot be reached, retries in the background;
    /// the write itself never fails or waits longer because of the cache.
    pub(crate) async fn invalidate_after_write(&self, site: &'static Site, keys: Vec<String>) {
        let inner = &*self.inner;
        let permit = inner.breaker.permit();
        let deleted = if permit == Permit::Skip {
            Err(CacheError::CircuitOpen)
        } else {
            self.guarded(permit, inner.backend.delete(&keys)).await
        };
        match deleted {
            Ok(_) => inner
                .stats
                .record_n(Some(site), Event::Invalidation, keys.len()),
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(keys = ?keys, %error, "cache invalidation failed: retrying in the background");
                self.retry_invalidation(site, keys);
            }
        }
    }

    /// Retries an invalidation for a few seconds in a background task, then
    /// gives up: the entries stay stale until their TTL.
    fn retry_invalidation(&self, site: &'static Site, keys: Vec<String>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.stats.record(Some(site), Event::LostInvalidation);
            tracing::error!(keys = ?keys, "cache invalidation lost (no Tokio runtime to retry it): entries stay until their TTL");
            return;
        };
        let cache = self.clone();
        runtime.spawn(async move {
            let inner = &*cache.inner;
            for delay in INVALIDATION_RETRY_DELAYS {
                tokio::time::sleep(delay).await;
                let permit = inner.breaker.permit();
                if permit == Permit::Skip {
                    continue;
                }
                match cache.guarded(permit, inner.backend.delete(&keys)).await {
                    Ok(_) => {
                        inner.stats.record_n(Some(site), Event::Invalidation, keys.len());
                        tracing::info!(keys = ?keys, "cache invalidation succeeded on retry");
                        return;
                    }
                    Err(_) => inner.stats.record(Some(site), Event::Error),
                }
            }
            inner.stats.record(Some(site), Event::LostInvalidation);
            tracing::error!(keys = ?keys, "cache invalidation lost after retries: entries stay until their TTL");
        });
    }

    /// Write-through (`#[cache_put]`): stores `value` under `key` with the
    /// key's function's TTL, replacing any value or lease placeholder. If that
    /// fails, the key is invalidated instead (in the background), so that the
    /// old value does not outlive the write.
    pub(crate) async fn put_after_write<V: Serialize>(
        &self,
        writer: &'static Site,
        key: CacheKey<V>,
        value: &V,
    ) {
        let inner = &*self.inner;
        let ttl_millis = key.site().unwrap_or(writer).ttl_millis();
        let redis_key = self.redis_key_of(key);
        let stored = match inner.codec.encode(value) {
            Ok(bytes) => {
                let permit = inner.breaker.permit();
                if permit == Permit::Skip {
                    Err(CacheError::CircuitOpen)
                } else {
                    let set = inner.backend.set(&redis_key, bytes, ttl_millis);
                    self.guarded(permit, set).await
                }
            }
            Err(error) => Err(error.into()),
        };
        match stored {
            Ok(()) => inner.stats.record(Some(writer), Event::Set),
            Err(error) => {
                inner.stats.record(Some(writer), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache put failed: invalidating the key in the background");
                self.retry_invalidation(writer, vec![redis_key]);
            }
        }
    }

    /// The Redis key, consuming the rendered key (no copy without a prefix).
    pub(crate) fn redis_key_of<V>(&self, key: CacheKey<V>) -> String {
        match &self.inner.prefix {
            Some(_) => self.redis_key(&key),
            None => key.into_string(),
        }
    }
}

/// What a miss may do to the key before computing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The key is empty: take the lease if it still is (`SET NX`).
    IfAbsent,
    /// The key holds garbage: replace it with our placeholder.
    Overwrite,
    /// Another caller holds the lease: compute, do not store.
    Nothing,
}

/// A lease held while the body runs; released in the background if the call
/// is dropped (cancelled, or the body panicked) before it is settled.
struct HeldLease<'a> {
    cache: &'a Cache,
    key: &'a str,
    lease: Option<Lease>,
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let cache = self.cache.clone();
            let key = self.key.to_owned();
            runtime.spawn(async move { cache.release(&key, &lease).await });
        }
    }
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Whether an error means the cache cannot be reached (I/O, timeout), as
/// opposed to an error reply about one key or a value that does not decode.
fn is_unavailability(error: &CacheError) -> bool {
    match error {
        CacheError::Timeout(_) | CacheError::CircuitOpen => true,
        CacheError::Redis(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::{Cache, Codec, redis_cached};

    static RUNS: AtomicU32 = AtomicU32::new(0);

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Value {
        n: u32,
        label: String,
    }

    #[redis_cached(key = "value:<n>", ttl = 60, skip(cache), cache = cache)]
    async fn value(cache: &Cache, n: u32) -> Value {
        RUNS.fetch_add(1, Ordering::SeqCst);
        Value {
            n,
            label: format!("n{n}"),
        }
    }

    async fn round_trip(codec: Codec) {
        let cache = Cache::builder()
            .memory()
            .codec(codec)
            .prefix("t")
            .build()
            .await
            .unwrap();
        let before = RUNS.load(Ordering::SeqCst);
        assert_eq!(value(&cache, 3).await.label, "n3");
        assert_eq!(
            value(&cache, 3).await,
            Value {
                n: 3,
                label: "n3".into()
            }
        );
        assert_eq!(
            RUNS.load(Ordering::SeqCst) - before,
            1,
            "{codec:?}: second call is a hit"
        );
        assert_eq!(cache.codec(), codec);
        assert_eq!(cache.redis_key(&value_cache_key(&3)), "t:value:3");
    }

    #[tokio::test]
    async fn json_codec_round_trips_through_a_cached_call() {
        round_trip(Codec::Json).await;
    }

    #[cfg(feature = "msgpack")]
    #[tokio::test]
    async fn msgpack_codec_round_trips_through_a_cached_call() {
        round_trip(Codec::MessagePack).await;
    }
}
