//! The in-process backend: moka with a per-entry TTL, for tests and for
//! services without Redis. It follows the backend contract (see
//! [`crate::backend`]) exactly, compare operations included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

use super::{Fetched, Stored};
use crate::clock::millis;

#[derive(Clone)]
struct Entry {
    bytes: Arc<[u8]>,
    ttl: Duration,
    expires_at: Instant,
}

struct PerEntryTtl;

impl Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _key: &String, value: &Entry, _now: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        _now: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

pub(crate) struct MemoryBackend {
    entries: moka::sync::Cache<String, Entry>,
    /// Write-behind's streams and hashes (`behind::memory`).
    queues: std::sync::Mutex<Queues>,
}

/// Write-behind's queues on the in-process backend: streams by key, each
/// with its one consumer group's delivery state, and hashes (each key's
/// latest change). Only what write-behind uses of streams is here.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    pub(crate) streams: std::collections::HashMap<String, MemStream>,
    pub(crate) hashes: std::collections::HashMap<String, std::collections::HashMap<String, String>>,
    /// Shards' leases: holder and deadline (kept here, not among the
    /// entries, which the cache's capacity may evict).
    pub(crate) leases: std::collections::HashMap<String, (String, Instant)>,
}

/// A stream entry's fields, in order.
pub(crate) type Fields = Vec<(String, Vec<u8>)>;

/// A stream's entries (id: milliseconds and sequence) and its group's
/// state: the last id delivered, and those delivered and not acknowledged.
#[derive(Debug, Default)]
pub(crate) struct MemStream {
    pub(crate) last: (u64, u64),
    pub(crate) entries: std::collections::BTreeMap<(u64, u64), Fields>,
    pub(crate) delivered: (u64, u64),
    pub(crate) pending: std::collections::BTreeSet<(u64, u64)>,
}

impl MemStream {
    /// `XADD *`: an id after the last, from the wall clock.
    pub(crate) fn add(&mut self, fields: Fields) -> (u64, u64) {
        let now = millis(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let id = if now > self.last.0 {
            (now, 0)
        } else {
            (self.last.0, self.last.1 + 1)
        };
        self.entries.insert(id, fields);
        self.last = id;
        id
    }
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("entries", &self.entries.entry_count())
            .finish()
    }
}

impl MemoryBackend {
    /// `capacity_bytes` bounds the stored bytes (keys included); the least
    /// recently used entries are evicted past it.
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &String, entry: &Entry| {
                u32::try_from(key.len() + entry.bytes.len()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        MemoryBackend {
            entries,
            queues: std::sync::Mutex::default(),
        }
    }

    /// Write-behind's queues.
    pub(crate) fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A live entry: moka may hand out an entry in the instant it expires.
    fn live(&self, key: &str) -> Option<Entry> {
        self.entries
            .get(key)
            .filter(|e| e.expires_at > Instant::now())
    }

    /// The keys that start with `prefix`.
    pub(crate) fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .map(|(key, _)| String::clone(&key))
            .collect()
    }

    pub(crate) fn get(&self, key: &str, limit: usize) -> Fetched<Vec<u8>> {
        match self.live(key) {
            Some(e) if e.bytes.is_empty() => Fetched::Absent,
            Some(e) if e.bytes.len() > limit => Fetched::TooLarge,
            Some(e) => Fetched::Found(e.bytes.to_vec()),
            None => Fetched::Absent,
        }
    }

    pub(crate) fn get_with_ttl(&self, key: &str, limit: usize) -> Fetched<Stored> {
        match self.live(key) {
            Some(e) if e.bytes.len() > limit => Fetched::TooLarge,
            Some(e) => Fetched::Found(Stored {
                bytes: e.bytes.to_vec(),
                ttl_millis: Some(millis(
                    e.expires_at.saturating_duration_since(Instant::now()),
                )),
            }),
            None => Fetched::Absent,
        }
    }

    // Every write goes through `and_compute_with`, moka's per-key lock, so
    // that compare operations and deletes of one key never interleave (plain
    // `insert` and `remove` do not take that lock).

    pub(crate) fn set(&self, key: &str, value: &[u8], px: u64) {
        self.compute(key, |_| Op::Put(Entry::new(value.into(), px)));
    }

    pub(crate) fn set_if_absent(&self, key: &str, value: &[u8], px: u64) -> bool {
        let outcome = self.compute(key, |current| match current {
            None => Op::Put(Entry::new(value.into(), px)),
            Some(_) => Op::Nop,
        });
        put(&outcome)
    }

    pub(crate) fn compare_and_set(&self, key: &str, prefix: &[u8], value: &[u8], px: u64) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if current.bytes.starts_with(prefix) => {
                Op::Put(Entry::new(value.into(), px))
            }
            _ => Op::Nop,
        });
        put(&outcome)
    }

    pub(crate) fn compare_and_delete(&self, key: &str, prefix: &[u8]) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if current.bytes.starts_with(prefix) => Op::Remove,
            _ => Op::Nop,
        });
        matches!(outcome, CompResult::Removed(_))
    }

    pub(crate) fn compare_and_expire(&self, key: &str, prefix: &[u8], px: u64) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if current.bytes.starts_with(prefix) => {
                Op::Put(Entry::new(current.bytes.clone(), px))
            }
            _ => Op::Nop,
        });
        put(&outcome)
    }

    pub(crate) fn set_if_longer(&self, key: &str, limit: usize, value: &[u8], px: u64) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if current.bytes.len() > limit => Op::Put(Entry::new(value.into(), px)),
            _ => Op::Nop,
        });
        put(&outcome)
    }

    pub(crate) fn delete(&self, keys: &[String]) -> u64 {
        let removed = keys.iter().filter(|key| {
            matches!(
                self.compute(key, |current| match current {
                    Some(_) => Op::Remove,
                    None => Op::Nop,
                }),
                CompResult::Removed(_)
            )
        });
        removed.count() as u64
    }

    /// Runs `decide` on the live entry (an expired one counts as absent).
    fn compute(
        &self,
        key: &str,
        decide: impl FnOnce(Option<&Entry>) -> Op<Entry>,
    ) -> CompResult<String, Entry> {
        self.entries.entry_by_ref(key).and_compute_with(|current| {
            let live = current
                .as_ref()
                .map(moka::Entry::value)
                .filter(|e| e.expires_at > Instant::now());
            decide(live)
        })
    }
}

/// Whether a compute stored its `Op::Put` (moka reports a put over an
/// entry it still held, expired, as a replacement).
fn put(outcome: &CompResult<String, Entry>) -> bool {
    matches!(
        outcome,
        CompResult::Inserted(_) | CompResult::ReplacedWith(_)
    )
}

impl Entry {
    fn new(bytes: Arc<[u8]>, px: u64) -> Entry {
        let ttl = Duration::from_millis(px.max(1));
        Entry {
            bytes,
            ttl,
            expires_at: Instant::now() + ttl,
        }
    }
}
