//! The read path of a cached call: cache-aside with a lease on every miss
//! (see [`crate::lease`]), single-flight in process ([`crate::flight`]) and
//! across processes, stale-while-revalidate and early refresh
//! ([`crate::freshness`]). Any cache failure runs the body and is counted,
//! never returned.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::cache::{Cache, is_unavailability};
use crate::clock::millis;
use crate::error::CacheError;
use crate::flight::{self, Landing, Leader, Role};
use crate::freshness::{self, Freshness, MalformedHeader, Parts, Verdict};
use crate::lease::{self, Lease, Stored};
use crate::outcome::Outcome;
use crate::site::{SingleFlight, Site};
use crate::stats::Event;

/// How many failed leaders a waiter sits through before it computes on its
/// own: bounds the body runs and the wait when the body keeps failing.
const MAX_HANDOVERS: u32 = 3;

/// How often a caller may find the key changed between its read and its
/// `SET NX` before it computes without storing.
const MAX_RECHECKS: u32 = 3;

/// First and longest pause between two reads while another process holds
/// the lease (`single_flight = "distributed"`).
const FIRST_POLL: Duration = Duration::from_millis(2);
const LONGEST_POLL: Duration = Duration::from_millis(50);

/// What one `GET` found.
enum Read {
    /// The stored bytes: a freshness header, if any, then from `value_at`
    /// the encoded value. Kept whole, so a hit copies nothing.
    Value {
        bytes: Vec<u8>,
        value_at: usize,
        freshness: Option<Freshness>,
    },
    /// Another caller's live lease.
    Leased,
    Absent,
    /// Bytes that are not ours (counted and logged): to be overwritten.
    Garbage,
    /// The cache cannot be reached (counted and logged): run uncached.
    Unavailable,
}

/// What a miss may do to the key before computing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The key is empty: take the lease if it still is (`SET NX`).
    IfAbsent,
    /// The key holds garbage: replace it with our placeholder.
    Overwrite,
    /// Another caller holds the lease.
    Nothing,
}

/// How the attempt to take the lease ended.
enum Acquired<V> {
    /// The lease, or `None` when the value is to be computed but not stored.
    Lease(Option<Lease>),
    /// A value appeared meanwhile (another caller stored it): serve it.
    Found {
        value: V,
        bytes: Vec<u8>,
        waited: bool,
    },
}

enum Taken {
    Lease(Lease),
    /// A value or another caller's lease is there.
    Occupied,
    Failed,
}

impl Cache {
    /// Serves `redis_key` from the cache or runs `body`; see the module docs.
    ///
    /// A plain hit (and an unavailable cache) is handled here; everything
    /// else in a boxed future, so that the future of a hit stays small (it
    /// is moved on every call).
    pub(crate) async fn get_or_compute<S, R, F>(
        &self,
        site: &'static Site,
        redis_key: String,
        body: F,
    ) -> R
    where
        S: Outcome<R>,
        F: Future<Output = R>,
    {
        let read = self.read(site, &redis_key).await;
        // Also without the boxed future: a dead Redis costs no allocation.
        if let Read::Unavailable = read {
            return body.await;
        }
        if let Read::Value {
            bytes,
            value_at,
            freshness: None,
        } = &read
            && let Ok(found) = self.inner.codec.decode::<S::Value>(&bytes[*value_at..])
        {
            self.inner.stats.record(Some(site), Event::Hit);
            return S::from_hit(found);
        }
        Box::pin(self.after_read::<S, R, F>(site, &redis_key, read, body)).await
    }

