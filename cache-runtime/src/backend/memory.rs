//! The in-process backend: moka with a per-entry TTL, for tests and for
//! services without Redis. Same semantics as Redis: a value expires after
//! its TTL, a set replaces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

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

    pub(crate) fn set(&self, key: &str, value: Vec<u8>, ttl_millis: u64) {
        let entry = Entry {
            bytes: value.into(),
            ttl: Duration::from_millis(ttl_millis),
        };
        self.entries.insert(key.to_owned(), entry);
    }

    pub(crate) fn delete(&self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }
}
