//! Where bytes are stored: Redis (standalone, Sentinel or Cluster) or
//! process memory, behind one contract.
//!
//! # The backend contract
//!
//! Every backend offers exactly these operations, with these semantics; the
//! conformance suite (`tests/conformance.rs`) checks them against each
//! backend, so that "same semantics" is a tested claim.
//!
//! | operation | semantics |
//! |---|---|
//! | `get(key, limit)` | the bytes under `key`; absent if absent, expired or empty; `TooLarge`, without transferring them, if longer than `limit` |
//! | `get_many(keys, limit)` | `get` of each key, in order, in one round trip (batch lookups) |
//! | `get_with_ttl(key, limit)` | the bytes (an empty value too) and how long they have left, by the *server's* clock (`None`: no expiry); `TooLarge` as `get` |
//! | `set(key, value, px)` | store unconditionally, expiring after `px` ms |
//! | `set_if_absent(key, value, px)` | store only if absent (an expired key is absent); whether it stored |
//! | `compare_and_set(key, prefix, value, px)` | replace only if the current value starts with `prefix`; whether it did |
//! | `compare_and_delete(key, prefix)` | delete only if the current value starts with `prefix`; whether it did |
//! | `compare_and_expire(key, prefix, px)` | reset the expiry to `px` ms only if the value starts with `prefix`; whether it did |
//! | `set_if_longer(key, limit, value, px)` | replace only if the current value is longer than `limit` bytes (one too large to read); whether it did |
//! | `delete(keys)` | delete every key; how many existed |
//! | `check()` | whether the backend can be used (the circuit breaker's probe) |
//!
//! Each operation is atomic with respect to the others on the same key.
//! Expiry is the backend's own: no decision of the cache reads a host's
//! wall clock. Values are arbitrary bytes (NUL included). `px` is at least 1.
//!
//! Reads stop at a limit (the cache's `max_value_size` and room for its
//! headers), so that one entry that is too large, written by someone else
//! or by a cache with a larger limit, costs one short reply instead of a
//! transfer that holds the connection past every call's op timeout. `get`
//! is `GETRANGE key 0 limit`, which costs the server what `GET` does and
//! answers an empty string for a missing key: the cache never stores an
//! empty value, and `get_with_ttl` (a script) tells the two apart.
//! The memory backend never fails; the Redis backend fails with
//! [`CacheError`], and `Cache` adds the op timeout and the circuit breaker.

mod cluster;
mod commands;
pub(crate) mod info;
mod memory;
mod redis;
mod sentinel;

pub(crate) use self::cluster::ClusterBackend;

/// How every Redis backend connects, settled once by `CacheBuilder`.
pub(crate) struct ConnectOptions<'a> {
    /// `TCP_NODELAY` (`CacheBuilder::tcp_nodelay`).
    pub(crate) nodelay: bool,
    /// What writes wait for (`CacheBuilder::write_durability`).
    pub(crate) durability: Option<Durability>,
    /// `rediss://` settings (feature `tls`).
    pub(crate) tls: Option<&'a Tls>,
    /// The op timeout: a cluster's clients answer within it.
    pub(crate) op_timeout: Duration,
    /// Failures before a breaker opens, and its cool-down: a cluster keeps
    /// one breaker per primary.
    pub(crate) breaker: (u32, Duration),
}
use self::commands::Track;
pub(crate) use self::commands::{Durability, Wanted};
pub(crate) use self::memory::MemoryBackend;
pub(crate) use self::redis::RedisBackend;
pub(crate) use self::sentinel::{PrimaryInUse, SentinelAuth, SentinelBackend, SentinelService};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::breaker::Breaker;
use crate::error::CacheError;
use crate::stats::{Operation, OperationTimer};

/// The longest expiry (ms) this process has stored a value with, or read
/// a cached function of (lease placeholders and locks, which never become
/// values with their own expiry, are not counted): no entry of those lives longer, which bounds how
/// long a cache that lost track of an invalidation must distrust its
/// entries (see `janitor::Suspect`).
static LONGEST_PX: AtomicU64 = AtomicU64::new(0);

pub(crate) fn note_px(px: u64) {
    if px > LONGEST_PX.load(Ordering::Relaxed) {
        LONGEST_PX.fetch_max(px, Ordering::Relaxed);
    }
}

