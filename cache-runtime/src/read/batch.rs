//! Batch lookups: `#[redis_cached(key = "user:<ids>", ttl = 60, batch)]` on
//! `async fn get_users(ids: &[u64]) -> Result<HashMap<u64, User>, E>`.
//!
//! Each id's key is rendered as the single-key function's `<id>` would be,
//! so batch and single lookups share entries, leases and invalidations.
//!
//! 1. **Read** every distinct key in one round trip (a pipeline of
//!    `GETRANGE`s that stop at the read limit; per slot on a cluster).
//! 2. Serve what was found (values, and `cache_none`'s negative entries).
//! 3. With `single_flight`, **coalesce** the missing ids with computations
//!    in flight in this process, one key at a time in key order: an id
//!    another caller computes is waited for, the others this batch leads.
//!    Taking leaderships in one global order while waiting means that two
//!    overlapping batches cannot wait for each other.
//! 4. Take the **leases** of the ids it computes (sent together), run the
//!    body **once with those ids only**, and settle each id's lease with
//!    its answer exactly as a single lookup would: the value is stored only
//!    if no write touched the key meanwhile; an id the body did not return
//!    is an answer of nothing (stored as such with `cache_none`).
//! 5. Merge the cached values into the body's map.
//!
//! A cache that cannot be read runs the body with every id (fail open);
//! with `single_flight`, still coalesced with this process's other callers
//! of each id, as a single lookup is (see [`crate::read::flight`]).
//! Stale values (`stale`, `early_refresh`) are not refreshed by a batch;
//! the macro rejects those options with `batch`.

use std::future::Future;
use std::time::Instant;

use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::error::CacheError;
use crate::local::LocalHit;
use crate::read::flight::{Handed, Joiner, Leader, Role, look_again};
use crate::read::lookup::{Leased, Run};
use crate::read::outcome::{Answer, BatchMap, BatchOutcome, NOTHING};
use crate::read::site::{SingleFlight, Site};
use crate::stats::Event;
use crate::write::lease::{self, Found, HeldLease, Take, Taken};

/// Distinct keys, first occurrence first, with their ids.
fn distinct<K>(entries: Vec<(K, String)>) -> (Vec<K>, Vec<String>) {
    let mut ids = Vec::with_capacity(entries.len());
    let mut keys: Vec<String> = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (id, key) in entries {
        if seen.insert(key.clone()) {
            ids.push(id);
            keys.push(key);
        }
    }
    (ids, keys)
}

/// How often an id's handover may fail before the batch computes it
/// without joining the flight.
const MAX_HANDOVERS: u32 = 3;
/// How many flights whose answer was not for it an id may sit through: one
/// whose body had started before the batch began, then the next, whose
/// body starts after the batch joined it, covers it (more only where a
/// flight failed in between); a bound all the same.
const MAX_LATER: u32 = 4;

/// One distinct id of the batch that the cache did not answer.
struct Missing<K> {
    id: K,
    /// Index into the batch's keys.
    at: usize,
    /// How to take its lease; `None` for another caller's live lease
    /// (computed without storing).
    take: Option<Take>,
}

impl Cache {
    /// Serves the ids of `entries` from the cache and computes the others
    /// with one call of `body`; see the module docs.
    pub(crate) async fn get_or_compute_batch<S, R, K, V, B, Fut>(
        &self,
        site: &'static Site,
        entries: Vec<(K, String)>,
        body: B,
    ) -> R
    where
        S: BatchOutcome<R>,
        S::Map: BatchMap<Key = K, Value = V>,
        V: Serialize + DeserializeOwned,
        K: Clone,
        B: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = R>,
    {
        let (ids, keys) = distinct(entries);
        self.batch_from_redis::<S, R, K, V, B, Fut>(site, ids, keys, Vec::new(), body)
            .await
    }

