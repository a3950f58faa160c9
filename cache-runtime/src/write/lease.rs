//! Leases: the placeholder a caller writes into a missing key before it
//! computes the value, so that a write in the meantime can take the right to
//! store away ("Scaling Memcache at Facebook", NSDI 2013, §3.2.1). The whole
//! protocol is here; backends only offer the compare operations it uses.
//!
//! 1. A miss takes the lease: `SET key <placeholder> NX PX <lease>` (or,
//!    over garbage, a compare-and-set against the garbage it read).
//! 2. The holder computes, then stores with a compare-and-set: only if the
//!    key still holds *its* placeholder ([`HeldLease::fulfil`]).
//! 3. An invalidation `DEL`s the key, placeholder included, so a value
//!    computed from data read before the write is never stored.
//! 4. A caller that finds someone else's placeholder computes without
//!    storing, or (`single_flight = "distributed"`) waits for the value.
//! 5. A holder whose body fails gives the lease back: a compare-and-delete
//!    of its own placeholder ([`HeldLease::give_back`]).
//!
//! The refresh lock of `stale` and `early_refresh` is the same kind of lease,
//! on a companion key.
//!
//! # Cancellation
//!
//! A [`HeldLease`] is armed *before* the command that takes the lease is
//! sent. Whatever ends the call (the body fails or panics, the future is
//! dropped at any `.await`, a command times out on the client and may still
//! land), a lease that is still armed when the guard drops is given back in
//! the background by the cache's janitor, with a compare-and-delete of its
//! own token that is retried until Redis answers or the lease has expired by
//! itself. On one connection commands apply in order, so the give-back lands
//! after a `SET` that was still on its way.
//!
//! # Placeholders
//!
//! `\0lease:<32 hex digits of token>:<taken at, ms since the epoch>`. No
//! encoded value can be mistaken for one: JSON never starts with a NUL byte,
//! and a MessagePack value that starts with one (the integer 0) is that one
//! byte long. The time is for people reading the key; nothing reads it back.
//! A placeholder without expiry (written by another client) is stray:
//! whether a placeholder is live is decided by the server's TTL, never by a
//! clock.

use std::borrow::Cow;
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::cache::janitor::Chore;
use crate::clock::px;
use crate::error::CacheError;
use crate::holder::Holder;
use crate::site::Site;
use crate::stats::Event;

const MARK: &[u8] = b"\0lease:";
const TOKEN_HEX_DIGITS: usize = 32;

/// What bytes read from the cache are, as far as leases are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// An encoded value (possibly with a freshness header).
    Value,
    /// A well-formed placeholder: someone's lease, live if it has a TTL.
    Placeholder,
    /// Starts like a placeholder but is not one: garbage to replace.
    Malformed,
}

/// Classifies bytes read from the cache.
pub(crate) fn inspect(bytes: &[u8]) -> Found {
    let Some(rest) = bytes.strip_prefix(MARK) else {
        return Found::Value;
    };
    let well_formed = rest.len() > TOKEN_HEX_DIGITS + 1
        && rest[..TOKEN_HEX_DIGITS].iter().all(u8::is_ascii_hexdigit)
        && rest[TOKEN_HEX_DIGITS] == b':'
        && rest[TOKEN_HEX_DIGITS + 1..].iter().all(u8::is_ascii_digit);
    if well_formed {
        Found::Placeholder
    } else {
        Found::Malformed
    }
}

/// A new placeholder with a fresh token: this process's [`Holder`], then
/// 64 random bits for this lease.
fn placeholder(cache: &Cache) -> Vec<u8> {
    let holder = Holder::this_process();
    let (pid, instance, lease) = (holder.pid, holder.instance, fastrand::u64(..));
    let at = cache.clock().now_millis();
    let mut bytes = MARK.to_vec();
    bytes.extend_from_slice(format!("{pid:08x}{instance:08x}{lease:016x}:{at}").as_bytes());
    bytes
}

