//! Hit/miss accounting, per annotated function and in total.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::site::Site;

/// What happened on one cache operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Hit,
    Miss,
    Error,
    Bypass,
    Set,
    Invalidation,
    DroppedSet,
    LostInvalidation,
    StaleHit,
    Coalesced,
    Refresh,
    LeasePoll,
    Oversized,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    stale_hits: AtomicU64,
    coalesced: AtomicU64,
    errors: AtomicU64,
    bypasses: AtomicU64,
    sets: AtomicU64,
    invalidations: AtomicU64,
    dropped_sets: AtomicU64,
    lost_invalidations: AtomicU64,
    refreshes: AtomicU64,
    lease_polls: AtomicU64,
    oversized: AtomicU64,
}

impl Counters {
    fn bump(&self, event: Event, n: u64) {
        let counter = match event {
            Event::Hit => &self.hits,
            Event::Miss => &self.misses,
            Event::Error => &self.errors,
            Event::Bypass => &self.bypasses,
            Event::Set => &self.sets,
            Event::Invalidation => &self.invalidations,
            Event::DroppedSet => &self.dropped_sets,
            Event::LostInvalidation => &self.lost_invalidations,
            Event::StaleHit => &self.stale_hits,
            Event::Coalesced => &self.coalesced,
            Event::Refresh => &self.refreshes,
            Event::LeasePoll => &self.lease_polls,
            Event::Oversized => &self.oversized,
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            hits: load(&self.hits),
            misses: load(&self.misses),
            stale_hits: load(&self.stale_hits),
            coalesced: load(&self.coalesced),
            errors: load(&self.errors),
            bypasses: load(&self.bypasses),
            sets: load(&self.sets),
            invalidations: load(&self.invalidations),
            dropped_sets: load(&self.dropped_sets),
            lost_invalidations: load(&self.lost_invalidations),
            refreshes: load(&self.refreshes),
            lease_polls: load(&self.lease_polls),
            oversized: load(&self.oversized),
        }
    }
}

/// Counters of one function, or of the whole cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// Calls answered from the cache.
    pub hits: u64,
    /// Calls that ran the body because the key was absent (or undecodable).
    pub misses: u64,
    /// Calls answered with a value past its TTL (inside the `stale` window)
    /// while another caller refreshed it.
    pub stale_hits: u64,
    /// Calls that waited for another caller's computation of the same key
    /// (`single_flight`) and were given its value.
    pub coalesced: u64,
    /// Failed cache operations: Redis errors, timeouts, undecodable values.
    /// The call itself still succeeded (fail open).
    pub errors: u64,
    /// Calls that skipped the cache: circuit breaker open, or not connected.
    pub bypasses: u64,
    /// Values written to the cache.
    pub sets: u64,
    /// Keys deleted by invalidation (`#[invalidates]`, `Cache::invalidate`),
    /// and values replaced by `#[cache_put]`.
    pub invalidations: u64,
    /// Computed values that were not stored because a write invalidated the
    /// key while they were being computed: each one is a stale value that
    /// the lease kept out of the cache.
    pub dropped_sets: u64,
    /// Invalidations given up after their retries failed (cache down): the
    /// entries stay until their TTL.
    pub lost_invalidations: u64,
    /// Recomputations of a value that was still served: stale (`stale`) or
    /// drawn early (`early_refresh`).
    pub refreshes: u64,
    /// Reads made while waiting for another process's value
    /// (`single_flight = "distributed"`), bounded by the lease.
    pub lease_polls: u64,
    /// Computed values not stored because their encoding is larger than the
    /// cache's [`max_value_size`](crate::CacheBuilder::max_value_size).
    pub oversized: u64,
}

impl Counts {
    /// Share of calls answered without running the body: `(hits +
    /// stale_hits + coalesced) / (that + misses)`, or 0 when nothing was
    /// looked up.
    pub fn hit_ratio(&self) -> f64 {
        let served = self.hits + self.stale_hits + self.coalesced;
        let lookups = served + self.misses;
        if lookups == 0 {
            0.0
        } else {
            served as f64 / lookups as f64
        }
    }

    fn add(&mut self, other: &Counts) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.stale_hits += other.stale_hits;
        self.coalesced += other.coalesced;
        self.errors += other.errors;
        self.bypasses += other.bypasses;
        self.sets += other.sets;
        self.invalidations += other.invalidations;
        self.dropped_sets += other.dropped_sets;
        self.lost_invalidations += other.lost_invalidations;
        self.refreshes += other.refreshes;
        self.lease_polls += other.lease_polls;
        self.oversized += other.oversized;
    }
}

/// A snapshot of a cache's counters, from [`Cache::stats`](crate::Cache::stats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// All operations of the cache.
    pub total: Counts,
    /// Per annotated function, by its path (`my_crate::users::get_user`).
    pub functions: BTreeMap<&'static str, Counts>,
}

impl Stats {
    /// The counters of one function, by its full path or by its name alone
    /// (`"get_user"` matches `my_crate::users::get_user`).
    pub fn function(&self, name: &str) -> Option<Counts> {
        let mut found: Option<Counts> = None;
        for (path, counts) in &self.functions {
            let by_name = path
                .strip_suffix(name)
                .is_some_and(|rest| rest.ends_with("::"));
            if *path == name || by_name {
                found.get_or_insert_with(Counts::default).add(counts);
            }
        }
        found
    }

    /// Total hit ratio.
    pub fn hit_ratio(&self) -> f64 {
        self.total.hit_ratio()
    }
}

/// Sites per chunk of the per-function table, and chunks: counters for the
/// first 4096 annotated functions of a process. Events of any later ones
/// still count in the total.
const CHUNK: usize = 64;
const CHUNKS: usize = 64;

/// The counters of one `Cache`. The hot path is one atomic add on the
/// function's counter, found by its site id without a lock; the total is
/// summed when a snapshot is taken.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Events of no function (e.g. `Cache::invalidate`), or of one past the
    /// table.
    unattributed: Counters,
    /// By site id: chunk `id / CHUNK`, slot `id % CHUNK`.
    sites: [OnceLock<Box<[Counters]>>; CHUNKS],
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            unattributed: Counters::default(),
            sites: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl Recorder {
    pub(crate) fn record(&self, site: Option<&'static Site>, event: Event) {
        self.record_n(site, event, 1);
    }

    pub(crate) fn record_n(&self, site: Option<&'static Site>, event: Event, n: usize) {
        let n = n as u64;
        let counters = site.and_then(|site| {
            let id = site.id() as usize;
            let chunk = self.sites.get(id / CHUNK)?;
            let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| Counters::default()).collect());
            Some(&chunk[id % CHUNK])
        });
        counters.unwrap_or(&self.unattributed).bump(event, n);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let mut total = self.unattributed.snapshot();
        let mut functions: BTreeMap<&'static str, Counts> = BTreeMap::new();
        for (c, chunk) in self.sites.iter().enumerate() {
            let Some(chunk) = chunk.get() else { continue };
            for (slot, counters) in chunk.iter().enumerate() {
                let counts = counters.snapshot();
                if counts == Counts::default() {
                    continue;
                }
                total.add(&counts);
                let name = Site::name_of((c * CHUNK + slot) as u32);
                functions.entry(name).or_default().add(&counts);
            }
        }
        Stats { total, functions }
    }
}