    /// [`Cache::get_or_compute_batch`] of a function with a local tier:
    /// the copies this process holds (made by single lookups of the same
    /// keys) answer their ids, and the others are looked up in Redis as
    /// usual. A batch makes no copies itself: its read is not sent on
    /// the tracking connection, and does not say how long each entry has
    /// left.
    pub(crate) async fn get_or_compute_batch_local<S, R, K, V, B, Fut>(
        &self,
        site: &'static Site,
        entries: Vec<(K, String)>,
        body: B,
    ) -> R
    where
        S: BatchOutcome<R>,
        S::Map: BatchMap<Key = K, Value = V>,
        V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
        K: Clone,
        B: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = R>,
    {
        let (ids, keys) = distinct(entries);
        let Some(tracking) = &self.inner.local else {
            return self
                .batch_from_redis::<S, R, K, V, B, Fut>(site, ids, keys, Vec::new(), body)
                .await;
        };
        let tier = tracking.tier();
        let primaries = self.inner.backend.primaries_epoch();
        let mut found = Vec::new();
        let (mut rest_ids, mut rest_keys) = (Vec::new(), Vec::new());
        for (id, key) in ids.into_iter().zip(keys) {
            match tier.get::<V>(&key, primaries) {
                Some(LocalHit::Value(value)) => {
                    self.record(site, Event::LocalHit);
                    found.push((id, value));
                }
                Some(LocalHit::Nothing) => self.record(site, Event::LocalHit),
                None => {
                    rest_ids.push(id);
                    rest_keys.push(key);
                }
            }
        }
        if rest_keys.is_empty() {
            return S::from_map(map_of(found));
        }
        self.batch_from_redis::<S, R, K, V, B, Fut>(site, rest_ids, rest_keys, found, body)
            .await
    }