/// See [`LONGEST_PX`].
pub(crate) fn longest_px() -> u64 {
    LONGEST_PX.load(Ordering::Relaxed)
}

/// `get_with_ttl` on a connection of the caller's (the local tier's
/// tracking connection).
pub(crate) async fn get_with_ttl_on(
    conn: &mut ::redis::aio::MultiplexedConnection,
    key: &str,
    limit: usize,
) -> Result<Fetched<Stored>, CacheError> {
    let _timer = OperationTimer::start(Operation::GetWithTtl, true);
    commands::get_with_ttl(conn, key, limit, Track::Keys).await
}

/// `get` on the tracking connection (a tagged entry checked against the
/// tags' kept tokens: see `crate::local`).
pub(crate) async fn get_on(
    conn: &mut ::redis::aio::MultiplexedConnection,
    key: &str,
    limit: usize,
) -> Result<Fetched<Vec<u8>>, CacheError> {
    let _timer = OperationTimer::start(Operation::Get, true);
    commands::get(conn, key, limit).await
}

/// `get_tagged` on the tracking connection, so that the tags' tokens it
/// reads are tracked there and may be kept.
pub(crate) async fn get_tagged_on(
    conn: &mut ::redis::aio::MultiplexedConnection,
    key: &str,
    tags: &[String],
    limit: usize,
) -> Result<(Fetched<Vec<u8>>, Vec<Fetched<Vec<u8>>>), CacheError> {
    let _timer = OperationTimer::start(Operation::GetMany, true);
    commands::get_tagged(conn, key, tags, limit, Track::Keys).await
}

/// Tags' tokens (`MGET`) on the tracking connection, so that they are
/// tracked there and may be kept.
pub(crate) async fn get_tokens_on(
    conn: &mut ::redis::aio::MultiplexedConnection,
    keys: &[String],
    limit: usize,
) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
    let _timer = OperationTimer::start(Operation::GetMany, true);
    commands::get_tokens(conn, keys, limit, Track::Keys).await
}

/// Parses a `redis://` (or, with the `tls` feature, `rediss://`) URL.
pub(crate) fn connection_info(url: &str) -> Result<::redis::ConnectionInfo, CacheError> {
    ::redis::IntoConnectionInfo::into_connection_info(url).map_err(CacheError::invalid_url)
}

/// Certificates for `rediss://` connections: a root CA to trust instead
/// of the system's, and a client certificate for mutual TLS.
#[cfg(feature = "tls")]
pub(crate) type Tls = ::redis::TlsCertificates;

/// Without the `tls` feature there are no certificates to give.
#[cfg(not(feature = "tls"))]
#[derive(Debug, Clone)]
pub(crate) enum Tls {}

/// Whether a URL asks for TLS (`rediss://`).
pub(crate) fn tls_mode(info: &::redis::ConnectionInfo) -> Option<::redis::TlsMode> {
    match info.addr() {
        ::redis::ConnectionAddr::TcpTls { insecure, .. } => Some(if *insecure {
            ::redis::TlsMode::Insecure
        } else {
            ::redis::TlsMode::Secure
        }),
        _ => None,
    }
}

/// A client for one server, with the builder's certificates if any.
pub(crate) fn client(
    info: ::redis::ConnectionInfo,
    tls: Option<&Tls>,
) -> Result<::redis::Client, CacheError> {
    match tls {
        #[cfg(feature = "tls")]
        Some(certificates) if tls_mode(&info).is_some() => {
            ::redis::Client::build_with_tls(info, certificates.clone())
        }
        _ => ::redis::Client::open(info),
    }
    .map_err(CacheError::invalid_url)
}

/// The builder's certificates for a cluster's nodes.
pub(crate) fn cluster_certificates(
    builder: ::redis::cluster::ClusterClientBuilder,
    tls: Option<&Tls>,
) -> ::redis::cluster::ClusterClientBuilder {
    match tls {
        #[cfg(feature = "tls")]
        Some(certificates) => builder.certs(certificates.clone()),
        _ => builder,
    }
}

/// The builder's certificates for the sentinels and the nodes they name.
pub(crate) fn sentinel_certificates(
    builder: ::redis::sentinel::SentinelClientBuilder,
    tls: Option<&Tls>,
) -> ::redis::sentinel::SentinelClientBuilder {
    match tls {
        #[cfg(feature = "tls")]
        Some(certificates) => builder
            .set_client_to_redis_certificates(certificates.clone())
            .set_client_to_sentinel_certificates(certificates.clone()),
        _ => builder,
    }
}