    /// Everything but a plain hit: misses, leases, single-flight, stale and
    /// early refresh, garbage, and an unavailable cache on a later read.
    async fn after_read<S, R, F>(
        &self,
        site: &'static Site,
        key: &str,
        first_read: Read,
        body: F,
    ) -> R
    where
        S: Outcome<R>,
        F: Future<Output = R>,
    {
        let inner = &*self.inner;
        let mut leader: Option<Leader<'_>> = None;
        let mut handovers = 0;
        let mut first_read = Some(first_read);
        let claim = loop {
            let read = match first_read.take() {
                Some(read) => read,
                None => self.read(site, key).await,
            };
            let claim = match read {
                Read::Unavailable => return body.await,
                Read::Value {
                    bytes,
                    value_at,
                    freshness,
                } => {
                    let header = &bytes[..value_at];
                    match inner.codec.decode::<S::Value>(&bytes[value_at..]) {
                        Err(error) => {
                            inner.stats.record(Some(site), Event::Error);
                            tracing::warn!(key, %error, "undecodable cache entry: recomputing and overwriting it");
                            Claim::Overwrite
                        }
                        Ok(found) => {
                            let Some(freshness) = freshness else {
                                inner.stats.record(Some(site), Event::Hit);
                                return S::from_hit(found);
                            };
                            let verdict = freshness.verdict(
                                site.early_refresh_beta(),
                                site.stale_millis(),
                                self.grace(site),
                            );
                            match verdict {
                                Verdict::Fresh => {
                                    inner.stats.record(Some(site), Event::Hit);
                                    return S::from_hit(found);
                                }
                                // Redis still has it, but our clock says it is
                                // past its stale window: a miss.
                                Verdict::Expired => Claim::Overwrite,
                                verdict => {
                                    if let Some(lock) = self.refresh_lock(key).await {
                                        return self
                                            .refresh::<S, R, F>(
                                                site, key, header, lock, found, body,
                                            )
                                            .await;
                                    }
                                    // Another caller is refreshing it.
                                    let served = match verdict {
                                        Verdict::RefreshEarly => Event::Hit,
                                        _ => Event::StaleHit,
                                    };
                                    inner.stats.record(Some(site), served);
                                    return S::from_hit(found);
                                }
                            }
                        }
                    }
                }
                Read::Leased => Claim::Nothing,
                Read::Absent => Claim::IfAbsent,
                Read::Garbage => Claim::Overwrite,
            };
            if site.single_flight_mode() == SingleFlight::Off || handovers >= MAX_HANDOVERS {
                break claim;
            }
            match inner.flights.join(key) {
                Role::Leader(me) => {
                    leader = Some(me);
                    break claim;
                }
                Role::Waiter(waiters) => match flight::wait(waiters).await {
                    Some(bytes) => match inner.codec.decode::<S::Value>(&bytes) {
                        Ok(value) => {
                            inner.stats.record(Some(site), Event::Coalesced);
                            return S::from_hit(value);
                        }
                        Err(_) => break Claim::Nothing,
                    },
                    // The leader failed, was cancelled or panicked: look
                    // again, and lead if nobody else does.
                    None => handovers += 1,
                },
            }
        };

        let lease = match self.acquire::<S::Value>(site, key, claim).await {
            Acquired::Lease(lease) => lease,
            Acquired::Found {
                value,
                bytes,
                waited,
            } => {
                let event = if waited { Event::Coalesced } else { Event::Hit };
                inner.stats.record(Some(site), event);
                if let Some(leader) = leader {
                    leader.land(Landing::Value(bytes.into()));
                }
                return S::from_hit(value);
            }
        };

        inner.stats.record(Some(site), Event::Miss);
        // Gives the lease back if `body` panics or the call is cancelled, so
        // that other callers can store the value before the lease expires.
        let mut held = HeldLease {
            cache: self,
            key,
            lease,
        };
        let started = Instant::now();
        let result = body.await;
        let took = started.elapsed();
        let lease = held.lease.take();
        let encoded =
            S::cacheable(&result).and_then(|value| self.encode_for_store(site, key, value));
        match encoded {
            Some(bytes) => {
                // Store before telling the waiters: a caller arriving after
                // the flight ends must find the value, not a placeholder.
                if let Some(lease) = &lease {
                    self.store_over(site, key, lease.placeholder(), &bytes, took)
                        .await;
                }
                if let Some(leader) = leader {
                    leader.land(Landing::Value(bytes.into()));
                }
            }
            None => {
                if let Some(lease) = &lease {
                    self.release(key, lease).await;
                }
                if let Some(leader) = leader {
                    leader.land(Landing::Failed);
                }
            }
        }
        result
    }