    /// Steps 1 to 5 of the module docs for distinct `keys` (of `ids`), with
    /// the values already `found` for other ids.
    async fn batch_from_redis<S, R, K, V, B, Fut>(
        &self,
        site: &'static Site,
        ids: Vec<K>,
        keys: Vec<String>,
        mut found: Vec<(K, V)>,
        body: B,
    ) -> R
    where
        S: BatchOutcome<R>,
        S::Map: BatchMap<Key = K, Value = V>,
        V: Serialize + DeserializeOwned,
        K: Clone,
        B: FnOnce(Vec<K>) -> Fut,
        Fut: Future<Output = R>,
    {
        let began = Instant::now();
        crate::backend::note_px(site.longest_expiry_millis());
        // A key this process still has to invalidate may hold the old
        // value (see `Janitor::is_invalidating`): run uncached.
        let backend = &self.inner.backend;
        let pending_write = keys.iter().any(|key| {
            self.inner
                .janitor
                .is_invalidating(key, || backend.primaries_epoch())
        });
        let read = if pending_write {
            Err(CacheError::CircuitOpen)
        } else {
            self.read_many(&keys).await
        };
        let coalescing = site.single_flight_mode() != SingleFlight::Off;
        // Whether the cache could not be read: then nothing is leased or
        // stored, and each id's callers in this process still coalesce.
        let mut uncached = false;
        let values = match read {
            Ok(values) => values,
            Err(error) => {
                if !matches!(error, CacheError::CircuitOpen) {
                    self.record(site, Event::Error);
                    crate::limited!(
                        self,
                        warn!(%error, keys = keys.len(), "cache batch read failed: running uncached")
                    );
                }
                if coalescing {
                    uncached = true;
                    vec![Fetched::Absent; keys.len()]
                } else {
                    for _ in &keys {
                        self.record(site, Event::Bypass);
                    }
                    if found.is_empty() {
                        return body(ids).await;
                    }
                    // The body runs for the ids not answered locally; the
                    // local answers join its map.
                    let mut result = body(ids).await;
                    if let Some(map) = S::map_mut(&mut result) {
                        for (id, value) in found {
                            map.put(id, value);
                        }
                    }
                    return result;
                }
            }
        };

        let mut missing = Vec::new();
        for (at, (id, bytes)) in ids.into_iter().zip(values).enumerate() {
            if uncached {
                missing.push(Missing { id, at, take: None });
                continue;
            }
            match self.classify_one::<V>(site, &keys[at], bytes) {
                One::Value(value) => {
                    self.record(site, Event::Hit);
                    found.push((id, value));
                }
                One::Nothing => self.record(site, Event::Hit),
                One::Claim(take) => missing.push(Missing { id, at, take }),
            }
        }

        let mut leaders: Vec<Option<Leader<'_>>> = Vec::new();
        if coalescing {
            // In key order, so that overlapping batches cannot wait for each
            // other (see the module docs).
            missing.sort_by(|a, b| keys[a.at].cmp(&keys[b.at]));
            let mut computed = Vec::with_capacity(missing.len());
            let joiner = Joiner {
                began,
                takes_proof: !pending_write,
            };
            for one in missing {
                match self.coalesce_one::<V>(site, &keys[one.at], joiner).await {
                    Coalesced::Value(value) => found.push((one.id, value)),
                    Coalesced::Nothing => {}
                    Coalesced::Lead(leader) => {
                        leaders.push(leader);
                        computed.push(one);
                    }
                }
            }
            missing = computed;
        } else {
            leaders.resize_with(missing.len(), || None);
        }
        if missing.is_empty() {
            return S::from_map(map_of(found));
        }

        let leases = join_all(missing.iter_mut().map(|one| {
            let take = one.take.take();
            let key = &keys[one.at];
            async move {
                let taken = match take {
                    Some(take) => HeldLease::take(self, site, key, take).await,
                    None if uncached => Taken::Failed,
                    None => Taken::Occupied,
                };
                (taken, ())
            }
        }))
        .await;
        let mut computing: Vec<(Missing<K>, Taken<'_>, Option<Leader<'_>>)> =
            Vec::with_capacity(missing.len());
        let mut occupied = Vec::new();
        for ((one, (taken, _)), leader) in missing.into_iter().zip(leases).zip(leaders) {
            // Occupied: another caller's lease, seen by the first read or by
            // the `SET NX`.
            if matches!(taken, Taken::Occupied) {
                occupied.push((one, taken, leader));
            } else {
                computing.push((one, taken, leader));
            }
        }
        // A key leased or filled by another caller since the first read (a
        // flight this batch waited for, another batch, another process):
        // read once more, together; what is still leased is computed
        // without storing.
        if !occupied.is_empty() {
            let again: Vec<String> = occupied
                .iter()
                .map(|(one, ..)| keys[one.at].clone())
                .collect();
            let values = self
                .read_many(&again)
                .await
                .unwrap_or_else(|_| vec![Fetched::Absent; again.len()]);
            for ((one, taken, leader), fetched) in occupied.into_iter().zip(values) {
                let read = match fetched {
                    Fetched::Found(bytes) => {
                        self.classify_one::<V>(site, &keys[one.at], Fetched::Found(bytes))
                    }
                    Fetched::Absent | Fetched::TooLarge => One::Claim(None),
                };
                match read {
                    One::Value(value) => {
                        self.record(site, Event::Hit);
                        found.push((one.id, value));
                        look_again(leader);
                    }
                    One::Nothing => {
                        self.record(site, Event::Hit);
                        look_again(leader);
                    }
                    One::Claim(_) => computing.push((one, taken, leader)),
                }
            }
        }
        if computing.is_empty() {
            return S::from_map(map_of(found));
        }

        for _ in &computing {
            self.record(site, if uncached { Event::Bypass } else { Event::Miss });
        }
        let ids = computing.iter().map(|(one, ..)| one.id.clone()).collect();
        let (mut result, run) = Run::time(body(ids)).await;

        let map = S::map_mut(&mut result);
        let (computing, leaders): (Vec<_>, Vec<_>) = computing
            .into_iter()
            .map(|(one, taken, leader)| ((one, taken), leader))
            .unzip();
        let settled = computing
            .into_iter()
            .zip(&leaders)
            .map(|((one, taken), leader)| {
                let answer = match &map {
                    None => Answer::Failed,
                    Some(map) => map.lookup(&one.id).map_or(Answer::Nothing, Answer::Value),
                };
                let lease = match taken {
                    Taken::Held(lease) => Leased::Own(lease),
                    _ if uncached => Leased::Uncached,
                    Taken::Occupied | Taken::Failed => Leased::None,
                };
                let key = &keys[one.at];
                async move {
                    self.settle_answer(site, key, answer, lease, leader.as_ref(), run)
                        .await
                }
            });
        let landings = join_all(settled).await;
        for (leader, landing) in leaders.into_iter().zip(landings) {
            if let Some(leader) = leader {
                leader.land(landing);
            }
        }
        if let Some(map) = S::map_mut(&mut result) {
            for (id, value) in found {
                map.put(id, value);
            }
        }
        result
    }