/// Which circuit breaker guards an operation: the backend's one, or (on a
/// cluster) the breaker of the primary that serves the key, borrowed from
/// the backend (no reference count to contend on per call).
pub(crate) type BreakerRef<'a> = &'a Arc<Breaker>;

/// What a read found under one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched<T> {
    /// No value (see the module docs for `get` and empty values).
    Absent,
    /// The value.
    Found(T),
    /// A value longer than the read's limit: not transferred.
    TooLarge,
}

impl<T> Fetched<T> {
    /// The value, changed by `f`.
    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Fetched<U> {
        match self {
            Fetched::Absent => Fetched::Absent,
            Fetched::Found(value) => Fetched::Found(f(value)),
            Fetched::TooLarge => Fetched::TooLarge,
        }
    }
}

/// Bytes read with their remaining time to live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) bytes: Vec<u8>,
    /// Milliseconds left, by the backend's clock; `None` when the key has
    /// no expiry (written by someone else than this cache).
    pub(crate) ttl_millis: Option<u64>,
}

/// How long a key has left, by the server's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ttl {
    /// Read without its TTL (`GETRANGE`).
    Unknown,
    Left(u64),
    Forever,
}

impl Ttl {
    /// A value read with its TTL, as bytes and how long they have left.
    pub(crate) fn of(stored: Stored) -> (Vec<u8>, Ttl) {
        let ttl = stored.ttl_millis.map_or(Ttl::Forever, Ttl::Left);
        (stored.bytes, ttl)
    }
}

#[derive(Debug)]
pub(crate) enum Backend {
    Redis(RedisBackend),
    Sentinel(SentinelBackend),
    Cluster(ClusterBackend),
    Memory(MemoryBackend),
}

/// A connection to Redis, standalone, Sentinel or Cluster: the single-key
/// commands of the contract ([`commands`]) are sent on it the same way.
pub(crate) enum Conn {
    Standalone(::redis::aio::ConnectionManager),
    Sentinel(self::sentinel::SentinelConn),
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ::redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a ::redis::Cmd,
    ) -> ::redis::RedisFuture<'a, ::redis::Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The same server, spoken to in RESP3 (push messages need it).
