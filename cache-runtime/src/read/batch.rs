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
//! of each id, as a single lookup is (see [`crate::cache::flight`]).
//! Stale values (`stale`, `early_refresh`) are not refreshed by a batch;
//! the macro rejects those options with `batch`.
//!
//! A batch goes through the single lookup's steps where they are the
//! same: what a read found ([`Cache::found`]), decoding, the lease, the
//! settling of each answer. Like a single lookup, it is compiled once:
//! [`TypedBatch`] is the typed half (the ids, the body, the values found),
//! behind [`BatchCall`].

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::backend::Fetched;
use crate::cache::Cache;
use crate::cache::flight::{Handed, Joiner, Leader, Role, look_again};
use crate::codec::{Codec, CodecError};
use crate::error::CacheError;
use crate::local::LocalHit;
use crate::outcome::{Answer, BatchMap, BatchOutcome, NOTHING};
use crate::outcome::{ByValue, Encoded};
use crate::read::call::Erased;
use crate::read::found::{Read, Ttl};
use crate::read::lookup::Leased;
use crate::read::run::Run;
use crate::site::{SingleFlight, Site};
use crate::stats::Event;
use crate::tag::{Tagging, Tags};
use crate::token::Token;
use crate::write::lease::{HeldLease, Take, Taken};

/// How often an id's handover may fail before the batch computes it
/// without joining the flight.
const MAX_HANDOVERS: u32 = 3;
/// How many flights whose answer was not for it an id may sit through: one
/// whose body had started before the batch began, then the next, whose
/// body starts after the batch joined it, covers it (more only where a
/// flight failed in between); a bound all the same.
const MAX_LATER: u32 = 4;

/// One batch call, as the read path sees it; ids are named by their
/// index in the batch's distinct keys.
pub(crate) trait BatchCall {
    /// Decodes the value of the id at `at` (decompressed already) as found.
    fn decode(
        self: Pin<&mut Self>,
        at: usize,
        codec: Codec,
        bytes: &[u8],
    ) -> Result<(), CodecError>;
    /// Polls the body, called with the ids at `ats` on the first poll;
    /// it is dropped when it completes.
    fn poll_body(self: Pin<&mut Self>, ats: &[usize], cx: &mut Context<'_>) -> Poll<()>;
    /// Drops the body where it stands (its run was cancelled).
    fn drop_body(self: Pin<&mut Self>);
    /// The body's answer for the id at `at`, encoded.
    fn encode_answer(self: Pin<&mut Self>, at: usize, codec: Codec) -> Encoded;
    /// The tags the body's value for the id at `at` names (`tags_from`).
    fn derived_tags(self: Pin<&mut Self>, at: usize) -> Vec<String>;
}

pub(crate) type ErasedBatch<'a> = Erased<'a, dyn BatchCall + 'a>;

// SAFETY: as for a single call's `Erased` (see `read::call`), for a
// batch's `TypedBatch`.
// (Two lifetimes, as `read::call` has them: the alias's one would make
// the futures that hold it `Send` for one lifetime only.)
unsafe impl Send for Erased<'_, dyn BatchCall + '_> {}

impl<'a> ErasedBatch<'a> {
    pub(crate) fn batch<C: BatchCall + 'a>(call: Pin<&'a mut C>) -> Self {
        let call: Pin<&'a mut (dyn BatchCall + 'a)> = call;
        Erased::of(call)
    }
}

/// Runs the body of `call` with the ids at `ats`; if this future is
/// dropped first, the body is dropped with it, before the leases and
/// flights of its ids are given back (see `Erased::run_body`).
async fn run_body(call: &mut ErasedBatch<'_>, ats: &[usize]) {
    let running = Running(call);
    std::future::poll_fn(|cx| running.0.pinned().poll_body(ats, cx)).await;
}

/// A batch's body being run, dropped if the run is.
struct Running<'r, 'a>(&'r mut ErasedBatch<'a>);

impl Drop for Running<'_, '_> {
    fn drop(&mut self) {
        self.0.pinned().drop_body();
    }
}

pin_project_lite::pin_project! {
    /// A batch call of one function: the distinct ids it looks up, the
    /// body, the values found for them, and the body's output.
    pub(crate) struct TypedBatch<S, R, K, V, B, Fut> {
        ids: Vec<K>,
        body: Option<B>,
        #[pin]
        running: Option<Fut>,
        output: Option<R>,
        found: Vec<(K, V)>,
        rules: ByValue<V>,
        shape: PhantomData<fn() -> S>,
    }
}

