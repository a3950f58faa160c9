//! The runtime's error type. Cached calls never return it (they fail open);
//! it comes back from set-up (`Cache::connect`) and from direct operations
//! such as `Cache::invalidate`.
//!
//! Classification lives on the error, as in the `redis` crate
//! (`is_unavailable`, `is_rejected_credentials`), and no type of the `redis`
//! crate appears in this API: its major version is ours to change.

use std::fmt;
use std::time::Duration;

use crate::codec::CodecError;

/// What went wrong talking to the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The URL could not be parsed. The only error `Cache::connect` returns.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] BackendError),
    /// `Cache::builder()` was finished without `.url(...)` or `.memory()`.
    #[error(
        "no backend chosen: call `.url(\"redis://...\")`, `.cluster([...])` with at least one seed node, or `.memory()` on the builder"
    )]
    NoBackend,
    /// The key prefix is empty or contains spaces or non-printable characters.
    #[error("invalid key prefix {0:?}: use printable ASCII without spaces, e.g. \"myapp\"")]
    InvalidPrefix(String),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[source] BackendError),
    /// The operation took longer than the cache's op timeout. It may still
    /// have been applied by the server.
    #[error("cache operation timed out after {0:?}")]
    Timeout(Duration),
    /// The circuit breaker is open after repeated failures; the cache is not
    /// being called for a moment.
    #[error("cache skipped: circuit breaker open after repeated failures")]
    CircuitOpen,
    /// A write (an invalidation, a write-through) was applied by the
    /// primary but not acknowledged by as many replicas as
    /// `CacheBuilder::write_durability` asks within its timeout: it would be
    /// lost if that primary failed over now. Retried in the background.
    #[error("cache write acknowledged by {acknowledged} replica(s), {wanted} wanted")]
    NotReplicated {
        /// Replicas that acknowledged the write.
        acknowledged: u32,
        /// Replicas asked for.
        wanted: u32,
    },
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
    /// `Cache::clear` or `Cache::clear_prefix` on a cache without a key
    /// prefix: its entries cannot be told from the database's other keys.
    #[error(
        "Cache::clear and Cache::clear_prefix need a key prefix (`CacheBuilder::prefix`): without one, the cache's entries cannot be told from the other keys of the database (sessions, rate limits, other services' caches)"
    )]
    ClearWithoutPrefix,
    /// `Cache::command` or `Cache::pipeline` on the in-process backend:
    /// there is no Redis to send them to.
    #[error("Cache::command needs a Redis backend; this cache keeps its entries in process memory")]
    NotRedis,
    /// A tag's key holds something other than a tag's token (another
    /// application's data, or a tag invalidated again while its token was
    /// being made): the entries of that tag are read uncached for now.
    #[error("cache tag {0:?} could not be read: its key holds no token")]
    NotATag(String),
}

/// An error from the Redis server or the connection to it. Opaque: ask it
/// what kind of error it is; its `source()` chain has the details.
pub struct BackendError(redis::RedisError);

impl CacheError {
    pub(crate) fn redis(error: redis::RedisError) -> CacheError {
        CacheError::Redis(BackendError(error))
    }

    pub(crate) fn invalid_url(error: redis::RedisError) -> CacheError {
        CacheError::InvalidUrl(BackendError(error))
    }

    /// Whether the cache cannot be used at all right now (connection
    /// refused or dropped, I/O error, timeout, rejected credentials, circuit
    /// breaker open), as opposed to an error about one key or value (an
    /// error reply such as `WRONGTYPE` or `OOM`, an undecodable value).
    /// Unavailability is what opens the circuit breaker.
    pub fn is_unavailable(&self) -> bool {
        match self {
            CacheError::Timeout(_) | CacheError::CircuitOpen => true,
            CacheError::Redis(e) => e.is_unavailable() || e.is_rejected_credentials(),
            _ => false,
        }
    }

    /// A wrong password or user (`WRONGPASS`), or none where one is required
    /// (`NOAUTH`): every command fails the same way until the configuration
    /// is fixed.
    pub fn is_rejected_credentials(&self) -> bool {
        matches!(self, CacheError::Redis(e) if e.is_rejected_credentials())
    }

    /// The key holds another type than a string (`WRONGTYPE`: someone
    /// stored a list there): an error about that key's data, which the
    /// cache overwrites.
    pub(crate) fn is_wrong_type(&self) -> bool {
        matches!(self, CacheError::Redis(e) if e.code() == Some("WRONGTYPE"))
    }

    /// The server's ACL does not let the cache's user run the command or
    /// touch the key (`NOPERM`).
    pub fn is_not_permitted(&self) -> bool {
        matches!(self, CacheError::Redis(e) if e.code() == Some("NOPERM"))
    }

    /// A write the primary applied but not enough replicas acknowledged
    /// (see [`CacheError::NotReplicated`]).
    pub fn is_not_replicated(&self) -> bool {
        matches!(self, CacheError::NotReplicated { .. })
    }

    /// Whether this failure counts toward the circuit breaker: the node
    /// could not be reached or did not answer in time, or it rejected the
    /// credentials. A refusal ([`BackendError::is_refusal`]) does not: the
    /// node answered at once, and skipping it would only make calls bypass
    /// the cache past the moment it serves again (a `CLUSTERDOWN` on every
    /// node while one primary is being replaced opened the breakers of all
    /// of them for a cool-down).
    pub(crate) fn counts_for_breaker(&self) -> bool {
        self.is_unavailable() && !matches!(self, CacheError::Redis(e) if e.is_refusal())
    }

    /// Whether the operation may have been applied although it failed: it
    /// timed out, or the connection broke after it was sent. Such a write
    /// is assumed to have landed and is compensated.
    pub fn may_have_landed(&self) -> bool {
        match self {
            CacheError::Timeout(_) => true,
            CacheError::Redis(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

impl BackendError {
    /// The connection failed (refused, dropped, timed out, an I/O error),
    /// or the server cannot serve the key for a moment
    /// ([`BackendError::is_refusal`]).
    pub fn is_unavailable(&self) -> bool {
        self.is_unreachable() || self.is_refusal()
    }

    /// The node could not be reached, or did not answer: the connection
    /// was refused, dropped or timed out, an I/O error, or the cluster
    /// client has no connection to the key's node.
    pub fn is_unreachable(&self) -> bool {
        let e = &self.0;
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
    }

    /// The server answered, but cannot serve the key for a moment: a
    /// cluster whose topology is changing (`MOVED`/`ASK` left after the
    /// client's retries, `TRYAGAIN`), a cluster with a primary down and not
    /// yet replaced (`CLUSTERDOWN`, which every node answers with
    /// `cluster-require-full-coverage yes`, the default), a replica without
    /// its primary (`MASTERDOWN`), a demoted primary (`READONLY`), a
    /// server `LOADING` its data.
    pub fn is_refusal(&self) -> bool {
        let e = &self.0;
        matches!(
            e.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::Moved
                    | redis::ServerErrorKind::Ask
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ReadOnly
                    | redis::ServerErrorKind::BusyLoading
            )
        ) || matches!(
            e.code(),
            Some(
                "MOVED"
                    | "ASK"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "LOADING"
            )
        )
    }

    /// Redis rejected the credentials (`WRONGPASS`, `NOAUTH`).
    pub fn is_rejected_credentials(&self) -> bool {
        self.0.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(self.0.code(), Some("WRONGPASS" | "NOAUTH"))
    }

    /// The error code of an error reply (`"WRONGTYPE"`, `"OOM"`, ...).
    pub fn code(&self) -> Option<&str> {
        self.0.code()
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}