pub(crate) fn resp3(info: ::redis::ConnectionInfo) -> ::redis::ConnectionInfo {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(::redis::ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

impl Backend {
    /// Times `operation` for the `metrics` feature's histogram (Redis
    /// round trips only).
    #[inline]
    fn timer(&self, operation: Operation) -> OperationTimer {
        OperationTimer::start(operation, !matches!(self, Backend::Memory(_)))
    }

    /// A connection for a single-key command (a handle clone), or the
    /// in-process backend.
    fn connection(&self) -> Result<Conn, &MemoryBackend> {
        match self {
            Backend::Redis(r) => Ok(Conn::Standalone(r.conn())),
            Backend::Sentinel(s) => Ok(Conn::Sentinel(s.conn())),
            Backend::Cluster(c) => Ok(Conn::Cluster(c.conn())),
            Backend::Memory(m) => Err(m),
        }
    }

    /// The circuit breaker probe: whether `breaker`'s part of the backend
    /// can be used again.
    pub(crate) async fn check(&self, breaker: &Breaker) -> Result<(), CacheError> {
        match self {
            Backend::Redis(r) => r.check().await,
            Backend::Sentinel(s) => s.check().await,
            Backend::Cluster(c) => c.check(breaker.node()).await,
            Backend::Memory(_) => Ok(()),
        }
    }

    /// The breaker of `key`'s part of the backend.
    /// A number that changes whenever a key may have moved to another
    /// primary: on a cluster, each time the slot map changes owners (a
    /// failover, a resharding); 0 elsewhere (Sentinel's failovers are
    /// covered by its fence, which deletes recent writes' keys on the new
    /// primary before it is used).
    pub(crate) fn primaries_epoch(&self) -> u64 {
        match self {
            Backend::Cluster(c) => c.primaries_epoch(),
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Memory(_) => 0,
        }
    }

    pub(crate) fn breaker<'a>(&'a self, shared: &'a Arc<Breaker>, key: &str) -> BreakerRef<'a> {
        match self {
            Backend::Cluster(c) => c.breaker_of(key),
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Memory(_) => shared,
        }
    }

    /// Indices of `keys` grouped by the part of the backend that serves
    /// them, with its breaker: one group, except on a cluster (by primary).
    pub(crate) fn by_breaker<'a>(
        &'a self,
        shared: &'a Arc<Breaker>,
        keys: &[String],
    ) -> Vec<(BreakerRef<'a>, Vec<usize>)> {
        match self {
            Backend::Cluster(c) => c.by_node(keys),
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Memory(_) => {
                vec![(shared, (0..keys.len()).collect())]
            }
        }
    }

    pub(crate) async fn get(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Fetched<Vec<u8>>, CacheError> {
        let _timer = self.timer(Operation::Get);
        if let Backend::Redis(redis) = self {
            // Every hit's command: unboxed (see `get_standalone`).
            return commands::get_standalone(&mut redis.conn(), key, limit).await;
        }
        match self.connection() {
            Ok(mut conn) => commands::get(&mut conn, key, limit).await,
            Err(m) => Ok(m.get(key, limit)),
        }
    }

    pub(crate) async fn get_many(
        &self,
        keys: &[String],
        limit: usize,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let _timer = self.timer(Operation::GetMany);
        match self {
            Backend::Redis(r) => r.get_many(keys, limit).await,
            Backend::Sentinel(s) => commands::get_many(&mut s.conn(), keys, limit).await,
            Backend::Cluster(c) => c.get_many(keys, limit).await,
            Backend::Memory(m) => Ok(keys.iter().map(|key| m.get(key, limit)).collect()),
        }
    }

    /// Tags' tokens (or tag clocks'): one `MGET` where the keys share a
    /// slot (off a cluster, always), else [`Backend::get_many`].
    pub(crate) async fn get_tokens(
        &self,
        keys: &[String],
        limit: usize,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        if let Backend::Cluster(_) = self {
            let first = keys.first().map(|key| crate::slot::slot_of(key.as_bytes()));
            if keys
                .iter()
                .any(|key| Some(crate::slot::slot_of(key.as_bytes())) != first)
            {
                return self.get_many(keys, limit).await;
            }
        }
        let _timer = self.timer(Operation::GetMany);
        match self.connection() {
            Ok(mut conn) => commands::get_tokens(&mut conn, keys, limit, Track::Not).await,
            Err(m) => Ok(keys.iter().map(|key| m.get(key, limit)).collect()),
        }
    }

    /// A tagged entry and its tags' tokens: in one request off a cluster;
    /// on a cluster (where they live in different slots) the two reads
    /// are sent together. (The read path reads a cluster's entry and tags
    /// apart, each primary's under its own breaker.)
    pub(crate) async fn get_tagged(
        &self,
        key: &str,
        tags: &[String],
        limit: usize,
    ) -> Result<(Fetched<Vec<u8>>, Vec<Fetched<Vec<u8>>>), CacheError> {
        if let Backend::Cluster(_) = self {
            let (entry, tokens) =
                futures_util::future::join(self.get(key, limit), self.get_many(tags, limit)).await;
            return Ok((entry?, tokens?));
        }
        let _timer = self.timer(Operation::GetMany);
        match self.connection() {
            Ok(mut conn) => commands::get_tagged(&mut conn, key, tags, limit, Track::Not).await,
            Err(m) => Ok((
                m.get(key, limit),
                tags.iter().map(|tag| m.get(tag, limit)).collect(),
            )),
        }
    }

    pub(crate) async fn get_with_ttl(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Fetched<Stored>, CacheError> {
        let _timer = self.timer(Operation::GetWithTtl);
        match self.connection() {
            Ok(mut conn) => commands::get_with_ttl(&mut conn, key, limit, Track::Not).await,
            Err(m) => Ok(m.get_with_ttl(key, limit)),
        }
    }

    pub(crate) async fn set_if_longer(
        &self,
        key: &str,
        limit: usize,
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let _timer = self.timer(Operation::SetIfLonger);
        note_px(px);
        match self.connection() {
            Ok(mut conn) => commands::set_if_longer(&mut conn, key, limit, value, px).await,
            Err(m) => Ok(m.set_if_longer(key, limit, value, px)),
        }
    }

    pub(crate) async fn set(&self, key: &str, value: &[u8], px: u64) -> Result<(), CacheError> {
        let _timer = self.timer(Operation::Set);
        note_px(px);
        match self.connection() {
            Ok(mut conn) => commands::set(&mut conn, key, value, px).await,
            Err(m) => {
                m.set(key, value, px);
                Ok(())
            }
        }
    }

    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let _timer = self.timer(Operation::SetIfAbsent);
        match self.connection() {
            Ok(mut conn) => commands::set_if_absent(&mut conn, key, value, px).await,
            Err(m) => Ok(m.set_if_absent(key, value, px)),
        }
    }

    pub(crate) async fn compare_and_set(
        &self,
        key: &str,
        prefix: &[u8],
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let _timer = self.timer(Operation::CompareAndSet);
        note_px(px);
        match self.connection() {
            Ok(mut conn) => commands::compare_and_set(&mut conn, key, prefix, value, px).await,
            Err(m) => Ok(m.compare_and_set(key, prefix, value, px)),
        }
    }

    pub(crate) async fn compare_and_delete(
        &self,
        key: &str,
        prefix: &[u8],
    ) -> Result<bool, CacheError> {
        let _timer = self.timer(Operation::CompareAndDelete);
        match self.connection() {
            Ok(mut conn) => commands::compare_and_delete(&mut conn, key, prefix).await,
            Err(m) => Ok(m.compare_and_delete(key, prefix)),
        }
    }

    pub(crate) async fn compare_and_expire(
        &self,
        key: &str,
        prefix: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let _timer = self.timer(Operation::CompareAndExpire);
        match self.connection() {
            Ok(mut conn) => commands::compare_and_expire(&mut conn, key, prefix, px).await,
            Err(m) => Ok(m.compare_and_expire(key, prefix, px)),
        }
    }

    /// `set` of a write-through, which waits for replicas where
    /// configured (`CacheBuilder::write_durability`).
    pub(crate) async fn set_durably(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<(), CacheError> {
        let _timer = self.timer(Operation::Set);
        note_px(px);
        match self {
            Backend::Redis(r) => r.set_durably(key, value, px).await,
            Backend::Sentinel(s) => s.set_durably(key, value, px).await,
            Backend::Cluster(c) => c.set_durably(key, value, px).await,
            Backend::Memory(m) => {
                m.set(key, value, px);
                Ok(())
            }
        }
    }

    /// A command of write-behind's on `key`'s node (its first key), then
    /// `WAIT` for replicas as [`Backend::set_durably`] does. Fails with
    /// [`CacheError::NotRedis`] on the in-process backend.
    pub(crate) async fn run_durably(
        &self,
        key: &str,
        cmd: &::redis::Cmd,
    ) -> Result<::redis::Value, CacheError> {
        let _timer = self.timer(Operation::Set);
        match self {
            Backend::Redis(r) => r.run_durably(key, cmd).await,
            Backend::Sentinel(s) => s.run_durably(key, cmd).await,
            Backend::Cluster(c) => c.run_durably(key, cmd).await,
            Backend::Memory(_) => Err(CacheError::NotRedis),
        }
    }

    /// A command of write-behind's on its first key's node, without
    /// waiting for replicas. Fails with [`CacheError::NotRedis`] on the
    /// in-process backend.
    pub(crate) async fn run(&self, cmd: &::redis::Cmd) -> Result<::redis::Value, CacheError> {
        match self.connection() {
            Ok(mut conn) => commands::query(&mut conn, cmd).await,
            Err(_) => Err(CacheError::NotRedis),
        }
    }

    /// `delete` of an invalidation, which waits for replicas where
    /// configured (`CacheBuilder::write_durability`).
    pub(crate) async fn delete_durably(&self, keys: &[String]) -> Result<u64, CacheError> {
        let _timer = self.timer(Operation::Delete);
        match self {
            Backend::Redis(r) => r.delete_durably(keys).await,
            Backend::Sentinel(s) => s.delete_durably(keys).await,
            Backend::Cluster(c) => c.delete_durably(keys).await,
            Backend::Memory(m) => Ok(m.delete(keys)),
        }
    }

    /// Where a `SCAN` of every key must run: the server, or (on a
    /// cluster) each primary by address, from a slot map read now.
    pub(crate) async fn scan_targets(&self) -> Result<Vec<Option<String>>, CacheError> {
        match self {
            Backend::Cluster(c) => {
                c.refresh().await?;
                Ok(c.primaries().into_iter().map(Some).collect())
            }
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Memory(_) => Ok(vec![None]),
        }
    }

    /// One step of `SCAN cursor MATCH pattern` on `target` (see
    /// [`Backend::scan_targets`]); the memory backend answers every key
    /// that starts with `prefix` at once.
    pub(crate) async fn scan(
        &self,
        target: Option<&str>,
        cursor: u64,
        pattern: &str,
        prefix: &str,
    ) -> Result<(u64, Vec<String>), CacheError> {
        let _timer = self.timer(Operation::Scan);
        const COUNT: usize = 1000;
        match (self, target) {
            (Backend::Cluster(c), Some(addr)) => c.scan_node(addr, cursor, pattern, COUNT).await,
            (Backend::Memory(m), _) => Ok((0, m.keys_with_prefix(prefix))),
            _ => match self.connection() {
                Ok(mut conn) => commands::scan(&mut conn, cursor, pattern, COUNT).await,
                Err(m) => Ok((0, m.keys_with_prefix(prefix))),
            },
        }
    }

    /// Where `INFO` is read: the server, or each primary of the slot map
    /// the cluster client has now (not read again for it: a cache reads
    /// `INFO` every 10 s, and a new slot map has consequences).
    pub(crate) fn info_targets(&self) -> Vec<Option<String>> {
        match self {
            Backend::Cluster(c) => c.primaries().into_iter().map(Some).collect(),
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Memory(_) => vec![None],
        }
    }

    /// `INFO` of `target` (see [`Backend::info_targets`]), as text. Not
    /// timed in `cache_operation_duration_seconds`: not a cache operation.
    pub(crate) async fn info(&self, target: Option<&str>) -> Result<String, CacheError> {
        match (self, target) {
            (Backend::Cluster(c), Some(addr)) => c.info_node(addr).await,
            _ => match self.connection() {
                Ok(mut conn) => ::redis::cmd("INFO")
                    .query_async(&mut conn)
                    .await
                    .map_err(CacheError::redis),
                Err(_) => Err(CacheError::NotRedis),
            },
        }
    }

    /// `UNLINK` of keys (`DEL` that frees their memory in the background);
    /// how many existed.
    pub(crate) async fn unlink(&self, keys: &[String]) -> Result<u64, CacheError> {
        let _timer = self.timer(Operation::Unlink);
        match self {
            Backend::Redis(_) => match self.connection() {
                Ok(mut conn) => commands::unlink(&mut conn, keys).await,
                Err(m) => Ok(m.delete(keys)),
            },
            Backend::Sentinel(s) => s.unlink(keys).await,
            Backend::Cluster(c) => c.unlink(keys).await,
            Backend::Memory(m) => Ok(m.delete(keys)),
        }
    }

    /// A command of the user's own (`Cache::command`); the memory backend
    /// has no Redis to send it to.
    pub(crate) async fn query<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
    ) -> Result<T, CacheError> {
        let _timer = self.timer(Operation::Command);
        match self.connection() {
            Ok(mut conn) => cmd.query_async(&mut conn).await.map_err(CacheError::redis),
            Err(_) => Err(CacheError::NotRedis),
        }
    }

    /// A pipeline of the user's own (`Cache::pipeline`).
    pub(crate) async fn query_pipeline<T: ::redis::FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
    ) -> Result<T, CacheError> {
        let _timer = self.timer(Operation::Pipeline);
        match self.connection() {
            Ok(mut conn) => pipe.query_async(&mut conn).await.map_err(CacheError::redis),
            Err(_) => Err(CacheError::NotRedis),
        }
    }

    /// `PUBLISH` on the cache's connection (the local tier's broadcast);
    /// nothing on the memory backend.
    pub(crate) async fn publish(&self, channel: &str, message: &[u8]) -> Result<(), CacheError> {
        let _timer = self.timer(Operation::Publish);
        match self.connection() {
            Ok(mut conn) => commands::publish(&mut conn, channel, message).await,
            Err(_) => Ok(()),
        }
    }

    /// The in-process backend, whose operations complete without awaiting.
    pub(crate) fn as_memory(&self) -> Option<&MemoryBackend> {
        match self {
            Backend::Memory(m) => Some(m),
            Backend::Redis(_) | Backend::Sentinel(_) | Backend::Cluster(_) => None,
        }
    }
}
