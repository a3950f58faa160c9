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
//! The cached type needs `Serialize + DeserializeOwned` ([`Cacheable`]), not
//! `Clone`.
//!
//! Writes keep the cache right: [`invalidates`] deletes entries after a
//! successful write and [`cache_put`] stores the written value. Every miss
//! takes a lease on its key, so a value computed from data read before a
//! write is never stored after it. `tags = [...]` (and `tags_from`, the
//! groups a value names) groups entries for one invalidation
//! ([`guide::tags`]). Against stampedes, `#[redis_cached]`
//! takes `single_flight` (in process, or `"distributed"`), `stale` and
//! `early_refresh`.
//!
//! # Cancellation
//!
//! Cached calls and writes are cancel safe: a call's future may be dropped
//! at any `.await` (a request timeout, `select!`), and whatever it held (a
//! lease, a refresh lock, single-flight leadership, an unfinished
//! invalidation) is released; a cache command that timed out on the client
//! is assumed to have landed and is compensated. A call that starts after a
//! write's invalidation completed never returns a value read before it.
//! The repository's `docs/ARCHITECTURE.md` states the whole contract.
//!
//! # Deployments
//!
//! One [`Cache`] handle for each: a standalone server
//! ([`CacheBuilder::url`]), a Redis Cluster ([`CacheBuilder::cluster`], one
//! circuit breaker per primary), or the primary of a Sentinel service
//! ([`CacheBuilder::sentinel`], followed through failovers). With the `tls`
//! feature, `rediss://` URLs work on all three (rustls), with a private CA
//! and client certificates (`CacheBuilder::tls_root_certificate`,
//! `CacheBuilder::tls_client_certificate`).
//!
//! Module map: [`Cache`] (handle, builder, fail-open lookup), [`KeyPart`] and
//! [`CacheKey`] (key rendering), [`Codec`], [`Stats`], [`CacheError`],
//! [`inspect`] (the operator's view of entries and servers); the
//! [`guide`], one page per concern.

// Generated code names `::cache_runtime`; this lets the crate's own tests
// use the macro.
extern crate self as cache_runtime;

mod backend;
mod behind;
mod breaker;
mod cache;
mod clock;
mod codec;
mod compression;
mod error;
mod holder;
pub mod inspect;
mod key;
#[cfg(test)]
mod layout;
mod local;
mod log_limit;
mod outcome;
mod read;
mod scope;
mod site;
mod slot;
mod stats;
mod tag;
mod token;
mod write;

pub(crate) use log_limit::limited;

#[doc(hidden)]
pub mod __private;
#[cfg(feature = "__testing")]
#[doc(hidden)]
pub mod testing;

/// The guide: how each part works, what it promises with the default
/// settings, and what it leaves open. One page per concern; their examples
/// compile as doctests (those that need a server are `no_run`).
pub mod guide {
    #[doc = include_str!("guide/writes.md")]
    pub mod writes {}
    #[doc = include_str!("guide/write_behind.md")]
    pub mod write_behind {}
    #[doc = include_str!("guide/stampede.md")]
    pub mod stampede {}
    #[doc = include_str!("guide/batches.md")]
    pub mod batches {}
    #[doc = include_str!("guide/tags.md")]
    pub mod tags {}
    #[doc = include_str!("guide/fail_safe.md")]
    pub mod fail_safe {}
    #[doc = include_str!("guide/per_call.md")]
    pub mod per_call {}
    #[doc = include_str!("guide/keys.md")]
    pub mod keys {}
    #[doc = include_str!("guide/traits.md")]
    pub mod traits {}
    #[doc = include_str!("guide/local.md")]
    pub mod local {}
    #[doc = include_str!("guide/failures.md")]
    pub mod failures {}
    #[doc = include_str!("guide/deployments.md")]
    pub mod deployments {}
    #[doc = include_str!("guide/operations.md")]
    pub mod operations {}
}