impl<S, R, K, V, B, Fut> TypedBatch<S, R, K, V, B, Fut>
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = K, Value = V>,
    V: Serialize + DeserializeOwned,
    K: Clone,
    B: FnOnce(Vec<K>) -> Fut,
    Fut: Future<Output = R>,
{
    /// A batch of distinct `ids`, with the values `found` already (in
    /// process memory) for other ids.
    pub(crate) fn new(ids: Vec<K>, body: B, found: Vec<(K, V)>, rules: ByValue<V>) -> Self {
        TypedBatch {
            ids,
            body: Some(body),
            running: None,
            output: None,
            found,
            rules,
            shape: PhantomData,
        }
    }

    /// The batch's result: the body's, with the values found merged
    /// into its map; without a body run, a map of the values found.
    pub(crate) fn answer(self: Pin<&mut Self>) -> R {
        let this = self.project();
        let found = std::mem::take(this.found);
        let Some(mut result) = this.output.take() else {
            let mut map = S::Map::default();
            for (id, value) in found {
                map.put(id, value);
            }
            return S::from_map(map);
        };
        if let Some(map) = S::map_mut(&mut result) {
            for (id, value) in found {
                map.put(id, value);
            }
        }
        result
    }
}

impl<S, R, K, V, B, Fut> BatchCall for TypedBatch<S, R, K, V, B, Fut>
where
    S: BatchOutcome<R>,
    S::Map: BatchMap<Key = K, Value = V>,
    V: Serialize + DeserializeOwned,
    K: Clone,
    B: FnOnce(Vec<K>) -> Fut,
    Fut: Future<Output = R>,
{
    fn decode(
        self: Pin<&mut Self>,
        at: usize,
        codec: Codec,
        bytes: &[u8],
    ) -> Result<(), CodecError> {
        let this = self.project();
        let value = codec.decode::<V>(bytes)?;
        this.found.push((this.ids[at].clone(), value));
        Ok(())
    }

    fn poll_body(self: Pin<&mut Self>, ats: &[usize], cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if this.output.is_some() {
            return Poll::Ready(());
        }
        if this.running.is_none() {
            let Some(body) = this.body.take() else {
                return Poll::Ready(());
            };
            let ids = ats.iter().map(|&at| this.ids[at].clone()).collect();
            this.running.set(Some(body(ids)));
        }
        let Some(running) = this.running.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let output = std::task::ready!(running.poll(cx));
        this.running.set(None);
        *this.output = Some(output);
        Poll::Ready(())
    }

    fn drop_body(self: Pin<&mut Self>) {
        let mut this = self.project();
        this.running.set(None);
        *this.body = None;
    }

    fn encode_answer(self: Pin<&mut Self>, at: usize, codec: Codec) -> Encoded {
        let this = self.project();
        let answer = match this.output.as_mut().and_then(S::map_mut) {
            None => Answer::Failed,
            Some(map) => map
                .lookup(&this.ids[at])
                .map_or(Answer::Nothing, Answer::Value),
        };
        Encoded::of(codec, answer, this.rules)
    }

    fn derived_tags(self: Pin<&mut Self>, at: usize) -> Vec<String> {
        let this = self.project();
        let mut tags = Vec::new();
        if let Some(value) = this
            .output
            .as_mut()
            .and_then(S::map_mut)
            .and_then(|map| map.lookup(&this.ids[at]))
        {
            this.rules.tags_of(value, &mut tags);
        }
        tags
    }
}

/// Distinct keys, first occurrence first, with their ids.
pub(crate) fn distinct<K>(entries: Vec<(K, String)>) -> (Vec<K>, Vec<String>) {
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

/// For a function with a local tier: the ids whose copies this process
/// holds (made by single lookups of the same keys) are answered into
/// `found`; the others are returned, to be looked up in Redis as usual.
/// A batch makes no copies itself: its read is not sent on the tracking
/// connection, and does not say how long each entry has left.
pub(crate) fn local_answers<K, V: Clone + Send + Sync + 'static>(
    cache: &Cache,
    site: &'static Site,
    ids: Vec<K>,
    keys: Vec<String>,
    found: &mut Vec<(K, V)>,
) -> (Vec<K>, Vec<String>) {
    let Some(tracking) = cache.local() else {
        return (ids, keys);
    };
    let tier = tracking.tier();
    let primaries = cache.backend().primaries_epoch();
    let (mut rest_ids, mut rest_keys) = (Vec::new(), Vec::new());
    for (id, key) in ids.into_iter().zip(keys) {
        match tier.get::<V>(&key, primaries) {
            Some(LocalHit::Value(value)) => {
                cache.record(site, Event::LocalHit);
                found.push((id, value));
            }
            Some(LocalHit::Nothing) => cache.record(site, Event::LocalHit),
            None => {
                rest_ids.push(id);
                rest_keys.push(key);
            }
        }
    }
    (rest_ids, rest_keys)
}

