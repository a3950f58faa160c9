//! Redis cache-aside for async Rust functions, by attribute.
//!
//! `#[redis_cached]` turns an `async fn` into a cache-aside lookup: a hit is
//! one `GET`; a miss runs the body and stores the result with a TTL. The key
//! template is checked at compile time, and a cache that is down, slow or
//! holding garbage never fails the call: the body runs (fail open).
//!
//! ```
//! use cache_runtime::{Cache, redis_cached};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct User { id: u64 }
//! # #[derive(Debug)] struct DbError;
//!
//! #[redis_cached(key = "user:<id>", ttl = 60)]
//! async fn get_user(id: u64) -> Result<User, DbError> {
//!     Ok(User { id }) // the slow query
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     Cache::memory().install(); // or Cache::connect("redis://127.0.0.1:6379").await?
//!     let user = get_user(42).await.map_err(|_| "db")?; // miss: runs the body
//!     let again = get_user(42).await.map_err(|_| "db")?; // hit: one GET
//!     assert_eq!((user.id, again.id), (42, 42));
//!     assert_eq!(get_user_cache_key(&42).as_str(), "user:42");
//!     Ok(())
//! }
//! ```
//!
//! `Result<T, E>` caches `Ok` only; `Option<T>` caches `Some`;
//! `Result<Option<T>, E>` caches `Ok(Some)`; anything else is cached as is.
//! The cached type needs `Serialize + DeserializeOwned`, not `Clone`.
//!
//! Module map: [`Cache`] (handle, builder, fail-open lookup), [`KeyPart`] and
//! [`CacheKey`] (key rendering), [`Codec`], [`Stats`].

// Generated code names `::cache_runtime`; this lets the crate's own tests
// use the macro.
extern crate self as cache_runtime;

mod backend;
mod breaker;
mod cache;
mod codec;
mod error;
mod key;
mod outcome;
mod site;
mod stats;

#[doc(hidden)]
pub mod __private;

pub use crate::cache::{Cache, CacheBuilder};
pub use crate::codec::{Codec, CodecError};
pub use crate::error::CacheError;
pub use crate::key::{CacheKey, KeyPart, KeyWriter};
pub use crate::stats::{Counts, Stats};

/// Caches an `async fn`'s result (cache-aside).
///
/// ```text
/// #[redis_cached(key = "user:<id>", ttl = 60)]
/// #[redis_cached(key = "org:<org.id>:member:<user_id>", ttl = "5m", skip(db), jitter = 0.1, version = 2)]
/// #[redis_cached(key = "tenant:<self.tenant>:user:<id>", ttl = 60, cache = self.cache)]
/// ```
///
/// | argument | meaning |
/// |---|---|
/// | `key = "..."` | required. Literal text and `<param>` / `<param.field>` / `<self.field>` placeholders. |
/// | `ttl = 60` / `ttl = "5m"` | required. Seconds, or a duration string checked at compile time; never 0. |
/// | `skip(a, b)` | parameters deliberately left out of the key. Every other parameter must be in it. |
/// | `jitter = 0.1` | spread each TTL by up to ±10% so entries written together expire apart. |
/// | `version = 2` | appended to the key (`:v2`), so a changed value type never decodes old entries. |
/// | `cache = expr` | a `Cache` (or `&Cache`) other than the installed one, e.g. `self.cache`. |
/// | `crate = "path"` | where `cache_runtime` is, for crates that re-export it. |
///
/// It also generates `<fn>_cache_key(&params…) -> CacheKey` with the same
/// visibility (an associated fn for methods): the one place the key is built.
///
/// A missing `KeyPart` impl is reported at the parameter, a value that is not
/// `Serialize + DeserializeOwned` at the return type.
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::redis_cached;
