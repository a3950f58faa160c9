//! The local tier (`#[redis_cached(local = "5s")]`): decoded copies of
//! entries in process memory, dropped when the server says their key
//! changed.
//!
//! # How a copy stays right
//!
//! A copy is only ever made of a value read on the *tracking connection*
//! (see [`crate::local::tracking`]): a connection on which the server remembers
//! the keys of each read sent right after `CLIENT CACHING YES` (every read
//! whose answer is kept) and sends an invalidation for each of them when
//! it changes, whoever changed it (another process, `redis-cli`, expiry,
//! eviction, `FLUSHDB`).
//!
//! The read's reply and the invalidation of its key can cross: the reply
//! is handed to the caller, the invalidation is handled by the connection
//! before the caller stores its copy. So every fill takes a [`Ticket`]
//! *before* its read is sent: the count of invalidations of the key's
//! bucket, and the tier's epoch (bumped when every copy is dropped).
//! The fill stores its copy, then looks at both again; if either moved it
//! removes what it stored. An invalidation bumps the count before it
//! removes the key, so either the fill sees the bump or the invalidation
//! removes the fill's copy: a copy that raced with its key's invalidation
//! never stays. (A bump of another key of the same bucket only costs a
//! copy, never correctness.)
//!
//! A copy of a tagged function's entry (see [`crate::tag`]) also holds a
//! [`TagTicket`] per tag, taken with its ticket: the tags' keys are read
//! on the tracking connection beside the entry, so the server says when
//! one is invalidated, which bumps its bucket's count; a copy whose tags'
//! counts moved is never served. (A bump of another key of a tag's bucket
//! costs the copy, never correctness.)
//!
//! # Tags' tokens
//!
//! The tokens of tags (see [`crate::tag`]) read on the tracking connection
//! are kept too, each with the [`Ticket`] taken before its read, so that a
//! tagged hit reads its entry alone, on the tracking connection, and
//! checks it against the kept tokens. This is exact, not a window: the
//! server sends an invalidation of a tag key it tracks for the connection
//! when the key changes, *before* the reply to any command it runs after
//! the change, and the connection handles pushes in order as it reads
//! them. So once the entry's reply is in, every tag change that preceded
//! the entry's read has bumped its bucket, and a kept token whose ticket
//! is still valid then is the tag's token at the time of that read (what
//! reading both in one pipeline would have found). A token whose ticket
//! moved is read again, with the entry, and kept anew. A token is used
//! only with the connection it was read on: a connection handed out
//! carries its *era* (the epoch read before it was), a token is kept only
//! if its ticket has that epoch, and used only with a connection of the
//! same era; a connection given up is unpublished and then the epoch
//! bumped, so a token read on it after that is never kept (the next
//! connection does not track it, and the given-up one, once dropped,
//! sends nothing).
//!
//! When the tracking connection is lost (or found dead by its heartbeat),
//! invalidations may have been missed: every copy is dropped and the
//! epoch bumped before the next connection is used. The writing
//! process drops its own copies of the keys it writes, before and after
//! the write, so read-your-writes holds exactly within a process.

pub(crate) mod tracking;

use std::any::Any;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stats::LocalStats;
use crate::token::Token;

/// Buckets of the invalidation counts: a fill is refused when any key of
/// its bucket was invalidated during its read, so more buckets mean fewer
/// needless refusals under a heavy write load.
const BUCKETS: usize = 4096;

/// The longest a copy is kept, whatever `local` says: past it, moka
/// drops copies on its own.
const LONGEST_COPY: Duration = Duration::from_secs(3600);

/// Tags' tokens kept at most (a tag of each of 64 Ki users, say): one
/// not kept is read with its entry.
const TOKENS_KEPT: usize = 64 * 1024;

/// What one copy costs beyond its key and encoded value, for the weigher:
/// moka's entry, the `Arc` and the decoded value's own headers, roughly.
const ENTRY_OVERHEAD: usize = 96;