/// The tags of the key at `at`: `tags` is empty for an untagged function
/// (no vector of `None`s), else one per key.
fn tag_at(tags: &[Option<Tags>], at: usize) -> Option<&Tagging> {
    tags.get(at).and_then(Option::as_deref)
}

/// What the tags an entry's value named (`tags_from`) hold now.
enum Derived {
    /// Each the token the entry was stored with (or it names none).
    Held,
    /// One was invalidated since: the entry is replaced.
    Moved,
    /// They could not be read: the key is computed without storing.
    Unchecked,
}

/// One distinct key of the batch that the cache did not answer.
struct Missing {
    /// Index into the batch's keys.
    at: usize,
    /// How to take its lease; `None` for another caller's live lease
    /// (computed without storing).
    take: Option<Take>,
}

/// A key the batch computes, with its lease and its flight.
struct Computing<'c> {
    at: usize,
    taken: Taken<'c>,
    leader: Option<Leader<'c>>,
}

/// What the batch's first read gave.
enum BatchRead {
    Values(Vec<Fetched<Vec<u8>>>),
    /// The cache could not be read (or a key of it has an invalidation of
    /// this process still to deliver): with `single_flight`, every id is
    /// computed without a lease and coalesced; without, the body runs.
    Unavailable {
        pending_write: bool,
    },
}

impl Cache {
    /// Serves the distinct `keys` of `call` from the cache and computes
    /// the others with one call of its body; see the module docs.
    pub(crate) async fn lookup_batch(
        &self,
        site: &'static Site,
        keys: Vec<String>,
        mut tags: Vec<Option<Tags>>,
        call: &mut ErasedBatch<'_>,
    ) {
        if keys.is_empty() {
            return;
        }
        let tags = &mut tags[..];
        let began = Instant::now();
        let coalescing = site.single_flight_mode() != SingleFlight::Off;
        let (missing, uncached, pending_write) = match self.read_batch(site, &keys, tags).await {
            BatchRead::Values(values) => {
                let derived = self.check_batch_derived(site, tags, &values).await;
                let missing = self.classify_batch(site, &keys, tags, values, &derived, call);
                (missing, false, false)
            }
            BatchRead::Unavailable { pending_write } if coalescing => {
                let missing = (0..keys.len())
                    .map(|at| Missing { at, take: None })
                    .collect();
                (missing, true, pending_write)
            }
            BatchRead::Unavailable { .. } => {
                for _ in &keys {
                    self.record(site, Event::Bypass);
                }
                let all: Vec<usize> = (0..keys.len()).collect();
                return run_body(call, &all).await;
            }
        };
        let (missing, leaders) = if coalescing {
            // Inside `refresh`, only a computation that began after the
            // call answers it (see `Cache::after_read`).
            let joiner = Joiner {
                began,
                takes_proof: !pending_write && !call.refreshing(),
            };
            self.coalesce_batch(site, &keys, missing, joiner, call)
                .await
        } else {
            let leaders = missing.iter().map(|_| None).collect();
            (missing, leaders)
        };
        if missing.is_empty() {
            return;
        }
        let computing = self
            .lease_batch(site, &keys, tags, missing, leaders, uncached, call)
            .await;
        if !computing.is_empty() {
            self.compute_batch(site, &keys, tags, computing, uncached, call)
                .await;
        }
    }

    /// Step 1: one read of every key, unless one of them has an
    /// invalidation of this process still to deliver (see
    /// [`Cache::pending_write`]); a failure is counted and logged.
    async fn read_batch(
        &self,
        site: &'static Site,
        keys: &[String],
        tags: &mut [Option<Tags>],
    ) -> BatchRead {
        let tag_keys = tags.iter().flatten().flat_map(|tagging| tagging.keys());
        if keys
            .iter()
            .chain(tag_keys)
            .any(|key| self.pending_write(site, key))
        {
            return BatchRead::Unavailable {
                pending_write: true,
            };
        }
        let (read, tokens) =
            futures_util::future::join(self.read_many(keys), self.read_batch_tokens(site, tags))
                .await;
        if !tokens {
            return BatchRead::Unavailable {
                pending_write: false,
            };
        }
        match read {
            Ok(values) => BatchRead::Values(values),
            Err(error) => {
                if !matches!(error, CacheError::CircuitOpen) {
                    self.record(site, Event::Error);
                    crate::limited!(
                        self,
                        warn!(%error, keys = keys.len(), "cache batch read failed: running uncached")
                    );
                }
                BatchRead::Unavailable {
                    pending_write: false,
                }
            }
        }
    }