impl Holder {
    /// The holder named by a placeholder's bytes and when it was taken (0:
    /// not said); `None` if they are not a well-formed placeholder. A
    /// placeholder of a build before holders were written names a holder
    /// made of random digits.
    pub(crate) fn of_placeholder(bytes: &[u8]) -> Option<(Holder, u64)> {
        if inspect(bytes) != Found::Placeholder {
            return None;
        }
        let rest = std::str::from_utf8(&bytes[MARK.len()..]).ok()?;
        let pid = u32::from_str_radix(rest.get(..8)?, 16).ok()?;
        let instance = u32::from_str_radix(rest.get(8..16)?, 16).ok()?;
        // All digits, but maybe past u64 (not ours): a time unknown.
        let at = rest
            .get(TOKEN_HEX_DIGITS + 1..)
            .and_then(|at| at.parse().ok())
            .unwrap_or(0);
        Some((Holder { pid, instance }, at))
    }
}

/// How a miss takes the lease.
#[derive(Debug)]
pub(crate) enum Take {
    /// The key is empty: `SET NX`.
    IfAbsent,
    /// The key holds garbage: replace it if it still holds these bytes.
    Replacing(Vec<u8>),
    /// The key holds something `GET` cannot read (`WRONGTYPE`): overwrite.
    Overwriting,
    /// The key holds a value too large to read: replace it if it still is.
    ReplacingTooLarge,
}

/// How taking a lease ended.
pub(crate) enum Taken<'c> {
    Held(HeldLease<'c>),
    /// A value or another caller's lease is there.
    Occupied,
    /// The cache failed (counted and logged): compute without storing.
    Failed,
}

/// A lease (or refresh lock) this call may hold. Dropped while armed, it is
/// given back in the background; see the module docs.
pub(crate) struct HeldLease<'c> {
    /// Borrowed from the call; owned by a body left to finish in the
    /// background (see [`HeldLease::into_owned`]).
    cache: Cow<'c, Cache>,
    key: Cow<'c, str>,
    placeholder: Vec<u8>,
    /// When the lease expires by itself: giving it back later is moot.
    expires: Instant,
    armed: bool,
}

impl<'c> HeldLease<'c> {
    fn arm(cache: &'c Cache, key: Cow<'c, str>, length: Duration) -> Self {
        HeldLease {
            cache: Cow::Borrowed(cache),
            key,
            placeholder: placeholder(cache),
            expires: Instant::now() + length,
            armed: true,
        }
    }

