//! [`CacheBuilder`]: the settings of a cache, its backend's first contact,
//! and the assembly of the handle.

#[allow(clippy::wildcard_imports)]
use super::*;

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
    share_reads: bool,
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
    /// The defaults.
    pub(super) fn new() -> CacheBuilder {
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
            share_reads: true,
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

    /// Whether concurrent reads of one key share one request. Default
    /// `true`: past two reads of a key in flight, the calls that come for
    /// it wait for the next read and share its reply (never a read sent
    /// before they began, so every guarantee holds). A hot key then costs
    /// Redis fewer reads, and its callers may wait up to a round trip
    /// more. `false` sends every call's read at once. See
    /// [the guide](crate::guide::stampede#hot-keys-concurrent-reads-share-one-request)
    /// for the bounds and the reads that never share.
    pub fn share_reads(mut self, share: bool) -> Self {
        self.share_reads = share;
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
        let (backend, answered) = match self.backend.take() {
            None => return Err(CacheError::NoBackend),
            Some(BackendChoice::Memory { capacity_bytes }) => {
                (Backend::Memory(MemoryBackend::new(capacity_bytes)), false)
            }
            Some(BackendChoice::Url(url)) => {
                let redis = RedisBackend::new(&url, &options)?;
                let answered =
                    first_contact("Redis", &breaker, first_contact_within, redis.ping()).await;
                (Backend::Redis(redis), answered)
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
                let answered = first_contact(
                    "the Sentinel primary",
                    &breaker,
                    first_contact_within,
                    contact,
                )
                .await;
                (Backend::Sentinel(sentinel), answered)
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
                let answered =
                    first_contact("Redis Cluster", &breaker, first_contact_within, refresh).await;
                if answered {
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
                (Backend::Cluster(cluster), answered)
            }
        };
        let cache = self.assemble(backend, breaker);
        super::servers::first_reading(&cache, answered).await;
        Ok(cache)
    }

    pub(super) fn breaker(&self) -> Arc<Breaker> {
        Arc::new(Breaker::new(self.breaker_failures, self.breaker_cooldown))
    }

    /// The bytes a 1 Gbit/s link carries in `share` of the op timeout.
    fn gigabit_bytes(&self, share: u128) -> usize {
        let bytes = self.op_timeout.as_millis() * GIGABIT_BYTES_PER_MILLI / share;
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    pub(super) fn assemble(self, backend: Backend, breaker: Arc<Breaker>) -> Cache {
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
        // The memory backend has no round trip to share.
        let reads = SharedReads::new(
            self.op_timeout,
            self.share_reads && backend.as_memory().is_none(),
        );
        Cache {
            inner: Arc::new(Inner {
                backend,
                settings: Settings {
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
                },
                breaker,
                stats: Recorder::default(),
                flights: Flights::new(self.op_timeout.saturating_mul(2)),
                reads,
                janitor: Janitor::default(),
                log_limit: LogLimit::default(),
                clock: self.clock,
                local,
            }),
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