    /// Step 2: serves what the read found (decoded into `call`, counted as
    /// hits); the rest is missing.
    fn classify_batch(
        &self,
        site: &'static Site,
        keys: &[String],
        tags: &[Option<Tags>],
        values: Vec<Fetched<Vec<u8>>>,
        derived: &[Derived],
        call: &mut ErasedBatch<'_>,
    ) -> Vec<Missing> {
        let mut missing = Vec::new();
        for (at, fetched) in values.into_iter().enumerate() {
            let one = match (derived.get(at), fetched) {
                (Some(Derived::Unchecked), _) => Some(None),
                (Some(Derived::Moved), Fetched::Found(bytes)) => Some(Some(Take::Replacing(bytes))),
                (_, fetched) => {
                    self.classify_one(site, &keys[at], tag_at(tags, at), at, fetched, call)
                }
            };
            match one {
                None => self.record(site, Event::Hit),
                Some(take) => missing.push(Missing { at, take }),
            }
        }
        missing
    }

    /// For a function with `tags_from`: what the tags each entry's value
    /// named hold now, read once for the whole batch (see
    /// [`Cache::check_derived`]); empty for other functions.
    async fn check_batch_derived(
        &self,
        site: &'static Site,
        tags: &[Option<Tags>],
        values: &[Fetched<Vec<u8>>],
    ) -> Vec<Derived> {
        if !site.derives_tags() {
            return Vec::new();
        }
        // `None`: a malformed header, replaced.
        let named: Vec<Option<crate::tag::Named<'_>>> = values
            .iter()
            .enumerate()
            .map(|(at, fetched)| match (tag_at(tags, at), fetched) {
                (Some(tagging), Fetched::Found(bytes)) if tagging.stamped(bytes) => {
                    tagging.derived_of(bytes)
                }
                _ => Some(Vec::new()),
            })
            .collect();
        let prefix = self.prefixed("");
        let mut keys: Vec<String> = named
            .iter()
            .flatten()
            .flatten()
            .map(|(_, name)| {
                format!(
                    "{prefix}{}{}",
                    crate::key::TAG_MARK,
                    String::from_utf8_lossy(name)
                )
            })
            .collect();
        if keys.is_empty() && named.iter().all(Option::is_some) {
            return Vec::new();
        }
        keys.sort_unstable();
        keys.dedup();
        let now = match keys.iter().any(|key| self.pending_write(site, key)) {
            true => None,
            false => match self.read_tokens_of(&keys).await {
                Ok(now) => Some(now),
                Err(error) => {
                    self.tags_unread(site, &error);
                    None
                }
            },
        };
        named
            .iter()
            .map(|pairs| {
                let Some(pairs) = pairs else {
                    return Derived::Moved;
                };
                if pairs.is_empty() {
                    return Derived::Held;
                }
                let Some(now) = &now else {
                    return Derived::Unchecked;
                };
                let held = pairs.iter().all(|(token, name)| {
                    let key = format!(
                        "{prefix}{}{}",
                        crate::key::TAG_MARK,
                        String::from_utf8_lossy(name)
                    );
                    let at = keys.binary_search(&key).unwrap_or_default();
                    matches!(&now[at], Fetched::Found(now) if now == token)
                });
                if held { Derived::Held } else { Derived::Moved }
            })
            .collect()
    }