    /// Takes the lease on `key` for one computation.
    pub(crate) async fn take(
        cache: &'c Cache,
        site: &'static Site,
        key: &'c str,
        how: Take,
    ) -> Taken<'c> {
        let mut lease = Self::arm(cache, Cow::Borrowed(key), cache.settings().lease);
        let (value, length) = (&lease.placeholder[..], px(cache.settings().lease));
        let taken = match &how {
            Take::IfAbsent => {
                let set = cache.backend().set_if_absent(key, value, length);
                cache.guarded(key, set).await
            }
            Take::Replacing(seen) => {
                let set = cache.backend().compare_and_set(key, seen, value, length);
                cache.guarded(key, set).await
            }
            Take::Overwriting => {
                let set = cache.backend().set(key, value, length);
                cache.guarded(key, set).await.map(|()| true)
            }
            Take::ReplacingTooLarge => {
                let set =
                    cache
                        .backend()
                        .set_if_longer(key, cache.settings().read_limit, value, length);
                cache.guarded(key, set).await
            }
        };
        match taken {
            Ok(true) => Taken::Held(lease),
            Ok(false) => {
                lease.armed = false;
                Taken::Occupied
            }
            Err(error) => {
                // Armed still if the command may have landed: dropping the
                // lease gives it back.
                lease.armed = error.may_have_landed();
                if !matches!(error, CacheError::CircuitOpen) {
                    cache.record(site, Event::Error);
                    crate::limited!(
                        cache,
                        warn!(key, %error, "cache lease failed: the value will not be stored")
                    );
                }
                Taken::Failed
            }
        }
    }

    /// The right to refresh `key` (stale or early), held by one caller
    /// across processes: a lease on a companion key (see
    /// [`crate::key::refresh_lock_key`]).
    ///
    /// A lock the cache failed to take (an outage, or a refusal such as
    /// `NOPERM` from an ACL, `READONLY` or `OOM`) is counted as an error of
    /// `site` and logged, like any other cache error, never taken for
    /// another caller's lock.
    pub(crate) async fn refresh_lock(
        cache: &'c Cache,
        site: &'static Site,
        key: &str,
    ) -> Option<Self> {
        let lock_key = crate::key::refresh_lock_key(cache.prefix(), key);
        let mut lock = Self::arm(cache, Cow::Owned(lock_key), cache.settings().lease);
        let set =
            cache
                .backend()
                .set_if_absent(&lock.key, &lock.placeholder, px(cache.settings().lease));
        match cache.guarded(&lock.key, set).await {
            Ok(true) => Some(lock),
            Ok(false) => {
                lock.armed = false;
                None
            }
            Err(error) => {
                lock.armed = error.may_have_landed();
                if !matches!(error, CacheError::CircuitOpen) {
                    cache.record(site, Event::Error);
                    crate::limited!(
                        cache,
                        warn!(key, %error, "cache refresh lock failed: serving the old value")
                    );
                }
                None
            }
        }
    }

    /// Stores `stored` over the placeholder if the key still holds it.
    /// Whether it was stored; a write in the meantime wins (counted as a
    /// dropped set).
    pub(crate) async fn fulfil(mut self, site: &'static Site, stored: &[u8], ttl: u64) -> bool {
        let cache = self.cache.clone();
        let cache = &*cache;
        let set = cache
            .backend()
            .compare_and_set(&self.key, &self.placeholder, stored, ttl);
        let outcome = cache.guarded(&self.key, set).await;
        // Whatever failed (skipped by the breaker, an error reply, a
        // timeout), the placeholder may still be there: give it back.
        self.armed = outcome.is_err();
        cache.record_store(site, &self.key, outcome)
    }

    /// [`HeldLease::fulfil`] for a caller that needs no proof from it (no
    /// flight waits on this key): the compare-and-set is sent before this
    /// returns, and its reply is awaited by a task, so that a miss costs
    /// the round trips of hand-written cache-aside (`GET`, then the store)
    /// plus the lease's own.
    ///
    /// Queued first, it goes out ahead of what this process sends on the
    /// connection afterwards, and its later reads of the key find the
    /// value (commands on one connection apply in order). It is not
    /// queued on that first poll while the connection is being made again
    /// or its queue is full, nor on a cluster when the command is
    /// redirected: a read then may find this call's own placeholder, and
    /// computes without storing. Nothing stale follows either way: the
    /// compare-and-set still needs the placeholder. The stored count is
    /// taken when the reply comes ([`Cache::settled`] waits for it). Past
    /// [`crate::cache::flight::Flights::store_slot`]'s bound, or without a
    /// Tokio runtime, it waits for the reply as `fulfil` does.
    pub(crate) async fn fulfil_soon(self, site: &'static Site, stored: Vec<u8>, ttl: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.fulfil(site, &stored, ttl).await;
            return;
        };
        let Some(slot) = self.cache.flights().store_slot() else {
            self.fulfil(site, &stored, ttl).await;
            return;
        };
        let lease = self.into_owned();
        // Unconstrained: a task out of Tokio's budget (a batch settling
        // many keys in one poll) would otherwise not queue it on this poll.
        let mut store = Box::pin(tokio::task::unconstrained(async move {
            let _slot = slot;
            lease.fulfil(site, &stored, ttl).await;
        }));
        // One poll, in this task: it usually queues the command on the
        // connection (on the memory backend it is the whole store).
        // Dropped after it, the task still completes.
        let done = std::future::poll_fn(|cx| Poll::Ready(store.as_mut().poll(cx).is_ready())).await;
        if !done {
            drop(runtime.spawn(store));
        }
    }

    /// Gives the lease back (the body failed, or answered nothing to
    /// store). Whether the placeholder was still there: if so, no write
    /// touched the key since the lease was taken.
    pub(crate) async fn give_back(mut self) -> bool {
        let cache = self.cache.clone();
        let cache = &*cache;
        let delete = cache
            .backend()
            .compare_and_delete(&self.key, &self.placeholder);
        match cache.guarded(&self.key, delete).await {
            Ok(deleted) => {
                self.armed = false;
                deleted
            }
            // Left armed: the janitor retries.
            Err(_) => false,
        }
    }

    /// After a failed refresh: keeps the refresh lock for `pause` instead of
    /// giving it back, so that the failure is not retried by every caller
    /// at once (stale-if-error without a refresh storm).
    pub(crate) async fn hold_for(mut self, pause: Duration) {
        let cache = self.cache.clone();
        let cache = &*cache;
        let pause = pause.min(self.expires.saturating_duration_since(Instant::now()));
        let expire = cache
            .backend()
            .compare_and_expire(&self.key, &self.placeholder, px(pause));
        if cache.guarded(&self.key, expire).await.is_ok() {
            self.armed = false;
        }
    }
}

