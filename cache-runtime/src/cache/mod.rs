//! The `Cache` handle: backend, prefix, timeouts, circuit breaker, codec and
//! statistics. Its builder is in `builder.rs`; the operation runner (op
//! timeout, circuit breaker and probe around every backend call) in
//! `runner.rs`. The read path is in [`crate::read::lookup`], the write path in
//! [`crate::write`], the lease protocol in [`crate::write::lease`].

mod builder;
pub(crate) mod flight;
pub(crate) mod janitor;
mod runner;
pub(crate) mod servers;
pub(crate) mod shared_reads;

pub use self::builder::{CacheBuilder, WriteDurability};
pub(crate) use self::runner::within;

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::join_all;

use crate::backend::{
    Backend, BreakerRef, ClusterBackend, ConnectOptions, Durability, Fetched, MemoryBackend,
    RedisBackend, SentinelAuth, SentinelBackend, SentinelService, Tls, Wanted,
};
use crate::breaker::{Breaker, Permit, ProbeSlot};
use crate::cache::flight::Flights;
use crate::cache::janitor::Janitor;
use crate::cache::shared_reads::SharedReads;
use crate::clock::WallClock;
use crate::codec::Codec;
use crate::error::CacheError;
use crate::key::CacheKey;
use crate::local::tracking::{Source, Tracking};
use crate::local::{LocalInvalidation, LocalTier};
use crate::log_limit::LogLimit;
use crate::site::Site;
use crate::stats::{Event, Function, Recorder, Stats};

const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(100);
/// How long `build` waits for the first contact (connecting, a TLS
/// handshake, a first reply), so that the first calls do not pay for it
/// within their op timeout: a debug build's TLS handshakes on a busy
/// machine took more than 500 ms. A server that is down refuses at once.
const FIRST_CONTACT: Duration = Duration::from_secs(2);
const DEFAULT_BREAKER_FAILURES: u32 = 5;
const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);
const DEFAULT_MEMORY_CAPACITY: u64 = 256 * 1024 * 1024;
/// The local tier's bound; see [`CacheBuilder::local_capacity`].
const DEFAULT_LOCAL_CAPACITY: u64 = 64 * 1024 * 1024;
const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// The bytes a 1 Gbit/s link carries in a millisecond.
const GIGABIT_BYTES_PER_MILLI: u128 = 125_000;
/// Room past `max_value_size` in a read's limit, for the headers the cache
/// adds (freshness, compression).
const READ_HEADROOM: usize = 256;

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
    inner: Arc<Inner>,
}

/// What a cache is made of. Private to this module: the rest of the crate
/// reaches each part through its accessor on [`Cache`], so that what a
/// module uses of the cache can be read from its calls.
#[derive(Debug)]
struct Inner {
    backend: Backend,
    /// The backend's circuit breaker; on a cluster, that of keys whose
    /// primary is not known yet is the backend's own (see
    /// [`Backend::breaker`]).
    breaker: Arc<Breaker>,
    settings: Settings,
    stats: Recorder,
    flights: Flights,
    /// The reads in flight, shared by the calls of a hot key.
    reads: SharedReads,
    janitor: Janitor,
    log_limit: LogLimit,
    clock: WallClock,
    /// The local tier (`local = "..."` functions) and its tracking
    /// connection; `None` where it is not offered (the memory backend,
    /// which is local already).
    local: Option<Arc<Tracking>>,
}

/// A cache's settings, fixed when it is built.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) prefix: Option<String>,
    pub(crate) op_timeout: Duration,
    pub(crate) lease: Duration,
    pub(crate) codec: Codec,
    pub(crate) max_value_size: usize,
    /// The most bytes a read transfers: `max_value_size` and room for the
    /// cache's headers; a longer entry is not read, but replaced.
    pub(crate) read_limit: usize,
    /// `compress_above`: encoded values longer than this are compressed.
    pub(crate) compress_above: Option<usize>,
    /// `trace_keys`: whether call spans carry the key.
    pub(crate) trace_keys: bool,
}

/// A handle that does not keep its cache alive: the janitor's worker holds
/// one, so that it ends with the cache.
#[derive(Debug)]
pub(crate) struct WeakCache(Weak<Inner>);

impl WeakCache {
    /// The cache, if it is still alive.
    pub(crate) fn upgrade(&self) -> Option<Cache> {
        self.0.upgrade().map(|inner| Cache { inner })
    }
}