/// One decoded copy: `Option<V>` behind `Any`, `None` being a cached
/// answer of nothing.
#[derive(Clone)]
struct Copy {
    value: Arc<dyn Any + Send + Sync>,
    /// What it weighs, by its encoded length (see `local_capacity`).
    weight: u32,
    /// The tier's epoch when its read was sent: a copy of an older epoch
    /// is never served, whenever moka gets round to dropping it.
    epoch: u64,
    /// The deployment's primaries epoch then (a cluster's slot map): a
    /// copy made under another map is never served either.
    primaries: u64,
    expires_at: quanta::Instant,
    /// Its tags' counts when its read was sent (`None` without tags).
    tags: Option<Arc<[TagTicket]>>,
}

/// The clock of the copies' ends. `quanta` reads the CPU's time-stamp
/// counter where that is reliable (the OS clock cost a local hit about a
/// tenth of its time, measured in bench/src/bin/bench.rs), and the OS clock
/// where it is not.
fn now() -> quanta::Instant {
    quanta::Instant::now()
}

/// `quanta` calibrates its clock on first use, for up to 200 ms: on a
/// thread of its own when the first tier is made, rather than on a
/// runtime worker at the first fill.
fn calibrate_clock() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new()
            .name("cache-runtime-clock".to_owned())
            .spawn(now);
    });
}

/// How the local tier learns that a key changed; see
/// [`CacheBuilder::local_invalidation`](crate::CacheBuilder::local_invalidation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LocalInvalidation {
    /// The server says so (RESP3 client-side caching, `CLIENT TRACKING`):
    /// any change to a key, whoever made it, drops every process's copy.
    #[default]
    Tracking,
    /// Every cache sharing the key prefix publishes the keys it writes on
    /// a pub/sub channel, and drops the copies of the keys the others
    /// publish. For deployments where `CLIENT TRACKING` is not available
    /// (a proxy in front of Redis). Changes made without the cache
    /// (`redis-cli`, expiry, eviction, `FLUSHDB`) are not announced: a copy
    /// can outlive them for up to its function's `local` time.
    Broadcast,
}

/// Permission to keep a copy of one read, taken before the read is sent;
/// see the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    bucket: usize,
    invalidations: u64,
    epoch: u64,
    primaries: u64,
}

/// A tag's place in the invalidation counts, taken with a copy's
/// [`Ticket`]: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TagTicket {
    bucket: usize,
    invalidations: u64,
}

/// A tag's token read on the tracking connection, with the ticket taken
/// before the read: see "Tags' tokens" in the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeptToken {
    pub(crate) token: Token,
    ticket: Ticket,
}

/// The kept tokens of a function's tags: inline for up to four tags (no
/// allocation on a hit).
pub(crate) type KeptTokens = smallvec::SmallVec<[KeptToken; 4]>;

/// What a lookup of the local tier found.
pub(crate) enum LocalHit<V> {
    Value(V),
    /// A cached answer of nothing (`cache_none`).
    Nothing,
}

/// The copies of one `Cache`, with the counts that keep them right.
pub(crate) struct LocalTier {
    copies: moka::sync::Cache<String, Copy, foldhash::fast::RandomState>,
    /// Tags' tokens, by their Redis keys. Not moka: its reads share a
    /// queue and a lock, and two of them per tagged hit, on every worker,
    /// cost the hit a fifth of its throughput at 64 callers (three futex
    /// calls a hit, measured with `perf stat` on the tags benchmark).
    tokens: dashmap::DashMap<String, KeptToken, foldhash::fast::RandomState>,
    hasher: std::hash::RandomState,
    buckets: Box<[AtomicU64]>,
    /// Bumped when every copy is dropped at once.
    epoch: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    capacity: u64,
}

