//! The `Cache` handle: backend, prefix, timeouts, circuit breaker, codec and
//! statistics. The read path is in [`crate::lookup`], the write path in
//! [`crate::write`], the lease protocol in [`crate::lease`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::future::join_all;
use serde::Serialize;

use crate::backend::{
    Backend, BreakerRef, ClusterBackend, ConnectOptions, Durability, Fetched, MemoryBackend,
    RedisBackend, SentinelAuth, SentinelBackend, SentinelService, Tls, Wanted,
};
use crate::breaker::{Breaker, Permit, ProbeSlot};
use crate::clock::WallClock;
use crate::codec::Codec;
use crate::error::CacheError;
use crate::flight::Flights;
use crate::janitor::Janitor;
use crate::key::CacheKey;
use crate::local::{LocalInvalidation, LocalTier};
use crate::log_limit::LogLimit;
use crate::site::Site;
use crate::stats::{Event, Recorder, Stats};
use crate::tracking::{Source, Tracking};

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
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) backend: Backend,
    prefix: Option<String>,
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
    /// The backend's circuit breaker; on a cluster, that of keys whose
    /// primary is not known yet is the backend's own (see
    /// [`Backend::breaker`]).
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) stats: Recorder,
    pub(crate) flights: Flights,
    pub(crate) janitor: Janitor,
    pub(crate) log_limit: LogLimit,
    pub(crate) clock: WallClock,
    /// The local tier (`local = "..."` functions) and its tracking
    /// connection; `None` where it is not offered (the memory backend,
    /// which is local already).
    pub(crate) local: Option<Arc<Tracking>>,
}

/// How many replicas a write waits for before it counts as done; see
/// [`CacheBuilder::write_durability`].
///
/// A write that waited is one that a failover cannot undo: the replica
/// that is promoted has it. What it costs is one replication round trip
/// per write (`WAIT`, on connections of its own so that reads never queue
/// behind it); reads pay nothing. The figures are in the guide's
/// [deployments](crate::guide::deployments) page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WriteDurability {
    /// Every replica the write's primary has (the default). A primary
    /// without replicas (a standalone server, say) pays nothing per write:
    /// it is asked (`ROLE`) at most once a second of writes. On a cluster,
    /// the replicas counted are those the cluster lists for the primary
    /// (`CLUSTER NODES`); a replica that has died and that the primary no
    /// longer lists is not waited for.
    ///
    /// A `WAIT` that comes back short asks the primary's `ROLE`: a write
    /// that every replica it still has acknowledged is done (a replica that
    /// died is not waited for), and for a second its writes wait for those
    /// only. An ACL that refuses `ROLE` (grant `+role`) leaves a standalone
    /// or Sentinel primary's writes waiting for no replica, with a warning.
    ///
    /// What it leaves open: a replica that attached in the last second
    /// (on a cluster, since the last slot map, read every 5 s under load)
    /// may lack a write if its primary fails right then; a primary cut off
    /// from its replica for longer than its `repl-timeout` (60 s by
    /// default) stops counting it; a primary whose replica was promoted
    /// away from it, in the second its word is trusted; on a cluster, the
    /// milliseconds in which the `redis` crate still sends to a primary
    /// that a failover has just replaced.
    #[default]
    AllReplicas,
    /// At least this many replicas, whatever the primary has: a write to a
    /// primary with fewer is retried in the background until it has them
    /// (on Sentinel, those it has do, as the fence covers the rest; on a
    /// cluster, at most those it lists), and this process reads it from
    /// the primary meanwhile. Run at least this many replicas: otherwise
    /// every write waits out `replica_wait` and stays pending.
    /// `AtLeast(0)` is [`WriteDurability::PrimaryOnly`].
    AtLeast(u32),
    /// The opt-out: a write is done when its primary has it. Saves one
    /// replication round trip per write; a write acknowledged in the last
    /// moments before its primary crashes can then be undone by the
    /// failover, until the entry's TTL. On Sentinel, the fence (the keys
    /// written in the last 30 s deleted on a new primary) still covers it.
    PrimaryOnly,
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
    max_value_size: Option<usize>,
    compress_above: Option<usize>,
    trace_keys: bool,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    tcp_nodelay: bool,
    durability: WriteDurability,
    replica_wait: Option<Duration>,
    tls: Option<Tls>,
    sentinel_auth: Option<SentinelAuth>,
    sentinel_fence: bool,
    clock: WallClock,
    local_capacity: u64,
    local_invalidation: LocalInvalidation,
}
#[derive(Debug, Clone)]
enum BackendChoice {
    Url(String),
    Sentinel {
        service: String,
        sentinels: Vec<String>,
    },
    Cluster(Vec<String>),
    Memory {
        capacity_bytes: u64,
    },
}