/// The parts of a cache, for the modules that implement its paths.
impl Cache {
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub(crate) fn breaker(&self) -> &Arc<Breaker> {
        &self.inner.breaker
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// The counters' recorder ([`Cache::stats`] is their snapshot).
    pub(crate) fn recorder(&self) -> &Recorder {
        &self.inner.stats
    }

    pub(crate) fn flights(&self) -> &Flights {
        &self.inner.flights
    }

    pub(crate) fn shared_reads(&self) -> &SharedReads {
        &self.inner.reads
    }

    pub(crate) fn janitor(&self) -> &Janitor {
        &self.inner.janitor
    }

    pub(crate) fn log_limit(&self) -> &LogLimit {
        &self.inner.log_limit
    }

    pub(crate) fn clock(&self) -> WallClock {
        self.inner.clock
    }

    pub(crate) fn local(&self) -> Option<&Tracking> {
        self.inner.local.as_deref()
    }

    pub(crate) fn downgrade(&self) -> WeakCache {
        WeakCache(Arc::downgrade(&self.inner))
    }
}

impl Cache {
    /// Connects to Redis with the defaults (100 ms op timeout, JSON, no
    /// prefix). Fails only on a malformed URL; see [`CacheBuilder::build`].
    /// Cancel safe.
    pub async fn connect(url: &str) -> Result<Cache, CacheError> {
        Cache::builder().url(url).build().await
    }

    /// A builder for a cache with non-default settings.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::new()
    }

    /// An in-process cache (256 MiB) with the same semantics as Redis, for
    /// tests and single-process services.
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

    /// The cache a call of `function` uses: the given one, else the
    /// installed one, else `None` (warned once: the function runs
    /// uncached).
    pub(crate) fn resolve<'a>(
        cache: Option<&'a Cache>,
        function: &Function,
    ) -> Option<Cow<'a, Cache>> {
        if let Some(cache) = cache {
            return Some(Cow::Borrowed(cache));
        }
        let installed = Cache::installed();
        if installed.is_none() {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    function = function.name(),
                    "no cache installed: #[redis_cached] functions run uncached; \
                     call `Cache::connect(url).await?.install()` at start-up"
                );
            }
        }
        installed.map(Cow::Owned)
    }

    /// Waits until no store of this cache's misses is waiting for its
    /// reply. A miss does not wait for its store's reply (the
    /// [writes](crate::guide::writes) guide says when and why), so call
    /// this once the calls are done: before a process exits, for the
    /// values its last calls computed to be in Redis, or before reading an
    /// entry from another connection right after the miss that stored it;
    /// `stats()` then counts those stores' `sets`, `dropped_sets` and
    /// `errors` too. Returns at once when none is pending. Each store is
    /// bounded by the op timeout, but stores that start meanwhile are
    /// waited for too, so under steady misses it may not return. Await it
    /// on the runtime the calls ran on: a store waits on that runtime, and
    /// one whose runtime is not running does not end (a runtime shut down
    /// drops its stores: they are lost, not waited for).
    ///
    /// ```no_run
    /// # async fn run(cache: cache_runtime::Cache) {
    /// // ... the job's last cached calls ...
    /// cache.settled().await;
    /// # }
    /// ```
    ///
    /// Cancel safe: dropping it drops only the wait.
    pub async fn settled(&self) {
        self.flights().stores_settled().await;
    }

    /// A snapshot of the counters, in total and per function.
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.stats.snapshot();
        if let Some(local) = &self.inner.local {
            stats.local = local.tier().stats();
        }
        stats
    }

    /// The key as stored in Redis: `prefix:key`, or the key itself.
    pub fn redis_key<V>(&self, key: &CacheKey<V>) -> String {
        match &self.inner.settings.prefix {
            Some(prefix) => format!("{prefix}:{key}"),
            None => key.as_str().to_owned(),
        }
    }

    /// Whether the cache has a key prefix of its own.
    pub(crate) fn has_prefix(&self) -> bool {
        self.inner.settings.prefix.is_some()
    }

    /// The cache's key prefix, if it has one.
    pub(crate) fn prefix(&self) -> Option<&str> {
        self.inner.settings.prefix.as_deref()
    }

    /// `prefix:key`, or `key` itself without a prefix.
    pub(crate) fn prefixed<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        match &self.inner.settings.prefix {
            Some(prefix) => {
                // Not `format!`: a tagged call prefixes each of its tags.
                let mut prefixed = String::with_capacity(prefix.len() + 1 + key.len());
                prefixed.push_str(prefix);
                prefixed.push(':');
                prefixed.push_str(key);
                std::borrow::Cow::Owned(prefixed)
            }
            None => std::borrow::Cow::Borrowed(key),
        }
    }

    /// Sends a command of your own on the cache's connection (a lock, a
    /// rate limit, a session: see `examples/patterns.rs`), so that a
    /// service reuses one connection to Redis. It goes through the same
    /// fail-open guards as the cache's own commands: it fails at once with
    /// [`CacheError::CircuitOpen`] while the circuit breaker is open, and
    /// with [`CacheError::Timeout`] after the op timeout (the command may
    /// still land); its connection failures count toward the breaker.
    /// Keys are used as given (no prefix). On a cluster the command goes
    /// to its first key's node. Fails with [`CacheError::NotRedis`] on the
    /// in-process backend. Build commands with [`crate::redis`] (the
    /// `redis` crate's `cmd` and `pipe`, re-exported), so that the
    /// versions match.
    ///
    /// Cancel safe in the sense of the `redis` crate: a dropped call may
    /// or may not have been applied.
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        self.run(&inner.breaker, inner.backend.query(cmd), true)
            .await
    }

    /// [`Cache::command`] for a pipeline (`redis::pipe()`, with
    /// `.atomic()` for `MULTI`/`EXEC`). On a cluster every command of it
    /// must be for keys of one slot.
    pub async fn pipeline<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        self.run(&inner.breaker, inner.backend.query_pipeline(pipe), true)
            .await
    }

    /// The codec values are stored with.
    pub fn codec(&self) -> Codec {
        self.inner.settings.codec
    }
}