    /// One `GET`, classified; failures are counted and logged here.
    async fn read(&self, site: &'static Site, key: &str) -> Read {
        let inner = &*self.inner;
        match self.guarded(inner.backend.get(key)).await {
            Ok(Some(bytes)) => match lease::inspect(&bytes) {
                Stored::Leased => Read::Leased,
                Stored::Stray => {
                    inner.stats.record(Some(site), Event::Error);
                    tracing::warn!(
                        key,
                        "stray lease placeholder without expiry: recomputing and overwriting it"
                    );
                    Read::Garbage
                }
                Stored::Value => match freshness::split(&bytes) {
                    Ok(Parts { header, .. }) => {
                        let (freshness, value_at) = match header {
                            Some((freshness, header)) => (Some(freshness), header.len()),
                            None => (None, 0),
                        };
                        Read::Value {
                            bytes,
                            value_at,
                            freshness,
                        }
                    }
                    Err(MalformedHeader) => {
                        inner.stats.record(Some(site), Event::Error);
                        tracing::warn!(
                            key,
                            "malformed freshness header: recomputing and overwriting it"
                        );
                        Read::Garbage
                    }
                },
            },
            Ok(None) => Read::Absent,
            Err(CacheError::CircuitOpen) => {
                inner.stats.record(Some(site), Event::Bypass);
                Read::Unavailable
            }
            Err(error) if is_unavailability(&error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key, %error, "cache read failed: running uncached");
                Read::Unavailable
            }
            // An error reply about this key (e.g. WRONGTYPE: someone stored a
            // list there) is bad data like an undecodable value: overwrite it.
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key, %error, "unreadable cache entry: recomputing and overwriting it");
                Read::Garbage
            }
        }
    }

    /// Takes the lease on a missing key. If the key fills in meanwhile,
    /// serves what it holds; with `single_flight = "distributed"`, waits
    /// (polling with backoff, for at most one lease) for another process's
    /// value, and takes over when that process's lease expires.
    async fn acquire<V: DeserializeOwned>(
        &self,
        site: &'static Site,
        key: &str,
        mut claim: Claim,
    ) -> Acquired<V> {
        let inner = &*self.inner;
        let distributed = site.single_flight_mode() == SingleFlight::Distributed;
        let deadline = Instant::now() + inner.lease + inner.lease / 10;
        let mut pause = FIRST_POLL;
        let mut waited = false;
        let mut rechecks = 0;
        loop {
            match claim {
                Claim::Nothing if !distributed => return Acquired::Lease(None),
                Claim::Nothing => {
                    if Instant::now() >= deadline {
                        return Acquired::Lease(None);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_POLL);
                    waited = true;
                    inner.stats.record(Some(site), Event::LeasePoll);
                }
                Claim::IfAbsent | Claim::Overwrite => {
                    match self.take_lease(site, key, claim).await {
                        Taken::Lease(lease) => return Acquired::Lease(Some(lease)),
                        Taken::Failed => return Acquired::Lease(None),
                        Taken::Occupied if rechecks >= MAX_RECHECKS => {
                            return Acquired::Lease(None);
                        }
                        Taken::Occupied => rechecks += 1,
                    }
                }
            }
            claim = match self.read(site, key).await {
                Read::Value {
                    mut bytes,
                    value_at,
                    ..
                } => match inner.codec.decode::<V>(&bytes[value_at..]) {
                    Ok(found) => {
                        bytes.drain(..value_at);
                        return Acquired::Found {
                            value: found,
                            bytes,
                            waited,
                        };
                    }
                    Err(_) => Claim::Overwrite,
                },
                Read::Leased => Claim::Nothing,
                Read::Absent => Claim::IfAbsent,
                Read::Garbage => Claim::Overwrite,
                Read::Unavailable => return Acquired::Lease(None),
            };
        }
    }

    /// Writes a lease placeholder.
    async fn take_lease(&self, site: &'static Site, key: &str, claim: Claim) -> Taken {
        let inner = &*self.inner;
        let lease = Lease::new(inner.lease);
        let lease_millis = duration_millis(inner.lease);
        let taken = if claim == Claim::Overwrite {
            let set = inner
                .backend
                .set(key, lease.placeholder().to_vec(), lease_millis);
            self.guarded(set).await.map(|()| true)
        } else {
            let set = inner
                .backend
                .set_if_absent(key, lease.placeholder(), lease_millis);
            self.guarded(set).await
        };
        match taken {
            Ok(true) => Taken::Lease(lease),
            Ok(false) => Taken::Occupied,
            Err(CacheError::CircuitOpen) => Taken::Failed,
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key, %error, "cache lease failed: the value will not be stored");
                Taken::Failed
            }
        }
    }

    /// Stores `bytes` (with a freshness header when the function has
    /// `stale` or `early_refresh`) if the key still starts with `expected`:
    /// the caller's lease placeholder, or the header of the value it
    /// refreshed. A write that deleted or replaced it meanwhile wins.
    async fn store_over(
        &self,
        site: &'static Site,
        key: &str,
        expected: &[u8],
        bytes: &[u8],
        took: Duration,
    ) {
        let inner = &*self.inner;
        let ttl = site.ttl_millis();
        let (stored, expiry) = if site.tracks_freshness() {
            let freshness = Freshness::new(Duration::from_millis(ttl), took);
            let kept = site.stale_millis().max(self.grace(site));
            (freshness.wrap(bytes), ttl.saturating_add(kept))
        } else {
            (bytes.to_vec(), ttl)
        };
        let set = inner.backend.compare_and_set(key, expected, stored, expiry);
        match self.guarded(set).await {
            Ok(true) => inner.stats.record(Some(site), Event::Set),
            Err(CacheError::CircuitOpen) => inner.stats.record(Some(site), Event::Bypass),
            Ok(false) => {
                inner.stats.record(Some(site), Event::DroppedSet);
                tracing::debug!(key, "key invalidated while computing: value not stored");
            }
            Err(error) => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(key, %error, "cache write failed");
            }
        }
    }

    /// With `early_refresh`, how long past its TTL a value stays in Redis, so
    /// that a refresh drawn just before expiry can finish while the others
    /// are served the old value: one lease, the longest a computation may
    /// take. Past the TTL the old value is served only while a refresh runs.
    fn grace(&self, site: &Site) -> u64 {
        if site.early_refresh_beta().is_some() {
            duration_millis(self.inner.lease)
        } else {
            0
        }
    }

    /// Gives a lease back: deletes the caller's placeholder, if still there.
    pub(crate) async fn release(&self, key: &str, lease: &Lease) {
        let inner = &*self.inner;
        let delete = inner.backend.compare_and_delete(key, lease.placeholder());
        match self.guarded(delete).await {
            Ok(_) | Err(CacheError::CircuitOpen) => {}
            Err(error) => {
                inner.stats.record(None, Event::Error);
                tracing::debug!(key, %error, "cache lease release failed; it expires by itself");
            }
        }
    }

    /// The right to refresh `key` (stale or early), held by one caller
    /// across processes: a lease on a companion key. No template renders a
    /// NUL byte, so the companion never collides with a real key.
    async fn refresh_lock(&self, key: &str) -> Option<(String, Lease)> {
        let inner = &*self.inner;
        let lock_key = format!("{key}\0refresh");
        let lease = Lease::new(inner.lease);
        let set = inner.backend.set_if_absent(
            &lock_key,
            lease.placeholder(),
            duration_millis(inner.lease),
        );
        match self.guarded(set).await {
            Ok(true) => Some((lock_key, lease)),
            _ => None,
        }
    }

    /// Recomputes a value that is stale or drawn for early refresh, and
    /// stores it over the value that was read. If the body fails, the old
    /// value is served (stale-if-error).
    async fn refresh<S, R, F>(
        &self,
        site: &'static Site,
        key: &str,
        seen_header: &[u8],
        (lock_key, lock): (String, Lease),
        old: S::Value,
        body: F,
    ) -> R
    where
        S: Outcome<R>,
        F: Future<Output = R>,
    {
        let inner = &*self.inner;
        inner.stats.record(Some(site), Event::Refresh);
        let started = Instant::now();
        let result = body.await;
        let took = started.elapsed();
        let outcome = match S::cacheable(&result) {
            Some(value) => {
                if let Some(bytes) = self.encode_for_store(site, key, value) {
                    self.store_over(site, key, seen_header, &bytes, took).await;
                }
                result
            }
            None => {
                inner.stats.record(Some(site), Event::Error);
                tracing::warn!(
                    key,
                    "cache refresh failed: serving the value it was to replace"
                );
                S::from_hit(old)
            }
        };
        self.release(&lock_key, &lock).await;
        outcome
    }
}

/// A lease held while the body runs; released in the background if the call
/// is dropped (cancelled, or the body panicked) before it is settled.
struct HeldLease<'a> {
    cache: &'a Cache,
    key: &'a str,
    lease: Option<Lease>,
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let cache = self.cache.clone();
            let key = self.key.to_owned();
            runtime.spawn(async move { cache.release(&key, &lease).await });
        }
    }
}

/// For `PX`, which rejects 0.
fn duration_millis(duration: Duration) -> u64 {
    millis(duration).max(1)
}
