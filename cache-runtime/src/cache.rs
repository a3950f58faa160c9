//! The `Cache` handle: backend, prefix, timeouts, circuit breaker, codec and
//! statistics, and the cache-aside lookup that generated code runs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;

use crate::backend::{Backend, MemoryBackend, RedisBackend};
use crate::breaker::{Breaker, Permit};
use crate::codec::Codec;
use crate::error::CacheError;
use crate::flight::Flights;
use crate::key::CacheKey;
use crate::site::Site;
use crate::stats::{Event, Recorder, Stats};

const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(100);
const DEFAULT_BREAKER_FAILURES: u32 = 5;
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
const DEFAULT_MEMORY_CAPACITY: u64 = 256 * 1024 * 1024;
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
const DEFAULT_MAX_VALUE_SIZE: usize = 32 * 1024 * 1024;
/// Pauses between background retries of a failed invalidation (7.7 s in all,
/// past the circuit breaker's default cool-down).
const INVALIDATION_RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

static INSTALLED: ArcSwapOption<Inner> = ArcSwapOption::const_empty();

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
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) backend: Backend,
    prefix: Option<String>,
    op_timeout: Duration,
    pub(crate) lease: Duration,
    pub(crate) codec: Codec,
    max_value_size: usize,
    pub(crate) breaker: Breaker,
    pub(crate) stats: Recorder,
    pub(crate) flights: Flights,
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
    max_value_size: usize,
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

    /// The largest encoded value that is stored, in bytes. A larger one is
    /// returned to its caller but not cached (counted as `oversized`, logged
    /// at `warn`); a `#[cache_put]` of one deletes the key instead, so the
    /// old value does not outlive the write. Default 32 MiB. Transferring a
    /// value must fit in the op timeout: at a few hundred MB/s on a LAN, a
    /// 16 MiB value needs more than the default 100 ms.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
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
                    Ok(Err(error)) if is_rejected_credentials(&error) => {
                        log_rejected_credentials(&error);
                        breaker.record_failure(true);
                    }
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
                max_value_size: self.max_value_size,
                breaker,
                stats: Recorder::default(),
                flights: Flights::default(),
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
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
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
        INSTALLED.store(Some(self.inner.clone()));
    }

    /// The installed cache, if any.
    pub fn installed() -> Option<Cache> {
        INSTALLED.load_full().map(|inner| Cache { inner })
    }

    /// Deletes a key, e.g. `cache.invalidate(&get_user_cache_key(&42))`,
    /// including a lease placeholder, so that a value being computed from
    /// data read before now is not stored. Returns whether an entry was there.
    pub async fn invalidate<V>(&self, key: &CacheKey<V>) -> Result<bool, CacheError> {
        let redis_key = self.redis_key(key);
        let deleted = self
            .guarded(self.inner.backend.delete(std::slice::from_ref(&redis_key)))
            .await;
        match &deleted {
            Ok(_) => self.inner.stats.record(None, Event::Invalidation),
            Err(CacheError::CircuitOpen) => self.inner.stats.record(None, Event::Bypass),
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

    /// Runs a backend operation under the op timeout and the circuit
    /// breaker: while the breaker is open the operation is not started and
    /// the result is `Err(CircuitOpen)`. Only unavailability (I/O, timeout)
    /// counts against Redis; an error reply such as `OOM` or `WRONGTYPE` does
    /// not.
    pub(crate) async fn guarded<T>(
        &self,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        let permit = inner.breaker.permit();
        if permit == Permit::Skip {
            return Err(CacheError::CircuitOpen);
        }
        // The memory backend cannot stall, and needs no Tokio timer.
        let outcome = if matches!(inner.backend, Backend::Memory(_)) {
            operation.await
        } else {
            // A probe checks the connection first, and brings it back.
            let probed = async {
                if permit == Permit::Probe {
                    // Boxed: rare, and it would double the size of every
                    // operation's future.
                    Box::pin(inner.backend.check()).await?;
                }
                operation.await
            };
            match tokio::time::timeout(inner.op_timeout, probed).await {
                Ok(outcome) => outcome,
                Err(_) => Err(CacheError::Timeout(inner.op_timeout)),
            }
        };
        if let Err(error) = &outcome
            && is_unavailability(error)
        {
            if inner.breaker.record_failure(permit == Permit::Probe) {
                if is_rejected_credentials(error) {
                    log_rejected_credentials(error);
                } else {
                    tracing::warn!(
                        %error,
                        "cache unavailable: skipping it for a moment (circuit breaker open); calls run uncached"
                    );
                }
            }
        } else {
            inner.breaker.record_success();
        }
        outcome
    }

    /// After a successful write: deletes `keys`, waiting at most one op
    /// timeout. If the cache cannot be reached, retries in the background;
    /// the write itself never fails or waits longer because of the cache.
    pub(crate) async fn invalidate_after_write(&self, site: &'static Site, keys: Vec<String>) {
        let inner = &*self.inner;
        match self.guarded(inner.backend.delete(&keys)).await {
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
                match cache.guarded(inner.backend.delete(&keys)).await {
                    Ok(_) => {
                        inner.stats.record_n(Some(site), Event::Invalidation, keys.len());
                        tracing::info!(keys = ?keys, "cache invalidation succeeded on retry");
                        return;
                    }
                    // Skipped, not attempted: the breaker's cool-down runs.
                    Err(CacheError::CircuitOpen) => {}
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
        let Some(bytes) = self.encode_for_store(writer, &redis_key, value) else {
            self.invalidate_after_write(writer, vec![redis_key]).await;
            return;
        };
        let stored = self
            .guarded(inner.backend.set(&redis_key, bytes, ttl_millis))
            .await;
        match stored {
            Ok(()) => inner.stats.record(Some(writer), Event::Set),
            Err(error) => {
                inner.stats.record(Some(writer), Event::Error);
                tracing::warn!(key = %redis_key, %error, "cache put failed: invalidating the key in the background");
                self.retry_invalidation(writer, vec![redis_key]);
            }
        }
    }

    /// Encodes a value to be stored, or `None` (counted and logged) when it
    /// cannot be encoded or is larger than the configured maximum.
    pub(crate) fn encode_for_store<V: Serialize + ?Sized>(
        &self,
        site: &'static Site,
        key: &str,
        value: &V,
    ) -> Option<Vec<u8>> {
        let inner = &*self.inner;
        match inner.codec.encode(value) {
            Ok(bytes) if bytes.len() <= inner.max_value_size => Some(bytes),
            Ok(bytes) => {
                inner.stats.record(Some(site), Event::Oversized);
                tracing::warn!(
                    key,
                    size = bytes.len(),
                    max_value_size = inner.max_value_size,
                    "value larger than the cache's max_value_size: not cached"
                );
                None
            }
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key, %error, "cache value could not be encoded");
                None
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

/// Whether an error means the cache cannot be used at all (I/O, timeout,
/// credentials rejected), as opposed to an error reply about one key or a
/// value that does not decode.
pub(crate) fn is_unavailability(error: &CacheError) -> bool {
    match error {
        CacheError::Timeout(_) | CacheError::CircuitOpen => true,
        CacheError::Redis(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || is_rejected_credentials(error)
        }
        _ => false,
    }
}

fn log_rejected_credentials(error: &CacheError) {
    tracing::error!(
        %error,
        "Redis rejected the credentials (user and password in the URL): calls run uncached until it accepts them"
    );
}

/// A wrong password or user (`WRONGPASS`), or none where one is required
/// (`NOAUTH`): every command will fail the same way until the configuration
/// is fixed.
pub(crate) fn is_rejected_credentials(error: &CacheError) -> bool {
    match error {
        CacheError::Redis(e) => {
            e.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
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