impl Cache {
    /// Counts an event of a cached function.
    #[inline]
    pub(crate) fn record(&self, site: &'static Site, event: Event) {
        self.inner.stats.record(Some(site.function()), event);
        crate::scope::noted(event);
        // A static check when `debug` is off: nothing else on the hot path.
        if tracing::enabled!(tracing::Level::DEBUG)
            && let Some(outcome) = event.outcome()
        {
            tracing::Span::current().record("outcome", outcome);
        }
    }

    /// The span of one cached call (`debug`, see the guide's operations page),
    /// or a disabled one when `debug` is off for this crate.
    pub(crate) fn call_span(&self, site: &'static Site, key: &str) -> tracing::Span {
        let span = tracing::debug_span!(
            "cache.call",
            function = site.function().name(),
            outcome = tracing::field::Empty,
            "db.system.name" = self.db_system(),
            "db.operation.name" = "GETRANGE",
            "cache.key" = tracing::field::Empty,
        );
        if self.inner.settings.trace_keys && !span.is_disabled() {
            span.record("cache.key", key);
        }
        span
    }

    /// The span of one batch call: no single outcome (each id has its
    /// own, in the counters).
    pub(crate) fn batch_span(&self, site: &'static Site, ids: usize) -> tracing::Span {
        tracing::debug_span!(
            "cache.batch",
            function = site.function().name(),
            "cache.batch.size" = ids,
            "db.system.name" = self.db_system(),
            "db.operation.name" = "BATCH GETRANGE",
        )
    }