    /// What one key's read means for the batch.
    fn classify_one<V: DeserializeOwned>(
        &self,
        site: &'static Site,
        key: &str,
        fetched: Fetched<Vec<u8>>,
    ) -> One<V> {
        let bytes = match fetched {
            Fetched::Found(bytes) => bytes,
            Fetched::Absent => return One::Claim(Some(Take::IfAbsent)),
            Fetched::TooLarge => {
                self.garbage(site, key, "an entry larger than max_value_size");
                return One::Claim(Some(Take::ReplacingTooLarge));
            }
        };
        match lease::inspect(&bytes) {
            // Someone's lease (its TTL unread): computed here without
            // storing, as a single lookup does without "distributed".
            Found::Placeholder if self.inner.janitor.is_abandoned(&bytes) => {
                One::Claim(Some(Take::Replacing(bytes)))
            }
            Found::Placeholder => One::Claim(None),
            Found::Malformed => {
                self.garbage(site, key, "a malformed lease placeholder");
                One::Claim(Some(Take::Replacing(bytes)))
            }
            Found::Value => {
                let value_at = match crate::read::freshness::split(&bytes) {
                    Ok(header) => header.map_or(0, |(_, at)| at),
                    Err(_) => {
                        self.garbage(site, key, "a malformed freshness header");
                        return One::Claim(Some(Take::Replacing(bytes)));
                    }
                };
                let value = &bytes[value_at..];
                if value == NOTHING {
                    return One::Nothing;
                }
                match self.decode_value(site, key, value) {
                    Some(value) => One::Value(value),
                    None => One::Claim(Some(Take::Replacing(bytes))),
                }
            }
        }
    }

    /// Joins this process's computation of `key`, or leads it.
    async fn coalesce_one<V: DeserializeOwned>(
        &self,
        site: &'static Site,
        key: &str,
        joiner: Joiner,
    ) -> Coalesced<'_, V> {
        let (mut handovers, mut later) = (0, 0);
        while handovers < MAX_HANDOVERS && later < MAX_LATER {
            let waiter = match self.inner.flights.join(key, joiner) {
                Role::Leader(leader) => return Coalesced::Lead(Some(leader)),
                Role::Waiter(waiter) => waiter,
            };
            match waiter.wait().await {
                Handed::Value(bytes) => {
                    if let Some(value) = self.decode_value(site, key, &bytes) {
                        self.record(site, Event::Coalesced);
                        return Coalesced::Value(value);
                    }
                }
                Handed::Nothing => {
                    self.record(site, Event::Coalesced);
                    return Coalesced::Nothing;
                }
                // Not a failed leader: the next flight covers this caller.
                Handed::Later => later += 1,
                Handed::LookAgain | Handed::Failed => handovers += 1,
            }
        }
        Coalesced::Lead(None)
    }
}

/// The map of a batch served from the cache alone.
fn map_of<M: BatchMap>(found: Vec<(M::Key, M::Value)>) -> M {
    let mut map = M::default();
    for (id, value) in found {
        map.put(id, value);
    }
    map
}

/// One key of a batch after its read.
enum One<V> {
    Value(V),
    Nothing,
    Claim(Option<Take>),
}

/// One missing key after coalescing.
enum Coalesced<'c, V> {
    Value(V),
    Nothing,
    /// Compute it: as the leader of its flight, or alone.
    Lead(Option<Leader<'c>>),
}