impl HeldLease<'_> {
    /// The same lease, owned by a task that outlives the call (`soft_timeout`).
    pub(crate) fn into_owned(mut self) -> HeldLease<'static> {
        let owned = HeldLease {
            cache: Cow::Owned(self.cache.clone().into_owned()),
            key: Cow::Owned(std::mem::take(&mut self.key).into_owned()),
            placeholder: std::mem::take(&mut self.placeholder),
            expires: self.expires,
            armed: self.armed,
        };
        self.armed = false;
        owned
    }
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        if self.armed && Instant::now() < self.expires {
            self.cache.tidy(Chore::Release {
                key: std::mem::take(&mut self.key).into_owned(),
                placeholder: std::mem::take(&mut self.placeholder),
                until: self.expires,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placeholder_is_recognised_and_unique() {
        let cache = Cache::memory();
        let (a, b) = (placeholder(&cache), placeholder(&cache));
        assert_eq!(inspect(&a), Found::Placeholder);
        assert_ne!(a, b, "tokens differ");
        let (holder, _) = Holder::of_placeholder(&a).unwrap();
        assert_eq!(holder, Holder::this_process());
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(Holder::of_placeholder(b"{}"), None);
    }

    #[test]
    fn malformed_placeholders_are_garbage() {
        assert_eq!(inspect(b"\0lease:"), Found::Malformed);
        assert_eq!(inspect(b"\0lease:12:zz"), Found::Malformed);
        let short = format!("\0lease:{:031x}:1", 7);
        assert_eq!(inspect(short.as_bytes()), Found::Malformed);
        let good = format!("\0lease:{:032x}:1", 7);
        assert_eq!(inspect(good.as_bytes()), Found::Placeholder);
    }

    proptest::proptest! {
        /// No encoded value, of any codec, is ever taken for a placeholder
        /// (which would turn a hit into a miss that never stores).
        #[test]
        fn no_encoded_value_looks_like_a_lease(
            text in ".*",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            number in proptest::prop_oneof![-3i64..3, proptest::num::i64::ANY],
            pairs in proptest::collection::vec((".*", 0u64..3), 0..4),
            maybe in proptest::option::of(".*"),
        ) {
            let codecs = [
                crate::Codec::Json,
                #[cfg(feature = "msgpack")]
                crate::Codec::MessagePack,
            ];
            for codec in codecs {
                let encoded = [
                    codec.encode(&text).unwrap(),
                    codec.encode(&bytes).unwrap(),
                    codec.encode(&number).unwrap(),
                    codec.encode(&pairs).unwrap(),
                    codec.encode(&maybe).unwrap(),
                    codec.encode(&(number, &text)).unwrap(),
                ];
                for value in encoded {
                    proptest::prop_assert_eq!(inspect(&value), Found::Value, "{:?}", codec);
                }
            }
        }
    }

    #[test]
    fn values_are_values() {
        for bytes in [&b""[..], b"\0", b"0", b"{\"a\":1}", b"\"\\u0000lease:\""] {
            assert_eq!(inspect(bytes), Found::Value, "{bytes:?}");
        }
    }
}