    /// What one key's read means for the batch, through the single
    /// lookup's classification of what was found: `None` when it was
    /// served (a value decoded into `call`, or a negative entry), else
    /// how to take its lease (`Some(None)`: another caller's lease,
    /// computed here without storing). A tagged key's value is served
    /// only if it was stored with the tokens its tags hold now.
    fn classify_one(
        &self,
        site: &'static Site,
        key: &str,
        tagging: Option<&Tagging>,
        at: usize,
        fetched: Fetched<Vec<u8>>,
        call: &mut ErasedBatch<'_>,
    ) -> Option<Option<Take>> {
        let read = self.found(site, key, Ok(fetched.map(|bytes| (bytes, Ttl::Unknown))));
        let read = match tagging {
            None => crate::read::tagged::untagged(read),
            Some(_) => read,
        };
        match read {
            // Inside `refresh`, a value is recomputed as well.
            Read::Value { bytes, .. }
                if call.refreshing() || tagging.is_some_and(|t| !t.stamped(&bytes)) =>
            {
                Some(Some(Take::Replacing(bytes)))
            }
            Read::Value {
                bytes, value_at, ..
            } => {
                let value = &bytes[value_at..];
                if value == NOTHING {
                    return None;
                }
                let codec = self.settings().codec;
                let decoded = self.decoding(value, |value| call.pinned().decode(at, codec, value));
                match self.decoded(site, key, decoded) {
                    Some(()) => None,
                    None => Some(Some(Take::Replacing(bytes))),
                }
            }
            Read::Absent => Some(Some(Take::IfAbsent)),
            Read::Garbage(garbage) => Some(Some(garbage.take())),
            // Someone's lease (its TTL unread): computed here without
            // storing, as a single lookup does without "distributed".
            Read::Leased { .. } | Read::Unavailable { .. } => Some(None),
        }
    }