impl CacheBuilder {
    /// Use the Redis server at `url` (`redis://[user:password@]host:port[/db]`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.backend = Some(BackendChoice::Url(url.into()));
        self
    }

    /// Use the Redis Cluster reached through these seed nodes
    /// (`redis://[user:password@]host:port` each; one is enough, several
    /// survive one being down at start). The cluster's topology is read
    /// from them and followed as it changes (`MOVED`, `ASK`, failovers).
    ///
    /// Every key a call touches together is in one slot: a value and its
    /// refresh lock share a hash tag, and a batch is split by slot. A
    /// user's own `{tag}` in a key template pins keys to one slot, as in
    /// Redis. The circuit breaker is per primary: a dead shard is skipped
    /// while the others serve hits.
    pub fn cluster<I, S>(mut self, seed_nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.backend = Some(BackendChoice::Cluster(
            seed_nodes.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Use the primary of the Sentinel service `service` (the name in
    /// `sentinel monitor <service> ...`), found through these sentinels
    /// (`redis://host:26379` each) and followed through failovers: after
    /// one, the next command asks the sentinels again and connects to the
    /// new primary once it says it is one (`ROLE`). Replicas are never
    /// read.
    ///
    /// The user, password and database in the first URL are those of the
    /// Redis nodes (e.g. `redis://:secret@sentinel-1:26379/2`); the
    /// sentinels are asked without credentials unless
    /// [`CacheBuilder::sentinel_password`] or [`CacheBuilder::sentinel_user`]
    /// gives theirs. `rediss://` URLs (feature `tls`) make every
    /// connection TLS, to the sentinels and the nodes.
    pub fn sentinel<I, S>(mut self, service: impl Into<String>, sentinels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.backend = Some(BackendChoice::Sentinel {
            service: service.into(),
            sentinels: sentinels.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// The password of the sentinels themselves (`requirepass` in their
    /// `sentinel.conf`), for [`CacheBuilder::sentinel`]. The nodes'
    /// credentials stay in the URLs.
    pub fn sentinel_password(mut self, password: impl Into<String>) -> Self {
        self.sentinel_auth = Some(SentinelAuth {
            username: None,
            password: password.into(),
        });
        self
    }

    /// An ACL user and its password on the sentinels, for
    /// [`CacheBuilder::sentinel`].
    pub fn sentinel_user(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.sentinel_auth = Some(SentinelAuth {
            username: Some(username.into()),
            password: password.into(),
        });
        self
    }

    /// Trust this root certificate (PEM) for `rediss://` connections,
    /// instead of the system's roots: for a private CA.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_certificates().root_cert = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM) on `rediss://`
    /// connections: mutual TLS (`tls-auth-clients yes` on the server).
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_certificates().client_tls = Some(redis::ClientTlsConfig {
            client_cert: certificate_pem.into(),
            client_key: key_pem.into(),
        });
        self
    }

    #[cfg(feature = "tls")]
    fn tls_certificates(&mut self) -> &mut Tls {
        self.tls.get_or_insert(redis::TlsCertificates {
            client_tls: None,
            root_cert: None,
        })
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

    /// Bounds the local tier (functions with `local = "..."`) to about
    /// `bytes`: each copy weighs its key, its encoded value and 96 bytes;
    /// the least recently and frequently used copies are evicted past the
    /// bound (moka). The decoded value's own size in memory is usually
    /// within a small factor of its encoded size, so leave headroom.
    /// Default 64 MiB.
    pub fn local_capacity(mut self, bytes: u64) -> Self {
        self.local_capacity = bytes;
        self
    }

    /// How the local tier learns that a key changed: from the server
    /// ([`LocalInvalidation::Tracking`], the default), or from the other
    /// processes' announcements on a pub/sub channel
    /// ([`LocalInvalidation::Broadcast`]), for deployments where the
    /// server cannot track (a proxy). The channel is
    /// `<prefix>:local-invalidations` (`cache-runtime:local-invalidations`
    /// without a prefix): every process that caches the same keys must use
    /// the same mode and prefix.
    pub fn local_invalidation(mut self, mode: LocalInvalidation) -> Self {
        self.local_invalidation = mode;
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
    /// old value does not outlive the write.
    ///
    /// Reads stop at the same limit: an entry larger than that (written by
    /// another program, or by a cache with a larger limit) is not
    /// transferred, is counted as an error of its function and is replaced
    /// by the next call, and never opens the circuit breaker. A value the
    /// cache stores must be read back within the op timeout, so the default
    /// follows it: what a 1 Gbit/s link carries in a third of the op
    /// timeout, about 4 MB with the default 100 ms. A limit that needs more
    /// than the op timeout at 1 Gbit/s is logged at `warn` by `build`.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = Some(bytes);
        self
    }

    /// Compress encoded values longer than `bytes` (lz4): large values
    /// cost Redis memory, network time and, on a cluster, one node's
    /// bandwidth. Off by default. Compressed entries describe themselves,
    /// so caches with and without compression read each other's entries;
    /// an uncompressed entry stays readable in `redis-cli`. A value that
    /// does not shrink is stored as it is. What it costs and saves: the
    /// guide's [operations](crate::guide::operations) page.
    pub fn compress_above(mut self, bytes: usize) -> Self {
        self.compress_above = Some(bytes);
        self
    }

    /// Whether the `debug` span of each cached call carries its Redis key
    /// (`cache.key`). Off by default: keys can hold personal data (an
    /// email, a user id) that a tracing backend should not receive.
    pub fn trace_keys(mut self, on: bool) -> Self {
        self.trace_keys = on;
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

    /// Whether the Redis connection sets `TCP_NODELAY`. Default `true`,
    /// as Lettuce, go-redis, redis-py and hiredis do (the `redis` crate
    /// alone does not). With Nagle's algorithm, a command written while an
    /// earlier one is unacknowledged waits for that acknowledgement, which
    /// the server sends with the earlier reply: concurrent calls on the
    /// shared connection (a batch's leases, hits under load) pay an extra
    /// round trip each on a real network. `false` suits only a Redis on
    /// the same host, where coalescing small writes buys throughput (about
    /// 5 to 15 % more hits per second at 16 concurrent callers on loopback
    /// in `bench/src/bin/bench.rs`).
    pub fn tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.tcp_nodelay = nodelay;
        self
    }

    /// How many replicas a write (an invalidation of `#[invalidates]` or
    /// `Cache::invalidate`, a store of `#[cache_put]`) waits for before it
    /// counts as done. Default [`WriteDurability::AllReplicas`]: Redis
    /// replicates asynchronously, so a `DEL` that only its primary had is
    /// lost if that primary fails over, and the promoted replica serves
    /// the old value until its TTL. See [`WriteDurability`] for what each
    /// setting costs and keeps.
    pub fn write_durability(mut self, durability: WriteDurability) -> Self {
        self.durability = durability;
        self
    }

    /// How long a write waits for its replicas (`WAIT`'s timeout) under
    /// [`CacheBuilder::write_durability`]. Default half the op timeout. A
    /// write whose replicas did not all answer in time is retried in the
    /// background until they do; the write itself never waits longer than
    /// the op timeout, so keep this below it.
    pub fn replica_wait(mut self, timeout: Duration) -> Self {
        self.replica_wait = Some(timeout);
        self
    }

    /// Turns off the replay of recent invalidations on a new Sentinel
    /// primary. For tests: the deployment test shows the stale reads a
    /// failover causes without it.
    #[cfg(feature = "__testing")]
    #[doc(hidden)]
    pub fn without_sentinel_fence(mut self) -> Self {
        self.sentinel_fence = false;
        self
    }

    /// Plays a host whose wall clock is `offset_millis` ahead (or, if
    /// negative, behind). For tests: no decision of the cache reads the
    /// wall clock, and the clock-skew test checks that it stays so.
    #[cfg(feature = "__testing")]
    #[doc(hidden)]
    pub fn wall_clock_offset(mut self, offset_millis: i64) -> Self {
        self.clock = WallClock { offset_millis };
        self
    }

    /// What the backends wait for after a write.
    fn durability(&self) -> Option<Durability> {
        let wanted = match self.durability {
            WriteDurability::AllReplicas => Wanted::All,
            WriteDurability::AtLeast(0) | WriteDurability::PrimaryOnly => return None,
            WriteDurability::AtLeast(n) => Wanted::AtLeast(n),
        };
        let timeout = self.replica_wait.unwrap_or(self.op_timeout / 2);
        Some(Durability { wanted, timeout })
    }

    /// Builds the cache. Fails only on bad configuration (a malformed URL, a
    /// prefix with spaces): a Redis server that is down is not an error; calls
    /// run uncached until it is reachable. It connects first (on a cluster,
    /// to every primary; TLS handshakes included), waiting at most 2 s (or
    /// the op timeout if longer; a cluster that answered, 3 s more for its
    /// primaries), so that the first calls are served instead of paying
    /// for connecting within their op timeout. Call inside a Tokio runtime.
    ///
    /// Cancel safe: it holds nothing while it waits for the first contact.
    pub async fn build(mut self) -> Result<Cache, CacheError> {
        if let Some(prefix) = &self.prefix
            && (prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(CacheError::InvalidPrefix(prefix.clone()));
        }
        let breaker = self.breaker();
        let options = ConnectOptions {
            nodelay: self.tcp_nodelay,
            durability: self.durability(),
            tls: self.tls.as_ref(),
            op_timeout: self.op_timeout,
            breaker: (self.breaker_failures, self.breaker_cooldown),
        };
        // Connect now so that the first calls are served, but never fail
        // start-up on it: see `first_contact`.
        let first_contact_within = self.op_timeout.max(FIRST_CONTACT);
        let backend = match self.backend.take() {
            None => return Err(CacheError::NoBackend),
            Some(BackendChoice::Memory { capacity_bytes }) => {
                Backend::Memory(MemoryBackend::new(capacity_bytes))
            }
            Some(BackendChoice::Url(url)) => {
                let redis = RedisBackend::new(&url, &options)?;
                first_contact("Redis", &breaker, first_contact_within, redis.ping()).await;
                Backend::Redis(redis)
            }
            Some(BackendChoice::Sentinel { service, sentinels }) => {
                let named = SentinelService {
                    name: &service,
                    sentinels: &sentinels,
                    auth: self.sentinel_auth.as_ref(),
                    fence: self.sentinel_fence,
                };
                let sentinel = SentinelBackend::new(&named, &options)?;
                let contact = sentinel.connect();
                first_contact(
                    "the Sentinel primary",
                    &breaker,
                    first_contact_within,
                    contact,
                )
                .await;
                Backend::Sentinel(sentinel)
            }
            Some(BackendChoice::Cluster(seeds)) => {
                if seeds.is_empty() {
                    return Err(CacheError::NoBackend);
                }
                let cluster = ClusterBackend::new(&seeds, &options)?;
                // The slot map first; then every primary. Once a node has
                // answered, connecting gets longer: TLS handshakes with
                // every node of a busy cluster are slow, and would
                // otherwise be paid by the first calls.
                let refresh = cluster.refresh();
                if first_contact("Redis Cluster", &breaker, first_contact_within, refresh).await {
                    let connecting = self.op_timeout.max(Duration::from_secs(3));
                    match tokio::time::timeout(connecting, cluster.warm_up()).await {
                        Ok(Ok(())) => tracing::debug!("connected to every primary"),
                        outcome => {
                            let reason = match outcome {
                                Ok(Err(e)) => e.to_string(),
                                _ => format!("not all connected within {connecting:?}"),
                            };
                            tracing::warn!(%reason, "Redis Cluster answered, but connecting to its primaries is slow; the first calls may run uncached");
                        }
                    }
                }
                Backend::Cluster(cluster)
            }
        };
        Ok(self.assemble(backend, breaker))
    }

    fn breaker(&self) -> Arc<Breaker> {
        Arc::new(Breaker::new(self.breaker_failures, self.breaker_cooldown))
    }

    /// The bytes a 1 Gbit/s link carries in `share` of the op timeout.
    fn gigabit_bytes(&self, share: u128) -> usize {
        let bytes = self.op_timeout.as_millis() * GIGABIT_BYTES_PER_MILLI / share;
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    fn assemble(self, backend: Backend, breaker: Arc<Breaker>) -> Cache {
        let max_value_size = self.max_value_size.unwrap_or_else(|| self.gigabit_bytes(3));
        if let Some(bytes) = self.max_value_size
            && bytes > self.gigabit_bytes(1)
            && backend.as_memory().is_none()
        {
            tracing::warn!(
                max_value_size = bytes,
                op_timeout = ?self.op_timeout,
                "max_value_size is more than a 1 Gbit/s link carries within the op timeout: \
                 reading such a value back would time out"
            );
        }
        let tier = || Arc::new(LocalTier::new(self.local_capacity));
        let channel = match self.local_invalidation {
            LocalInvalidation::Tracking => None,
            LocalInvalidation::Broadcast => Some(format!(
                "{}:local-invalidations",
                self.prefix.as_deref().unwrap_or("cache-runtime")
            )),
        };
        let local = match (&backend, channel) {
            (Backend::Redis(redis), channel) => Some(Tracking::new(
                tier(),
                Source::Server(Box::new(redis.tracking_client())),
                channel,
            )),
            (Backend::Sentinel(sentinel), channel) => Some(Tracking::new(
                tier(),
                Source::Sentinel(sentinel.clone()),
                channel,
            )),
            (Backend::Cluster(cluster), None) => Some(Tracking::cluster(tier(), cluster.clone())),
            (Backend::Cluster(cluster), Some(channel)) => Some(Tracking::new(
                tier(),
                Source::AnyNode(cluster.clone()),
                Some(channel),
            )),
            (Backend::Memory(_), _) => None,
        }
        .map(Arc::new);
        Cache {
            inner: Arc::new(Inner {
                backend,
                prefix: self.prefix,
                op_timeout: self.op_timeout,
                lease: self.lease,
                codec: self.codec,
                max_value_size,
                // `GETRANGE` takes a signed 64-bit end.
                read_limit: max_value_size
                    .saturating_add(READ_HEADROOM)
                    .min(i64::MAX as usize),
                compress_above: self.compress_above,
                trace_keys: self.trace_keys,
                breaker,
                stats: Recorder::default(),
                flights: Flights::new(self.op_timeout.saturating_mul(2)),
                janitor: Janitor::default(),
                log_limit: LogLimit::default(),
                clock: self.clock,
                local,
            }),
        }
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
        CacheBuilder {
            backend: None,
            prefix: None,
            op_timeout: DEFAULT_OP_TIMEOUT,
            lease: DEFAULT_LEASE,
            codec: Codec::default(),
            max_value_size: None,
            compress_above: None,
            trace_keys: false,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            tcp_nodelay: true,
            durability: WriteDurability::AllReplicas,
            replica_wait: None,
            tls: None,
            sentinel_auth: None,
            sentinel_fence: true,
            clock: WallClock::default(),
            local_capacity: DEFAULT_LOCAL_CAPACITY,
            local_invalidation: LocalInvalidation::Tracking,
        }
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
        match &self.inner.prefix {
            Some(prefix) => format!("{prefix}:{key}"),
            None => key.as_str().to_owned(),
        }
    }

    /// Whether the cache has a key prefix of its own.
    pub(crate) fn has_prefix(&self) -> bool {
        self.inner.prefix.is_some()
    }

    /// The cache's key prefix, if it has one.
    pub(crate) fn prefix(&self) -> Option<&str> {
        self.inner.prefix.as_deref()
    }

    /// `prefix:key`, or `key` itself without a prefix.
    pub(crate) fn prefixed<'k>(&self, key: &'k str) -> std::borrow::Cow<'k, str> {
        match &self.inner.prefix {
            Some(prefix) => std::borrow::Cow::Owned(format!("{prefix}:{key}")),
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
        self.inner.codec
    }

    /// Runs a backend operation on `key` under the op timeout and the
    /// circuit breaker of `key`'s part of the backend: while the breaker is
    /// open the operation is not started and the result is
    /// `Err(CircuitOpen)`. Only unavailability (I/O, timeout) counts
    /// against Redis; an error reply such as `OOM` or `WRONGTYPE` does not.
    ///
    /// Cancel safe: a dropped operation holds nothing. The call that finds
    /// the breaker's cool-down over starts the probe in a task of its own
    /// and skips the cache, so no caller waits for the probe, and a caller
    /// dropped meanwhile cannot leave it pending.
    pub(crate) fn guarded<T>(
        &self,
        key: &str,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> impl Future<Output = Result<T, CacheError>> {
        let breaker = self.inner.backend.breaker(&self.inner.breaker, key);
        self.run(breaker, operation, true)
    }

    /// Runs a backend operation on `key` under the op timeout, for the
    /// janitor, and tells the breaker how it went. It does not ask the
    /// breaker (the janitor's one worker may pay a timeout without slowing
    /// any call, and its success closes the breaker as a probe's would),
    /// except on a cluster, where it does not call a primary whose breaker
    /// is open (`Err(CircuitOpen)`, retried later): there, a command for a
    /// dead primary makes the `redis` crate's cluster connection hold every
    /// node's requests while it recovers.
    pub(crate) fn timed<T>(
        &self,
        key: &str,
        operation: impl Future<Output = Result<T, CacheError>>,
    ) -> impl Future<Output = Result<T, CacheError>> {
        let breaker = self.inner.backend.breaker(&self.inner.breaker, key);
        self.run(breaker, operation, false)
    }

    /// A read of many keys, each part of the backend (each cluster primary)
    /// under its own breaker: the parts whose breaker is closed in one
    /// request, and if that fails, each of them alone. A part that failed
    /// or was skipped reads as absent, so its keys take the miss path,
    /// which fails open on its own; only when every part failed is the
    /// error returned.
    pub(crate) async fn read_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let inner = &*self.inner;
        let limit = inner.read_limit;
        let mut groups = inner.backend.by_breaker(&inner.breaker, keys);
        if groups.len() == 1 {
            let (breaker, _) = groups.pop().expect("one group");
            return self
                .run(breaker, inner.backend.get_many(keys, limit), true)
                .await;
        }
        // Several primaries. Those whose breaker lets calls through are
        // read together, as one request that the cluster connection splits
        // by slot (three requests for three primaries measured 10 % fewer
        // batches per second); the keys of the others read as absent.
        let all = groups.len();
        groups.retain(|(breaker, _)| match breaker.permit() {
            Permit::Call => true,
            Permit::Skip => false,
            Permit::Probe => {
                self.probe(Arc::clone(breaker));
                false
            }
        });
        if groups.is_empty() {
            return Err(CacheError::CircuitOpen);
        }
        // The keys' places when a part was skipped; when none was (the
        // usual case), the keys are read as they are, without a copy.
        let together: Option<Vec<usize>> = (groups.len() < all).then(|| {
            groups
                .iter()
                .flat_map(|(_, at)| at.iter().copied())
                .collect()
        });
        let copied: Vec<String>;
        let part = match &together {
            None => keys,
            Some(together) => {
                copied = together.iter().map(|&at| keys[at].clone()).collect();
                &copied[..]
            }
        };
        if let Ok(Ok(read)) =
            tokio::time::timeout(inner.op_timeout, inner.backend.get_many(part, limit)).await
        {
            for (breaker, _) in &groups {
                breaker.record_success();
            }
            let Some(together) = together else {
                return Ok(read);
            };
            let mut values = vec![Fetched::Absent; keys.len()];
            for (at, value) in together.into_iter().zip(read) {
                values[at] = value;
            }
            return Ok(values);
        }
        // Which primary failed is not known: each part again, on its own
        // and under its breaker, so that the failure counts where it
        // belongs and the other parts still serve. A batch that meets a
        // stalled primary before its breaker opens waits two op timeouts.
        self.read_parts(keys, groups).await
    }

    /// [`Cache::read_many`] of each part of `keys` (`groups`: the places of
    /// one primary's keys, with its breaker) on its own, concurrently; the
    /// keys of a part that failed read as absent, unless all failed.
    async fn read_parts(
        &self,
        keys: &[String],
        groups: Vec<(BreakerRef<'_>, Vec<usize>)>,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let inner = &*self.inner;
        let reads = join_all(groups.into_iter().map(|(breaker, indices)| async move {
            let part: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
            let read = self
                .run(
                    breaker,
                    inner.backend.get_many(&part, inner.read_limit),
                    true,
                )
                .await;
            (indices, read)
        }))
        .await;
        let mut values = vec![Fetched::Absent; keys.len()];
        let mut last_error = None;
        let mut any_read = false;
        for (indices, read) in reads {
            match read {
                Ok(read) => {
                    any_read = true;
                    for (at, value) in indices.into_iter().zip(read) {
                        values[at] = value;
                    }
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) if !any_read => Err(error),
            _ => Ok(values),
        }
    }

    /// `DEL` of many keys, each part of the backend (each cluster primary)
    /// under its own breaker, concurrently. The keys whose part failed, and
    /// the last error, so that only those are retried.
    pub(crate) async fn delete_many(&self, keys: &[String]) -> (Vec<String>, Option<CacheError>) {
        let mut failed = Vec::new();
        let mut last_error = None;
        for (indices, deleted) in self.delete_parts(keys).await {
            if let Err(error) = deleted {
                failed.extend(indices.into_iter().map(|at| keys[at].clone()));
                // The error that says least about what landed wins: the
                // keys are marked landed only if every part reached its
                // primary.
                if !matches!(&last_error, Some(e) if !CacheError::is_not_replicated(e)) {
                    last_error = Some(error);
                }
            }
        }
        (failed, last_error)
    }

    /// `DEL` of many keys (durably, if so configured), each part of the
    /// backend under its own breaker, concurrently: the indices of each
    /// part's keys in `keys`, with its outcome.
    async fn delete_parts(&self, keys: &[String]) -> Vec<(Vec<usize>, Result<u64, CacheError>)> {
        let inner = &*self.inner;
        let groups = inner.backend.by_breaker(&inner.breaker, keys);
        join_all(groups.into_iter().map(|(breaker, indices)| async move {
            let part: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
            let deleted = self
                .run(breaker, inner.backend.delete_durably(&part), true)
                .await;
            (indices, deleted)
        }))
        .await
    }

    /// The one body of [`Cache::guarded`] and [`Cache::timed`]: they return
    /// its future rather than await it, which would store the operation
    /// twice in every caller's future.
    async fn run<T>(
        &self,
        breaker: BreakerRef<'_>,
        operation: impl Future<Output = Result<T, CacheError>>,
        ask_breaker: bool,
    ) -> Result<T, CacheError> {
        let inner = &*self.inner;
        if !ask_breaker && breaker.is_open() && matches!(inner.backend, Backend::Cluster(_)) {
            // The janitor may be the only one left calling for this
            // primary (its keys' readers skip them while it retries): it
            // starts the probe once the cool-down is over.
            if breaker.permit() == Permit::Probe {
                self.probe(Arc::clone(breaker));
            }
            return Err(CacheError::CircuitOpen);
        }
        if ask_breaker {
            match breaker.permit() {
                Permit::Call => {}
                Permit::Skip => return Err(CacheError::CircuitOpen),
                Permit::Probe => {
                    self.probe(Arc::clone(breaker));
                    return Err(CacheError::CircuitOpen);
                }
            }
        }
        let started = breaker.failures_counted();
        // The memory backend cannot stall, and needs no Tokio timer.
        let outcome = if inner.backend.as_memory().is_some() {
            operation.await
        } else {
            match tokio::time::timeout(inner.op_timeout, operation).await {
                Ok(outcome) => outcome,
                Err(_) => Err(CacheError::Timeout(inner.op_timeout)),
            }
        };
        match &outcome {
            Err(error) if error.is_unavailable() => {
                // Every failure, unlike the limited warnings: which node
                // failed how, when a breaker opens where it should not.
                tracing::debug!(node = breaker.node(), %error, "cache operation failed");
                let timed_out = matches!(error, CacheError::Timeout(_));
                if error.counts_for_breaker() && breaker.record_failure_of(started, timed_out) {
                    self.log_opening(breaker, error);
                }
            }
            _ => breaker.record_success(),
        }
        outcome
    }

    /// Checks `breaker`'s part of the backend in a task of its own, which
    /// settles the breaker.
    fn probe(&self, breaker: Arc<Breaker>) {
        let inner = self.inner.clone();
        let probing = breaker.clone();
        let probe = async move {
            let breaker = probing;
            let slot = ProbeSlot::new(&breaker);
            let checked =
                tokio::time::timeout(inner.op_timeout, inner.backend.check(&breaker)).await;
            let outcome = checked.unwrap_or(Err(CacheError::Timeout(inner.op_timeout)));
            if let Err(error) = &outcome {
                tracing::debug!(%error, node = breaker.node(), "circuit breaker probe failed: the cache stays skipped for another cool-down");
            }
            let healthy = outcome.is_ok();
            slot.settled(healthy);
            if healthy {
                inner.janitor.backend_back();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(probe)),
            // Redis needs a runtime; without one the slot goes back at once.
            Err(_) => drop(ProbeSlot::new(&breaker)),
        }
    }

    fn log_opening(&self, breaker: &Breaker, error: &CacheError) {
        if error.is_rejected_credentials() {
            if let Some(suppressed) = self.inner.log_limit.admit() {
                log_rejected_credentials(error, suppressed);
            }
        } else {
            crate::limited!(
                self,
                warn!(
                    %error,
                    node = breaker.node(),
                    "cache unavailable: skipping it for a moment (circuit breaker open); calls run uncached"
                )
            );
        }
    }

    /// Counts an event of a cached function.
    #[inline]
    pub(crate) fn record(&self, site: &'static Site, event: Event) {
        self.inner.stats.record(Some(site.function()), event);
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
        if self.inner.trace_keys && !span.is_disabled() {
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

    /// Encodes a value to be stored, or `None` (counted and logged) when it
    /// cannot be encoded or is larger than the configured maximum.
    pub(crate) fn encode_for_store<V: Serialize + ?Sized>(
        &self,
        function: Option<&'static crate::stats::Function>,
        key: &str,
        value: &V,
    ) -> Option<Vec<u8>> {
        let inner = &*self.inner;
        match inner.codec.encode(value) {
            Ok(bytes) if bytes.len() <= inner.max_value_size => match inner.compress_above {
                Some(above) if bytes.len() > above => {
                    Some(crate::compression::compress(&bytes).unwrap_or(bytes))
                }
                _ => Some(bytes),
            },
            Ok(bytes) => {
                inner.stats.record(function, Event::Oversized);
                crate::limited!(
                    self,
                    warn!(
                        key,
                        size = bytes.len(),
                        max_value_size = inner.max_value_size,
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

    /// The Redis key, consuming the rendered key (no copy without a prefix).
    pub(crate) fn redis_key_of<V>(&self, key: CacheKey<V>) -> String {
        match &self.inner.prefix {
            Some(prefix) => {
                let key = key.into_string();
                let mut redis_key = crate::key::buffer(prefix.len() + 1 + key.len());
                redis_key.push_str(prefix);
                redis_key.push(':');
                redis_key.push_str(&key);
                crate::key::recycle(key);
                redis_key
            }
            None => key.into_string(),
        }
    }
}

/// Waits for a new backend's first answer (`contact`), at most `within`.
/// Start-up never fails on it: a cache whose server does not answer yet
/// starts with its breaker open and runs calls uncached until the server
/// does. Whether it answered.
async fn first_contact(
    what: &'static str,
    breaker: &Breaker,
    within: Duration,
    contact: impl Future<Output = Result<(), CacheError>>,
) -> bool {
    match tokio::time::timeout(within, contact).await {
        Ok(Ok(())) => {
            tracing::debug!(what, "connected");
            return true;
        }
        Ok(Err(error)) if error.is_rejected_credentials() => log_rejected_credentials(&error, 0),
        outcome => {
            let reason = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {within:?}"),
            };
            tracing::warn!(%reason, "{what} is not reachable yet; calls run uncached until it is");
        }
    }
    breaker.record_failure(true);
    false
}

fn log_rejected_credentials(error: &CacheError, suppressed: u64) {
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
            assert_eq!(cache.inner.read_limit, cache.inner.max_value_size + 256);
            cache.inner.max_value_size
        }
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