pub use crate::behind::{
    Change, ChangeId, DeadLetter, Flusher, FlusherBuilder, QueueStatus, WriteBehindError,
    WriteQueue,
};
pub use crate::cache::{Cache, CacheBuilder, WriteDurability};
pub use crate::codec::{Codec, CodecError};
pub use crate::error::{BackendError, CacheError};
pub use crate::key::{CacheKey, KEPT_WHEN_HASHED, KeyPart, KeyWriter, MAX_KEY_LEN, Untyped};
pub use crate::local::LocalInvalidation;
pub use crate::outcome::Cacheable;
pub use crate::scope::{Origin, bypass, origin, refresh};
pub use crate::stats::{Counts, LocalStats, QueueStats, ServerStats, Stats};
/// What [`Cache::command`] and [`Cache::pipeline`] take and give back,
/// from the `redis` crate at the version the cache uses.
pub mod redis {
    pub use ::redis::{Cmd, FromRedisValue, Pipeline, ToRedisArgs, Value, cmd, pipe};
}

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
/// | `single_flight` | concurrent misses of one key in this process run the body once; the others decode its value. |
/// | `single_flight = "distributed"` | the same across processes, by waiting on the key's lease (at most one lease per holder, three in all). |
/// | `stale = "30s"` | after the TTL, serve the old value for up to 30 s while one caller (across processes) recomputes it. |
/// | `early_refresh` / `early_refresh = β` | XFetch: recompute before expiry with a probability that grows as expiry nears (β = 1). |
/// | `cache_none` / `none_ttl = "5s"` | negative caching: an answer of `None` is cached too (for the TTL, or its own). |
/// | `batch` | a batch lookup: the placeholder naming a collection of ids renders once per id; one `MGET`, the body runs with the missing ids only. |
/// | `local = "5s"` | keep a decoded copy in process memory for at most 5 s (never past the entry's freshness), dropped by the server's invalidation when the key changes anywhere; the value must be `Clone`. Redis 6 or later. |
/// | `tags = ["org:<org_id>", "members"]` | groups the entry belongs to, templates over what the key names: `#[invalidates(tag = "...")]` and [`Cache::invalidate_tag`] invalidate every entry of a group ([tags](crate::guide::tags)). |
/// | `tags_from = path` | groups only the value knows: `fn(&V) -> impl IntoIterator<Item = String>`, e.g. a listing tagged with each product it holds, reached by the product's tag ([tags from the value](crate::guide::tags#tags-the-value-knows-tags_from)). |
/// | `ttl_from = path` | the value's TTL: `fn(&V) -> Option<Duration>`, `None` for the attribute's ([per value](crate::guide::per_call)). |
/// | `unless = path` | `fn(&V) -> bool`: `true` returns the value without storing it ([per value](crate::guide::per_call)). |
/// | `fail_safe = "1h"` | keep entries that long past freshness (and `stale`) to answer when the body fails or panics ([fail-safe](crate::guide::fail_safe)). |
/// | `soft_timeout = "150ms"` | with an old value (stale or kept), wait at most that long for the body, then answer with the old value; a body of owned arguments finishes in the background ([fail-safe](crate::guide::fail_safe)). |
/// | `version = 2` | appended to the key (`:v2`), so a changed value type never decodes old entries. |
/// | `cache = expr` | a `Cache` (or `&Cache`) other than the installed one, e.g. `self.cache`. |
/// | `crate = "path"` | where `cache_runtime` is, for crates that re-export it. |
///
/// It also generates `<fn>_cache_key(&params…) -> CacheKey<V>` with the same
/// visibility (an associated fn for methods): the one place the key is built.
/// `V` is the cached value type (`User` for `Result<User, E>`). Parameters
/// are taken by reference: `id: u64` as `&u64`, `name: &str` as `&str`.
///
/// A miss takes a lease on the key before it runs the body and stores the
/// result only if no write invalidated the key meanwhile: see
/// [`invalidates`]. The generated function is cancel safe: dropped at any
/// `.await`, it gives back what it held (see the crate docs).
///
/// A missing `KeyPart` impl is reported at the parameter, a value that is not
/// [`Cacheable`] at the return type, and a `batch` function that does not
/// return a map at its return type.
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::redis_cached;