    /// Step 3: each missing key joins this process's computation of it,
    /// or leads it, one key at a time in key order, so that overlapping
    /// batches cannot wait for each other (see the module docs). Returns
    /// the keys the batch computes, with their flights.
    async fn coalesce_batch<'c>(
        &'c self,
        site: &'static Site,
        keys: &'c [String],
        mut missing: Vec<Missing>,
        joiner: Joiner,
        call: &mut ErasedBatch<'_>,
    ) -> (Vec<Missing>, Vec<Option<Leader<'c>>>) {
        missing.sort_by(|a, b| keys[a.at].cmp(&keys[b.at]));
        let (mut computed, mut leaders) = (Vec::new(), Vec::new());
        for one in missing {
            if let Some(leader) = self
                .coalesce_one(site, &keys[one.at], one.at, joiner, call)
                .await
            {
                leaders.push(leader);
                computed.push(one);
            }
        }
        (computed, leaders)
    }

    /// Joins this process's computation of the key at `at` (its value
    /// decoded into `call`: `None`), or leads it (`Some`, with the flight
    /// when it joined one).
    async fn coalesce_one<'c>(
        &'c self,
        site: &'static Site,
        key: &'c str,
        at: usize,
        joiner: Joiner,
        call: &mut ErasedBatch<'_>,
    ) -> Option<Option<Leader<'c>>> {
        let (mut handovers, mut later) = (0, 0);
        while handovers < MAX_HANDOVERS && later < MAX_LATER {
            let waiter = match self.flights().join(key, joiner) {
                Role::Leader(leader) => return Some(Some(leader)),
                Role::Waiter(waiter) => waiter,
            };
            match waiter.wait().await {
                Handed::Value(bytes) => {
                    let codec = self.settings().codec;
                    let decoded =
                        self.decoding(&bytes, |value| call.pinned().decode(at, codec, value));
                    if self.decoded(site, key, decoded).is_some() {
                        self.record(site, Event::Coalesced);
                        return None;
                    }
                }
                Handed::Nothing => {
                    self.record(site, Event::Coalesced);
                    return None;
                }
                // Not a failed leader: the next flight covers this caller.
                Handed::Later => later += 1,
                Handed::LookAgain | Handed::Failed => handovers += 1,
            }
        }
        Some(None)
    }

    /// Step 4: the leases of the keys the batch computes, taken together.
    /// A key leased or filled by another caller since the first read (a
    /// flight this batch waited for, another batch, another process) is
    /// read once more, together: served if it holds an answer now,
    /// computed without storing if it is still leased.
    #[allow(clippy::too_many_arguments)]
    async fn lease_batch<'c>(
        &'c self,
        site: &'static Site,
        keys: &'c [String],
        tags: &[Option<Tags>],
        mut missing: Vec<Missing>,
        leaders: Vec<Option<Leader<'c>>>,
        uncached: bool,
        call: &mut ErasedBatch<'_>,
    ) -> Vec<Computing<'c>> {
        let leases = join_all(missing.iter_mut().map(|one| {
            let take = one.take.take();
            let key = &keys[one.at];
            async move {
                match take {
                    Some(take) => HeldLease::take(self, site, key, take).await,
                    None if uncached => Taken::Failed,
                    None => Taken::Occupied,
                }
            }
        }))
        .await;
        let mut computing = Vec::with_capacity(missing.len());
        let mut occupied = Vec::new();
        for ((one, taken), leader) in missing.into_iter().zip(leases).zip(leaders) {
            let key = Computing {
                at: one.at,
                taken,
                leader,
            };
            if matches!(key.taken, Taken::Occupied) {
                occupied.push(key);
            } else {
                computing.push(key);
            }
        }
        if occupied.is_empty() {
            return computing;
        }
        let again: Vec<String> = occupied.iter().map(|one| keys[one.at].clone()).collect();
        let values = self
            .read_many(&again)
            .await
            .unwrap_or_else(|_| vec![Fetched::Absent; again.len()]);
        for (one, fetched) in occupied.into_iter().zip(values) {
            let served = match fetched {
                // Its tags' tokens were read before this batch waited: an
                // entry stored since may carry a token invalidated since.
                // Computed without storing, as a single lookup is.
                Fetched::Found(_) if tag_at(tags, one.at).is_some() => false,
                Fetched::Found(_) => self
                    .classify_one(site, &keys[one.at], None, one.at, fetched, call)
                    .is_none(),
                Fetched::Absent | Fetched::TooLarge => false,
            };
            if served {
                self.record(site, Event::Hit);
                look_again(one.leader);
            } else {
                computing.push(one);
            }
        }
        computing
    }

    /// Step 4, then: runs the body once with the ids computed, and settles
    /// each one's lease with its answer exactly as a single lookup would.
    async fn compute_batch(
        &self,
        site: &'static Site,
        keys: &[String],
        tags: &mut [Option<Tags>],
        computing: Vec<Computing<'_>>,
        uncached: bool,
        call: &mut ErasedBatch<'_>,
    ) {
        let event = match (uncached, call.refreshing()) {
            (true, _) => Event::Bypass,
            (false, true) => Event::Refresh,
            (false, false) => Event::Miss,
        };
        for _ in &computing {
            self.record(site, event);
        }
        let ats: Vec<usize> = computing.iter().map(|one| one.at).collect();
        let clocks = match site.derives_tags() && !uncached {
            true => self.read_clocks(site).await,
            false => None,
        };
        let ((), run) = Run::time(run_body(call, &ats)).await;
        if site.derives_tags() {
            self.derive_batch(site, tags, &ats, clocks.as_deref(), call)
                .await;
        }
        let tags = &*tags;
        let codec = self.settings().codec;
        let mut leaders = Vec::with_capacity(computing.len());
        let mut settling = Vec::with_capacity(computing.len());
        for one in computing {
            let answer = call.pinned().encode_answer(one.at, codec);
            let lease = match one.taken {
                Taken::Held(lease) => Leased::Own(lease),
                _ if uncached => Leased::Uncached,
                Taken::Occupied | Taken::Failed => Leased::None,
            };
            settling.push((&keys[one.at], tag_at(tags, one.at), answer, lease));
            leaders.push(one.leader);
        }
        let settled =
            settling
                .into_iter()
                .zip(&leaders)
                .map(|((key, tagging, answer, lease), leader)| {
                    self.settle(site, key, answer, lease, leader.as_ref(), run, tagging)
                });
        let landings = join_all(settled).await;
        for (leader, landing) in leaders.into_iter().zip(landings) {
            if let Some(leader) = leader {
                leader.land(landing);
            }
        }
    }

    /// For a function with `tags_from`, once the batch's body ran: the
    /// tags each computed id's value names (see [`Cache::derive`]), the
    /// ids' reads sent together.
    async fn derive_batch(
        &self,
        site: &'static Site,
        tags: &mut [Option<Tags>],
        ats: &[usize],
        clocks: Option<&[Token]>,
        call: &mut ErasedBatch<'_>,
    ) {
        let mut names: Vec<(usize, Vec<String>)> = ats
            .iter()
            .map(|&at| (at, call.pinned().derived_tags(at)))
            .collect();
        names.sort_unstable_by_key(|(at, _)| *at);
        let mut names = names.into_iter().peekable();
        let derives = tags.iter_mut().enumerate().filter_map(|(at, tagging)| {
            while names.next_if(|(named, _)| *named < at).is_some() {}
            let (_, named) = names.next_if(|(named, _)| *named == at)?;
            Some(self.derive(site, tagging.as_deref_mut()?, named, clocks))
        });
        join_all(derives).await;
    }
}