    /// OpenTelemetry's `db.system.name` of the backend.
    fn db_system(&self) -> &'static str {
        if self.inner.backend.as_memory().is_some() {
            "memory"
        } else {
            "redis"
        }
    }

    /// Counts and logs how a compare-and-set store ended; whether it stored.
    pub(crate) fn record_store(
        &self,
        site: &'static Site,
        key: &str,
        outcome: Result<bool, CacheError>,
    ) -> bool {
        match outcome {
            Ok(true) => {
                self.record(site, Event::Set);
                true
            }
            Ok(false) => {
                self.record(site, Event::DroppedSet);
                tracing::debug!(key, "key invalidated while computing: value not stored");
                false
            }
            // The breaker's opening was counted when it opened.
            Err(CacheError::CircuitOpen) => false,
            Err(error) => {
                self.record(site, Event::Error);
                crate::limited!(self, warn!(key, %error, "cache write failed"));
                false
            }
        }
    }

    /// An encoded value as it is stored (compressed above the threshold),
    /// or `None` (counted and logged) when it could not be encoded or is
    /// larger than the configured maximum.
    pub(crate) fn fit_for_store(
        &self,
        function: Option<&'static crate::stats::Function>,
        key: &str,
        encoded: Result<Vec<u8>, crate::codec::CodecError>,
    ) -> Option<Vec<u8>> {
        let inner = &*self.inner;
        match encoded {
            Ok(bytes) if bytes.len() <= inner.settings.max_value_size => {
                match inner.settings.compress_above {
                    Some(above) if bytes.len() > above => {
                        Some(crate::compression::compress(&bytes).unwrap_or(bytes))
                    }
                    _ => Some(bytes),
                }
            }
            Ok(bytes) => {
                inner.stats.record(function, Event::Oversized);
                crate::limited!(
                    self,
                    warn!(
                        key,
                        size = bytes.len(),
                        max_value_size = inner.settings.max_value_size,
                        "value larger than the cache's max_value_size: not cached"
                    )
                );
                None
            }
            Err(error) => {
                inner.stats.record(function, Event::Error);
                crate::limited!(self, warn!(key, %error, "cache value could not be encoded"));
                None
            }
        }
    }

    /// The Redis key, consuming the rendered key: the prefix is written
    /// in front of it, in its buffer (usually this thread's spare, with
    /// room; see [`crate::key::recycle`]).
    pub(crate) fn redis_key_of(&self, key: CacheKey) -> String {
        let mut key = key.into_string();
        if let Some(prefix) = &self.inner.settings.prefix {
            key.reserve(prefix.len() + 1);
            key.insert(0, ':');
            key.insert_str(0, prefix);
        }
        key
    }
}

pub(crate) fn log_rejected_credentials(error: &CacheError, suppressed: u64) {
    tracing::error!(
        suppressed,
        %error,
        "Redis rejected the credentials (user and password in the URL): calls run uncached until it accepts them"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use crate::{Cache, Codec, redis_cached};

    /// Body runs by `n`: each test calls its own `n`, as the tests run
    /// at once.
    static RUNS: [AtomicU32; 5] = [const { AtomicU32::new(0) }; 5];

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Value {
        n: u32,
        label: String,
    }

    #[redis_cached(key = "value:<n>", ttl = 60, skip(cache), cache = cache)]
    async fn value(cache: &Cache, n: u32) -> Value {
        RUNS[n as usize].fetch_add(1, Ordering::SeqCst);
        Value {
            n,
            label: format!("n{n}"),
        }
    }

    async fn round_trip(codec: Codec, n: u32) {
        let cache = Cache::builder()
            .memory()
            .codec(codec)
            .prefix("t")
            .build()
            .await
            .unwrap();
        let before = RUNS[n as usize].load(Ordering::SeqCst);
        assert_eq!(value(&cache, n).await.label, format!("n{n}"));
        assert_eq!(
            value(&cache, n).await,
            Value {
                n,
                label: format!("n{n}")
            }
        );
        assert_eq!(
            RUNS[n as usize].load(Ordering::SeqCst) - before,
            1,
            "{codec:?}: second call is a hit"
        );
        assert_eq!(cache.codec(), codec);
        assert_eq!(
            cache.redis_key(&value_cache_key(&n)),
            format!("t:value:{n}")
        );
    }

    #[test]
    fn the_default_max_value_size_can_be_read_within_the_op_timeout_at_a_gigabit() {
        let size = |builder: crate::CacheBuilder| builder.memory().assemble_for_test();
        assert_eq!(
            size(Cache::builder()),
            4_166_666,
            "a third of 100 ms at 1 Gbit/s"
        );
        assert_eq!(
            size(Cache::builder().op_timeout(std::time::Duration::from_millis(300))),
            12_500_000
        );
        assert_eq!(size(Cache::builder().max_value_size(1 << 20)), 1 << 20);
    }

    impl crate::CacheBuilder {
        /// The `max_value_size` a cache built from this builder has.
        fn assemble_for_test(self) -> usize {
            let breaker = self.breaker();
            let cache = self.assemble(
                crate::backend::Backend::Memory(crate::backend::MemoryBackend::new(1 << 20)),
                breaker,
            );
            assert_eq!(
                cache.inner.settings.read_limit,
                cache.inner.settings.max_value_size + 256
            );
            cache.inner.settings.max_value_size
        }
    }

    #[tokio::test]
    async fn json_codec_round_trips_through_a_cached_call() {
        round_trip(Codec::Json, 3).await;
    }

    #[cfg(feature = "msgpack")]
    #[tokio::test]
    async fn msgpack_codec_round_trips_through_a_cached_call() {
        round_trip(Codec::MessagePack, 4).await;
    }
}
