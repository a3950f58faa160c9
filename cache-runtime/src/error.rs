//! The runtime's error type. Cached calls never return it (they fail open);
//! it comes back from set-up (`Cache::connect`) and from direct operations
//! such as `Cache::invalidate`.

use std::time::Duration;

use crate::codec::CodecError;

/// What went wrong talking to the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The URL could not be parsed. The only error `Cache::connect` returns.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// `Cache::builder()` was finished without `.url(...)` or `.memory()`.
    #[error("no backend chosen: call `.url(\"redis://...\")` or `.memory()` on the builder")]
    NoBackend,
    /// The key prefix is empty or contains spaces or non-printable characters.
    #[error("invalid key prefix {0:?}: use printable ASCII without spaces, e.g. \"myapp\"")]
    InvalidPrefix(String),
    /// Redis answered with an error or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The operation took longer than the cache's op timeout.
    #[error("cache operation timed out after {0:?}")]
    Timeout(Duration),
    /// The circuit breaker is open after repeated failures; the cache is not
    /// being called for a moment.
    #[error("cache skipped: circuit breaker open after repeated failures")]
    CircuitOpen,
    /// A value could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
}
