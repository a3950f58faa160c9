//! The in-process backend: moka with a per-entry TTL, for tests and for
//! services without Redis. Same semantics as Redis: a value expires after
//! its TTL, a set replaces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

#[derive(Clone)]
struct Entry {
    bytes: Arc<[u8]>,
    ttl: Duration,
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
        MemoryBackend { entries }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.entries.get(key).map(|e| e.bytes.to_vec())
    }

    // Every write goes through `and_compute_with`, moka's per-key lock, so
    // that a compare-and-set and a delete of one key never interleave (plain
    // `insert` and `remove` do not take that lock).

    pub(crate) fn set(&self, key: &str, value: Vec<u8>, ttl_millis: u64) {
        self.compute(key, |_| Op::Put(Entry::new(value, ttl_millis)));
    }

    /// Like `SET NX PX`; an expired entry counts as absent.
    pub(crate) fn set_if_absent(&self, key: &str, value: Vec<u8>, ttl_millis: u64) -> bool {
        let outcome = self.compute(key, |current| match current {
            None => Op::Put(Entry::new(value, ttl_millis)),
            Some(_) => Op::Nop,
        });
        matches!(outcome, CompResult::Inserted(_))
    }

    /// Replaces the value only if it starts with `expected`.
    pub(crate) fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        value: Vec<u8>,
        ttl_millis: u64,
    ) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if *current.bytes == *expected => Op::Put(Entry::new(value, ttl_millis)),
            _ => Op::Nop,
        });
        matches!(outcome, CompResult::ReplacedWith(_))
    }

    /// Removes the key only if it holds `expected`.
    pub(crate) fn compare_and_delete(&self, key: &str, expected: &[u8]) -> bool {
        let outcome = self.compute(key, |current| match current {
            Some(current) if *current.bytes == *expected => Op::Remove,
            _ => Op::Nop,
        });
        matches!(outcome, CompResult::Removed(_))
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

    fn compute(
        &self,
        key: &str,
        decide: impl FnOnce(Option<&Entry>) -> Op<Entry>,
    ) -> CompResult<String, Entry> {
        self.entries
            .entry_by_ref(key)
            .and_compute_with(|current| decide(current.as_ref().map(moka::Entry::value)))
    }
}

impl Entry {
    fn new(bytes: Vec<u8>, ttl_millis: u64) -> Entry {
        Entry {
            bytes: bytes.into(),
            ttl: Duration::from_millis(ttl_millis),
        }
    }
}