impl std::fmt::Debug for LocalTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTier")
            .field("entries", &self.copies.entry_count())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl LocalTier {
    pub(crate) fn new(capacity: u64) -> Self {
        calibrate_clock();
        let copies = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_key: &String, copy: &Copy| copy.weight)
            // One TTL for every copy, the longest a copy may live: moka's
            // per-entry expiry costs a hit about a third more (measured in
            // bench/src/bin/bench.rs); each copy's own end is checked on a hit.
            .time_to_live(LONGEST_COPY)
            .build_with_hasher(foldhash::fast::RandomState::default());
        LocalTier {
            copies,
            tokens: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
            hasher: std::hash::RandomState::new(),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            capacity,
        }
    }

    /// The copy of `key`, if one is held and live, made under the
    /// deployment's current `primaries` epoch, and of type `V` (two
    /// functions with one key template but different value types do not
    /// share copies: the other's copy is a miss).
    pub(crate) fn get<V: Clone + 'static>(&self, key: &str, primaries: u64) -> Option<LocalHit<V>> {
        let copy = self.copies.get(key)?;
        // moka may hand out a copy in the instant after `invalidate_all`.
        if copy.epoch != self.epoch.load(Ordering::Acquire)
            || copy.primaries != primaries
            || copy.expires_at <= now()
            || copy
                .tags
                .as_ref()
                .is_some_and(|tags| !self.tags_valid(tags))
        {
            return None;
        }
        match copy.value.downcast_ref::<Option<V>>()? {
            Some(value) => Some(LocalHit::Value(value.clone())),
            None => Some(LocalHit::Nothing),
        }
    }

    /// A ticket for a read of `key` on the tracking connection under the
    /// deployment's `primaries` epoch, taken before the read is sent.
    pub(crate) fn ticket(&self, key: &str, primaries: u64) -> Ticket {
        let bucket = self.bucket_of(key.as_bytes());
        Ticket {
            bucket,
            invalidations: self.buckets[bucket].load(Ordering::SeqCst),
            epoch: self.epoch.load(Ordering::SeqCst),
            primaries,
        }
    }

    /// The tickets of the tags (by their Redis keys) of a read about to
    /// be sent.
    pub(crate) fn tag_tickets(&self, tags: &[String]) -> Option<Arc<[TagTicket]>> {
        if tags.is_empty() {
            return None;
        }
        let tickets = tags
            .iter()
            .map(|tag| {
                let bucket = self.bucket_of(tag.as_bytes());
                TagTicket {
                    bucket,
                    invalidations: self.buckets[bucket].load(Ordering::SeqCst),
                }
            })
            .collect();
        Some(tickets)
    }

    /// The tickets for a read of tags' tokens (by their Redis keys) on the
    /// tracking connection, taken before it is sent.
    pub(crate) fn token_tickets(&self, keys: &[String], primaries: u64) -> Vec<Ticket> {
        keys.iter().map(|key| self.ticket(key, primaries)).collect()
    }

    /// The epoch, bumped when every copy is dropped (a tracking connection
    /// given up): see [`Tracking::tracked`](tracking::Tracking::tracked).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Keeps the tokens a read with `tickets` found on the tracking
    /// connection of `era` (see "Tags' tokens" in the module docs), unless
    /// that connection was given up since it was handed out: a token read
    /// on it is not tracked by the one after it. One whose ticket moved
    /// already is kept but never used.
    pub(crate) fn keep_tokens(
        &self,
        keys: &[String],
        tokens: &[Token],
        tickets: Vec<Ticket>,
        era: u64,
    ) {
        if tickets.iter().any(|ticket| ticket.epoch != era) {
            return;
        }
        if self.tokens.len() >= TOKENS_KEPT {
            // Full: forgotten together (each is read again with its next entry).
            self.tokens.clear();
        }
        for ((key, token), ticket) in keys.iter().zip(tokens).zip(tickets) {
            let token = *token;
            self.tokens.insert(key.clone(), KeptToken { token, ticket });
        }
    }

    /// The kept tokens of `keys`, if every one is kept, was read on the
    /// tracking connection of `era` (the one about to be read on) and is
    /// valid under the deployment's `primaries` epoch; valid again only if
    /// [`LocalTier::tokens_valid`] says so once the entry's reply is in.
    pub(crate) fn kept_tokens(
        &self,
        keys: &[String],
        primaries: u64,
        era: u64,
    ) -> Option<KeptTokens> {
        let kept: KeptTokens = keys
            .iter()
            .map(|key| self.tokens.get(key).map(|kept| *kept))
            .collect::<Option<_>>()?;
        let valid = kept.iter().all(|kept| {
            kept.ticket.primaries == primaries
                && kept.ticket.epoch == era
                && self.valid(kept.ticket)
        });
        valid.then_some(kept)
    }

    /// Whether no invalidation of the tokens' tags (nor a lost connection)
    /// came in since they were read.
    pub(crate) fn tokens_valid(&self, kept: &[KeptToken]) -> bool {
        kept.iter().all(|kept| self.valid(kept.ticket))
    }

    fn tags_valid(&self, tags: &[TagTicket]) -> bool {
        tags.iter()
            .all(|tag| self.buckets[tag.bucket].load(Ordering::SeqCst) == tag.invalidations)
    }

    /// Keeps a copy of what a read with `ticket` (and `tags`) found, for
    /// `ttl`, unless the key, one of its tags or the whole tier was
    /// invalidated since the ticket was taken. `value` is `None` for a
    /// cached answer of nothing; `encoded` is the entry's length in Redis,
    /// for its weight.
    pub(crate) fn fill<V: Send + Sync + 'static>(
        &self,
        ticket: Ticket,
        tags: Option<&Arc<[TagTicket]>>,
        key: &str,
        value: Option<V>,
        encoded: usize,
        ttl: Duration,
    ) {
        let tags_valid = || tags.is_none_or(|tags| self.tags_valid(tags));
        if ttl.is_zero() || !self.valid(ticket) || !tags_valid() {
            return;
        }
        let weight = u32::try_from(key.len() + encoded + ENTRY_OVERHEAD).unwrap_or(u32::MAX);
        if u64::from(weight) > self.capacity {
            return;
        }
        self.copies.insert(
            key.to_owned(),
            Copy {
                value: Arc::new(value),
                weight,
                epoch: ticket.epoch,
                primaries: ticket.primaries,
                expires_at: now() + ttl.min(LONGEST_COPY),
                tags: tags.cloned(),
            },
        );
        // Looked at after the insert: see the module docs.
        if !self.valid(ticket) || !tags_valid() {
            self.copies.invalidate(key);
        }
    }

    fn valid(&self, ticket: Ticket) -> bool {
        self.buckets[ticket.bucket].load(Ordering::SeqCst) == ticket.invalidations
            && self.epoch.load(Ordering::SeqCst) == ticket.epoch
    }

    /// `key` changed: its copy goes, and fills of its bucket in flight are
    /// refused.
    pub(crate) fn invalidate(&self, key: &[u8]) {
        let bucket = self.bucket_of(key);
        self.buckets[bucket].fetch_add(1, Ordering::SeqCst);
        let Ok(key) = std::str::from_utf8(key) else {
            // Not a key of this cache (its keys are ASCII).
            return;
        };
        if self.copies.remove(key).is_some() {
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
        // Its ticket moved already; this frees the memory.
        self.tokens.remove(key);
    }

    /// Every copy goes, and every fill in flight is refused: the tracking
    /// connection was lost (a read still on it fails: it is closed, or no
    /// longer handed out), or the server dropped every key (`FLUSHDB`).
    pub(crate) fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.copies.invalidate_all();
        self.tokens.clear();
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Sizes and counts, with moka's pending bookkeeping done first.
    pub(crate) fn stats(&self) -> LocalStats {
        self.copies.run_pending_tasks();
        LocalStats {
            entries: self.copies.entry_count(),
            bytes: self.copies.weighted_size(),
            capacity: self.capacity,
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
        }
    }

    /// By the key's bytes, so that a key named by the server (bytes) and
    /// one of ours (`str`, which hashes differently) agree.
    fn bucket_of(&self, key: &[u8]) -> usize {
        let mut hasher = self.hasher.build_hasher();
        hasher.write(key);
        (hasher.finish() as usize) % BUCKETS
    }
}