/// Deletes the entries of cached functions once this write succeeded.
///
/// ```text
/// #[invalidates(get_user(id))]                          // a cached free fn
/// #[invalidates(Self::get_user(user.id), Self::by_email(&user.email))]
/// #[invalidates(self.get_user(id))]                     // its key reads <self.…>
/// #[invalidates(crate::users::get_user(id), cache = self.cache)]
/// #[invalidates(key = "user:<id>")]                     // a template over this fn's parameters
/// #[invalidates(tag = "org:<org_id>")]                  // every entry tagged so (see the tags guide)
/// #[invalidates(Self::find_by_sku(&ret.sku))]           // `ret`: the written result (`Ok` value)
/// ```
///
/// A target call names the cached function and passes it this function's
/// values; it is compiled as a call of the generated `<fn>_cache_key`, so
/// rustc rejects a function that does not exist and arguments of the wrong
/// number or type. A template is checked like a `#[redis_cached]` key, and
/// a `tag = "..."` like a key too (see [the tags guide](crate::guide::tags)).
/// Give several targets, or repeat the attribute.
///
/// Keys are rendered before the body runs, but for targets that name `ret`,
/// the written result: those are rendered from it once the body returned,
/// and may name nothing else of the function ([writes](crate::guide::writes)).
/// The keys are deleted after the
/// body returns `Ok` (or any value that is not a `Result`); an `Err` deletes
/// nothing. Deleting also removes a lease placeholder, so a reader that read
/// the old data before this write cannot store it afterwards.
///
/// If the cache cannot be reached, the write still returns without waiting
/// more than one op timeout; the deletion is retried in the background
/// until it is delivered (`errors`, then `invalidations` in [`Stats`]), as
/// it is when the write's future is dropped while deleting, and this
/// process does not read the key meanwhile. Only a refusal no retry mends
/// (an ACL without `DEL`), or the shutdown of the runtime running the
/// retries, gives it up (`lost_invalidations`); the TTL then bounds how
/// long the old value is served.
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::invalidates;

/// Stores this write's returned value as a cached function's entry
/// (write-through), with that function's TTL, version and codec.
///
/// ```text
/// #[cache_put(get_user(id))]
/// async fn update_user(id: u64, name: String) -> Result<User, DbError> { ... }
/// ```
///
/// The value is what `#[redis_cached]` would cache from this function's
/// return type (`Ok` of a `Result`, `Some` of an `Option`); it must be the
/// target's cached type, or rustc reports `expected CacheKey<A>, found
/// CacheKey<B>` at the target. An `Err` stores nothing; `None` (or
/// `Ok(None)`) deletes the entry. If the store fails, times out or is cut
/// short by a dropped future, the key is invalidated instead (retried in the
/// background).
///
/// Two writers of one row that race may leave the earlier value (the later
/// `SET` wins, not the later database write); prefer [`invalidates`] when
/// writes to one entry can run concurrently.
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::cache_put;

/// Stores this write's returned value as a cached function's entry and
/// queues the change, durably, for a [`Flusher`] to write to the database
/// in batches (write-behind): the write returns without touching the
/// database.
///
/// ```text
/// pub const USERS: WriteQueue<User> = WriteQueue::new("users");
///
/// #[write_behind(get_user(id), queue = USERS)]
/// async fn save_user(id: u64, user: User) -> Result<User, SaveError> { Ok(user) }
/// ```
///
/// The value, target and queue must agree on the value type (rustc
/// checks it). The function returns `Result<T, E>` with
/// `E: From<WriteBehindError>`: when the cache cannot queue the change,
/// the caller gets the error (the write is never written around the
/// queue, where an older queued change would undo it). An `Err` of the
/// body queues nothing. See [`guide::write_behind`] for what it
/// guarantees and how to run it.
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::write_behind;

/// Lets the methods of an impl block, typically a trait impl, use
/// `#[redis_cached]`, `#[invalidates]` and `#[cache_put]`.
///
/// ```text
/// #[cached_impl]
/// impl UserRepo for SqliteRepo {
///     #[redis_cached(key = "user:<id>", ttl = 60, cache_none)]
///     async fn get_user(&self, id: u64) -> Result<Option<User>, DbError> { ... }
///
///     #[invalidates(Self::get_user(id))]
///     async fn rename_user(&self, id: u64, name: &str) -> Result<(), DbError> { ... }
/// }
/// ```
///
/// A trait impl cannot hold the generated `<fn>_cache_key`, which the trait
/// does not declare: `#[cached_impl]` expands the methods and puts their key
/// functions in an inherent impl of the same type (`impl SqliteRepo { pub fn
/// get_user_cache_key(..) }`, with the impl's generics), so that
/// `Self::get_user_cache_key` and typed write targets work as in any impl.
/// Without it, rustc reports `method get_user_cache_key is not a member of
/// trait` (E0407) at the `#[redis_cached]` attribute.
///
/// It goes above or below `#[async_trait]`, and the methods may carry
/// `#[tracing::instrument]` above or below their cache attribute. Native
/// `async fn` in traits and generic impls (`impl<D: Db> UserRepo for
/// Repo<D>`) work the same. The type must be local to the crate (an inherent
/// impl is generated for it).
#[cfg(feature = "macros")]
#[doc(inline)]
pub use cache_macros::cached_impl;
