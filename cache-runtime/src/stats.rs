//! Hit/miss accounting, per annotated function and in total.
//!
//! Every counter is declared once, in the `counters!` list below: the event
//! that bumps it, its field in [`Counts`] and its documentation.
//!
//! Each cached call that gets as far as choosing how to answer records
//! exactly one *outcome*: `hits`, `stale_hits`, `coalesced` (answered
//! without running the body), or `misses`, `refreshes`, `bypasses`,
//! `skipped` (ran the body). The outcome is recorded just before the body
//! starts, so a call cancelled later still counts, and [`Counts::body_runs`]
//! is the number of body runs the cache started.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// The next [`Function::id`]; ids start at 1 so that 0 can mean "not yet".
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
/// Function names by id, and whether each is a write function, for
/// statistics.
static NAMES: Mutex<Vec<(&'static str, bool)>> = Mutex::new(Vec::new());

/// An annotated function (`#[redis_cached]`, `#[invalidates]`,
/// `#[cache_put]`) as statistics know it: its path and a small id.
#[doc(hidden)]
#[derive(Debug)]
pub struct Function {
    name: &'static str,
    /// `#[invalidates]` / `#[cache_put]`: its counters are
    /// [`Stats::writers`](crate::Stats::writers), not lookups.
    writer: bool,
    /// A small number unique to this function in the process, assigned on
    /// first use: where its counters are, without a map lookup per call.
    id: AtomicU32,
    /// Its `metrics` counters by event, registered on first use.
    #[cfg(feature = "metrics")]
    pub(crate) metrics: crate::stats::MetricHandles,
}

impl Function {
    /// A cached function's, made by generated code: `module::path::fn_name`
    /// (`module::Type::method`, `module::<Type as Trait>::method`).
    pub const fn new(name: &'static str) -> Self {
        Function {
            name,
            writer: false,
            id: AtomicU32::new(0),
            #[cfg(feature = "metrics")]
            metrics: crate::stats::MetricHandles::new(),
        }
    }

    /// A write function's (`#[invalidates]`, `#[cache_put]`).
    pub const fn writer(name: &'static str) -> Self {
        Function {
            name,
            writer: true,
            id: AtomicU32::new(0),
            #[cfg(feature = "metrics")]
            metrics: crate::stats::MetricHandles::new(),
        }
    }

    /// `module::path::fn_name`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// This function's id: 1, 2, ... in the order functions are first used.
    #[inline]
    pub(crate) fn id(&self) -> u32 {
        match self.id.load(Ordering::Relaxed) {
            0 => self.assign_id(),
            id => id,
        }
    }

    #[cold]
    fn assign_id(&self) -> u32 {
        // Under the lock, so that ids and names stay in step.
        let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
        let id = self.id.load(Ordering::Relaxed);
        if id != 0 {
            return id;
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        names.resize(id as usize + 1, ("", false));
        names[id as usize] = (self.name, self.writer);
        self.id.store(id, Ordering::Relaxed);
        id
    }

    /// The name of the function with id `id`, and whether it is a write
    /// function.
    pub(crate) fn name_of(id: u32) -> (&'static str, bool) {
        NAMES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id as usize)
            .copied()
            .unwrap_or(("", false))
    }
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $event:ident => $field:ident, )*) => {
        /// What happened on one cache operation.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Event { $($event),* }

        const EVENTS: usize = [$(Event::$event),*].len();

        /// Counters of one function, or of the whole cache.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Counts { $( $(#[doc = $doc])* pub $field: u64, )* }

        impl Counts {
            fn load(slots: &Slots) -> Counts {
                Counts { $( $field: slots[Event::$event as usize].load(Ordering::Relaxed), )* }
            }

            /// The sum of a counter set's stripes.
            fn load_striped(striped: &Striped) -> Counts {
                let mut counts = Counts::default();
                for stripe in striped {
                    counts.add(&Counts::load(&stripe.0));
                }
                counts
            }

            fn add(&mut self, other: &Counts) {
                $( self.$field += other.$field; )*
            }
        }
    };
}

counters! {
    /// Calls answered from the cache.
    Hit => hits,
    /// Calls answered from the local tier (`local = "..."`), without
    /// Redis; not counted in `hits`.
    LocalHit => local_hits,
    /// Calls that ran the body because the key was absent, undecodable or
    /// leased by another caller.
    Miss => misses,
    /// Calls answered with a value past its TTL (inside the `stale` window,
    /// or the grace of an early refresh) while another caller refreshed it.
    StaleHit => stale_hits,
    /// Calls that waited for another caller's computation of the same key
    /// (`single_flight`) and were given its value.
    Coalesced => coalesced,
    /// Calls that recomputed a value that was still served to others: stale
    /// (`stale`) or drawn early (`early_refresh`); and calls made inside
    /// [`refresh`](crate::refresh) that ran the body.
    Refresh => refreshes,
    /// Calls that ran the body without the cache: the circuit breaker was
    /// open, or the cache could not be reached.
    Bypass => bypasses,
    /// Calls made inside [`bypass`](crate::bypass): the body ran without
    /// the cache, as asked.
    Skipped => skipped,
    /// Calls whose cache operation failed: Redis errors, timeouts,
    /// undecodable values (a read shared by several calls counts for
    /// each). The call itself still succeeded (fail open).
    Error => errors,
    /// Calls answered with a value kept past its freshness by `fail_safe`,
    /// because the body failed (or failed a moment ago for the same key),
    /// or (`soft_timeout`) was slow. Not an outcome of its own: such a call
    /// also counts as the miss or stale hit it began as.
    FailSafe => fail_safe,
    /// Bodies left to finish in the background after `soft_timeout`
    /// answered their callers with an old value; each stores its value
    /// under the refresh lock it holds.
    BackgroundCompletion => background_completions,
    /// Values written to the cache. A miss's store is counted when its
    /// reply comes, which may be just after the call returned, as are
    /// its `dropped_sets` and `errors` ([`Cache::settled`](crate::Cache::settled)
    /// waits for them).
    Set => sets,
    /// Keys deleted by invalidation (`#[invalidates]`, `Cache::invalidate`).
    Invalidation => invalidations,
    /// Tags invalidated (`#[invalidates(tag = ...)]`,
    /// `Cache::invalidate_tag`); not counted in `invalidations`.
    TagInvalidation => tag_invalidations,
    /// Computed values that were not stored because a write invalidated the
    /// key while they were being computed: each one is a stale value that
    /// the lease kept out of the cache.
    DroppedSet => dropped_sets,
    /// Invalidations given up: refused by the server (an ACL without `DEL`),
    /// or still pending when the runtime running them shut down. The
    /// entries stay until their TTL.
    LostInvalidation => lost_invalidations,
    /// Reads made while waiting for another process's value
    /// (`single_flight = "distributed"`), bounded by the lease.
    LeasePoll => lease_polls,
    /// Computed values not stored because their encoding is larger than the
    /// cache's [`max_value_size`](crate::CacheBuilder::max_value_size).
    Oversized => oversized,
    /// Lease placeholders and refresh locks given back in the background
    /// because their holder was cancelled, or its command timed out and may
    /// still land.
    Compensation => compensations,
}

type Slots = [AtomicU64; EVENTS];

/// Stripes of each set of counters. A thread adds to its own stripe
/// (threads past the eighth share one), so that two cores serving calls of
/// one function do not fight over one cache line on every call; a snapshot
/// sums the stripes.
const STRIPES: usize = 8;

/// One stripe, alone on its cache lines (128 bytes: the pair of lines
/// that x86's adjacent-line prefetcher fetches together).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(Slots);

type Striped = [Stripe; STRIPES];

/// This thread's stripe, given out in turn to threads as they first record.
fn stripe() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}

/// A function's `metrics` counters, one per event, registered with the
/// installed recorder the first time the event happens (install the
/// exporter before the first cached call).
#[cfg(feature = "metrics")]
#[derive(Debug)]
pub(crate) struct MetricHandles {
    counters: [OnceLock<metrics::Counter>; EVENTS],
    duration: OnceLock<metrics::Histogram>,
}

#[cfg(feature = "metrics")]
impl MetricHandles {
    pub(crate) const fn new() -> Self {
        MetricHandles {
            counters: [const { OnceLock::new() }; EVENTS],
            duration: OnceLock::new(),
        }
    }

    /// A completed cached call of `function` took `seconds`.
    pub(crate) fn observe(&self, function: &'static Function, seconds: f64) {
        self.duration
            .get_or_init(|| {
                metrics::histogram!("cache_call_duration_seconds", "function" => function.name())
            })
            .record(seconds);
    }

    fn add(&self, function: &'static Function, event: Event, n: u64) {
        self.counters[event as usize]
            .get_or_init(|| {
                let (name, outcome) = event.metric();
                match outcome {
                    Some(outcome) => metrics::counter!(
                        name,
                        "function" => function.name(),
                        "outcome" => outcome
                    ),
                    None => metrics::counter!(name, "function" => function.name()),
                }
            })
            .increment(n);
    }
}

/// A Redis operation of the cache, timed for the
/// `cache_operation_duration_seconds{operation}` histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Get,
    GetWithTtl,
    GetMany,
    Set,
    SetIfAbsent,
    CompareAndSet,
    CompareAndDelete,
    CompareAndExpire,
    SetIfLonger,
    Delete,
    Scan,
    Unlink,
    Publish,
    Command,
    Pipeline,
}

impl Operation {
    #[cfg(feature = "metrics")]
    const ALL: usize = Operation::Pipeline as usize + 1;

    /// The `operation` label, documented in the guide's operations page.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::GetWithTtl => "get_with_ttl",
            Operation::GetMany => "get_many",
            Operation::Set => "set",
            Operation::SetIfAbsent => "set_if_absent",
            Operation::CompareAndSet => "compare_and_set",
            Operation::CompareAndDelete => "compare_and_delete",
            Operation::CompareAndExpire => "compare_and_expire",
            Operation::SetIfLonger => "set_if_longer",
            Operation::Delete => "delete",
            Operation::Scan => "scan",
            Operation::Unlink => "unlink",
            Operation::Publish => "publish",
            Operation::Command => "command",
            Operation::Pipeline => "pipeline",
        }
    }
}

/// Times one Redis operation from its start until it is dropped: when it
/// answered, failed, or was given up (the op timeout, or the caller's
/// future dropped), so timeouts show in the histogram's tail instead of
/// vanishing from it. Without the `metrics` feature it is empty and does
/// nothing.
#[derive(Debug)]
#[must_use = "the operation is timed until the timer is dropped"]
pub(crate) struct OperationTimer {
    #[cfg(feature = "metrics")]
    timing: Option<(Operation, std::time::Instant)>,
}

impl OperationTimer {
    /// Starts timing `operation`; `redis` is false for the in-process
    /// backend, whose operations are not Redis round trips.
    #[inline]
    pub(crate) fn start(operation: Operation, redis: bool) -> Self {
        #[cfg(not(feature = "metrics"))]
        {
            let _ = (operation, redis);
            OperationTimer {}
        }
        #[cfg(feature = "metrics")]
        OperationTimer {
            timing: redis.then(|| (operation, std::time::Instant::now())),
        }
    }
}

#[cfg(feature = "metrics")]
impl Drop for OperationTimer {
    fn drop(&mut self) {
        // Registered once per operation: the recorder's lookup is not paid
        // per command.
        static HISTOGRAMS: [OnceLock<metrics::Histogram>; Operation::ALL] =
            [const { OnceLock::new() }; Operation::ALL];
        if let Some((operation, started)) = self.timing {
            HISTOGRAMS[operation as usize]
                .get_or_init(|| {
                    metrics::histogram!(
                        "cache_operation_duration_seconds",
                        "operation" => operation.label()
                    )
                })
                .record(started.elapsed().as_secs_f64());
        }
    }
}

/// The local tier's size, to `metrics` (every second, from the tracking
/// connection's heartbeat).
#[cfg(feature = "metrics")]
pub(crate) fn export_local(local: &LocalStats) {
    metrics::gauge!("cache_local_bytes").set(local.bytes as f64);
    metrics::gauge!("cache_local_entries").set(local.entries as f64);
}

/// An event of no function (e.g. `Cache::invalidate`), to `metrics`.
#[cfg(feature = "metrics")]
fn export_unattributed(event: Event, n: u64) {
    let (name, outcome) = event.metric();
    match outcome {
        Some(outcome) => metrics::counter!(name, "outcome" => outcome).increment(n),
        None => metrics::counter!(name).increment(n),
    }
}

impl Event {
    /// The `metrics` counter this event bumps, and its `outcome` label for
    /// the calls' outcomes. Documented in the guide's operations page.
    #[cfg(feature = "metrics")]
    fn metric(self) -> (&'static str, Option<&'static str>) {
        // An answer on top of the call's outcome, not one of its own.
        if self == Event::FailSafe {
            return ("cache_fail_safe_total", None);
        }
        if let Some(outcome) = self.outcome() {
            return ("cache_calls_total", Some(outcome));
        }
        let name = match self {
            Event::Error => "cache_errors_total",
            Event::Set => "cache_sets_total",
            Event::Invalidation => "cache_invalidations_total",
            Event::TagInvalidation => "cache_tag_invalidations_total",
            Event::DroppedSet => "cache_dropped_sets_total",
            Event::LostInvalidation => "cache_lost_invalidations_total",
            Event::LeasePoll => "cache_lease_polls_total",
            Event::Oversized => "cache_oversized_total",
            Event::Compensation => "cache_compensations_total",
            Event::BackgroundCompletion => "cache_background_completions_total",
            _ => "cache_other_events_total",
        };
        (name, None)
    }

    /// The outcome a cached call's span reports (its `outcome` field),
    /// for the events that are one.
    pub(crate) fn outcome(self) -> Option<&'static str> {
        Some(match self {
            Event::Hit => "hit",
            Event::LocalHit => "local",
            Event::StaleHit => "stale",
            Event::Coalesced => "coalesced",
            Event::Miss => "miss",
            Event::Refresh => "refresh",
            Event::Bypass => "bypass",
            Event::Skipped => "skipped",
            Event::FailSafe => "fail_safe",
            _ => return None,
        })
    }
}

impl Counts {
    /// Share of lookups answered without running the body: `(hits +
    /// stale_hits + coalesced) / (that + misses + refreshes)`, or 0 when
    /// nothing was looked up. Bypasses, which never looked, are left out.
    pub fn hit_ratio(&self) -> f64 {
        let served = self.hits + self.local_hits + self.stale_hits + self.coalesced;
        let lookups = served + self.misses + self.refreshes;
        if lookups == 0 {
            0.0
        } else {
            served as f64 / lookups as f64
        }
    }

    /// Calls that recorded an outcome: every completed cached call, and
    /// cancelled ones that got as far as choosing how to answer.
    pub fn calls(&self) -> u64 {
        self.hits + self.local_hits + self.stale_hits + self.coalesced + self.body_runs()
    }

    /// Body runs the cache started: `misses + refreshes + bypasses +
    /// skipped`.
    pub fn body_runs(&self) -> u64 {
        self.misses + self.refreshes + self.bypasses + self.skipped
    }
}

/// The local tier's size and what dropped its copies, from
/// [`Cache::stats`](crate::Cache::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocalStats {
    /// Copies held.
    pub entries: u64,
    /// What they weigh: keys and encoded values, plus a fixed overhead per
    /// copy (see [`CacheBuilder::local_capacity`](crate::CacheBuilder::local_capacity)).
    pub bytes: u64,
    /// The bound on `bytes`.
    pub capacity: u64,
    /// Copies dropped because their key changed: an invalidation from the
    /// server, or a write of this process.
    pub invalidations: u64,
    /// Times every copy was dropped at once: the tracking connection was
    /// lost, the deployment failed over, or the database was flushed.
    pub flushes: u64,
}

/// A snapshot of a cache's counters, from [`Cache::stats`](crate::Cache::stats).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// All operations of the cache.
    pub total: Counts,
    /// Per cached function (`#[redis_cached]`), by its path
    /// (`my_crate::users::get_user`; a method as `my_crate::users::Repo::get_user`
    /// or `my_crate::users::<Repo as UserRepo>::get_user` when its impl
    /// block has `#[cached_impl]`).
    pub functions: BTreeMap<&'static str, Counts>,
    /// Per write function (`#[invalidates]`, `#[cache_put]`), by its path:
    /// the keys it deleted or stored, and the failures. Kept apart from
    /// [`functions`](Stats::functions), whose hit ratios they would skew.
    pub writers: BTreeMap<&'static str, Counts>,
    /// The local tier's size and invalidations (all zero without one).
    pub local: LocalStats,
    /// What the servers report of themselves.
    pub server: ServerStats,
    /// Write-behind, by queue name (empty without write-behind).
    pub write_behind: BTreeMap<&'static str, QueueStats>,
}

/// The counters of one write-behind queue in this process: its writes,
/// and what its flusher did. `pending` and `oldest_pending_ms` are the
/// last reading of the whole queue (every process's changes), taken
/// every few seconds by a running flusher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Changes queued by this process's writes.
    pub queued: u64,
    /// Changes flushed (each change a flush saw; one coalesced into a
    /// later change of its key counts too).
    pub flushed: u64,
    /// Flush calls that returned `Ok`.
    pub batches: u64,
    /// The time they took, in all, in milliseconds.
    pub flush_millis: u64,
    /// Flush calls that failed (an error, or the flush timeout), each
    /// retried later.
    pub retries: u64,
    /// Changes moved to the dead-letter stream.
    pub dead_letters: u64,
    /// Changes not flushed yet, at the last reading.
    pub pending: u64,
    /// The age of the oldest of them, in milliseconds, at the last reading.
    pub oldest_pending_ms: u64,
}

/// What the cache counts of its servers' own reports (`INFO`), read when
/// it connects, every 10 s after, and on each
/// [`Cache::server_reports`](crate::Cache::server_reports). All zero on
/// the in-process backend and where `INFO` is refused (an ACL user
/// without `+info`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Keys the servers evicted (`maxmemory`) since this cache first read
    /// their `INFO`: every key of each server, not only this cache's
    /// (Redis does not say whose keys it evicts). A server that restarted
    /// or a new primary after a failover starts a new count from its own
    /// figure, so evictions between two readings of a server that
    /// restarted are not counted.
    pub evicted_keys: u64,
}

impl Stats {
    /// The counters of one function (cached or write), by its full path
    /// or by its last segments (`"get_user"` and `"Repo::get_user"` match
    /// `my_crate::users::Repo::get_user`).
    pub fn function(&self, name: &str) -> Option<Counts> {
        let mut found: Option<Counts> = None;
        for (path, counts) in self.functions.iter().chain(&self.writers) {
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

/// Functions per chunk of the per-function table (16 KiB of counters), and
/// chunks: counters for the first 4096 annotated functions of a process.
/// Events of any later ones still count in the total.
const CHUNK: usize = 16;
const CHUNKS: usize = 256;

/// The counters of one `Cache`. The hot path is one atomic add on this
/// thread's stripe of the function's counter, found by its id without a
/// lock; the total is summed when a snapshot is taken.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// Events of no function (e.g. `Cache::invalidate`), or of one past the
    /// table.
    unattributed: Striped,
    /// By function id: chunk `id / CHUNK`, slot `id % CHUNK`.
    functions: [OnceLock<Box<[Striped]>>; CHUNKS],
    /// The last `evicted_keys` of each server (by address, `""` for the
    /// one server off a cluster), with its `run_id`.
    evicted_seen: Mutex<BTreeMap<String, (String, u64)>>,
    /// [`ServerStats::evicted_keys`].
    evicted: AtomicU64,
    /// [`Stats::write_behind`].
    queues: Mutex<BTreeMap<&'static str, QueueStats>>,
}

/// What happened to a write-behind queue, for [`Recorder::note_queue`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum QueueEvent {
    Queued,
    /// A flush returned `Ok`: how many changes it covered, and how long it took.
    Flushed(usize, std::time::Duration),
    Retried,
    DeadLettered,
    /// A reading of the queue: pending changes, the oldest one's age (ms).
    Depth(u64, u64),
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            unattributed: Default::default(),
            functions: std::array::from_fn(|_| OnceLock::new()),
            evicted_seen: Mutex::default(),
            evicted: AtomicU64::new(0),
            queues: Mutex::default(),
        }
    }
}

impl Recorder {
    /// A server's `evicted_keys`, read now: what it grew by since the last
    /// reading of the same server process is counted (see
    /// [`ServerStats::evicted_keys`]).
    pub(crate) fn note_evicted_keys(&self, address: &str, run_id: &str, evicted_keys: u64) {
        let mut seen = self
            .evicted_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Two readings may be noted out of order: the count of one server
        // process only grows, so the larger is the later.
        let (grown, last) = match seen.get(address) {
            Some((run, last)) if run == run_id => {
                (evicted_keys.saturating_sub(*last), evicted_keys.max(*last))
            }
            _ => (0, evicted_keys),
        };
        seen.insert(address.to_owned(), (run_id.to_owned(), last));
        drop(seen);
        if grown > 0 {
            self.evicted.fetch_add(grown, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!("cache_server_evicted_keys_total").increment(grown);
        }
    }
}

impl Recorder {
    /// Counts what happened to the write-behind queue `queue` (and
    /// reports it to the `metrics` facade, labelled by queue).
    pub(crate) fn note_queue(&self, queue: &'static str, event: QueueEvent) {
        {
            let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
            let stats = queues.entry(queue).or_default();
            match event {
                QueueEvent::Queued => stats.queued += 1,
                QueueEvent::Flushed(n, took) => {
                    stats.batches += 1;
                    stats.flush_millis += u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    stats.flushed += n as u64;
                }
                QueueEvent::Retried => stats.retries += 1,
                QueueEvent::DeadLettered => stats.dead_letters += 1,
                QueueEvent::Depth(pending, oldest) => {
                    stats.pending = pending;
                    stats.oldest_pending_ms = oldest;
                }
            }
        }
        #[cfg(feature = "metrics")]
        match event {
            QueueEvent::Queued => {
                metrics::counter!("cache_write_behind_queued_total", "queue" => queue).increment(1);
            }
            QueueEvent::Flushed(n, took) => {
                metrics::counter!("cache_write_behind_flushed_total", "queue" => queue)
                    .increment(n as u64);
                metrics::histogram!("cache_write_behind_batch_size", "queue" => queue)
                    .record(n as f64);
                metrics::histogram!("cache_write_behind_flush_seconds", "queue" => queue)
                    .record(took.as_secs_f64());
            }
            QueueEvent::Retried => {
                metrics::counter!("cache_write_behind_retries_total", "queue" => queue)
                    .increment(1);
            }
            QueueEvent::DeadLettered => {
                metrics::counter!("cache_write_behind_dead_letters_total", "queue" => queue)
                    .increment(1);
            }
            QueueEvent::Depth(pending, oldest) => {
                metrics::gauge!("cache_write_behind_pending", "queue" => queue).set(pending as f64);
                metrics::gauge!("cache_write_behind_oldest_pending_seconds", "queue" => queue)
                    .set(oldest as f64 / 1000.0);
            }
        }
    }

    pub(crate) fn record(&self, function: Option<&'static Function>, event: Event) {
        self.record_n(function, event, 1);
    }

    pub(crate) fn record_n(&self, function: Option<&'static Function>, event: Event, n: usize) {
        let slots = function.and_then(|function| {
            let id = function.id() as usize;
            let chunk = self.functions.get(id / CHUNK)?;
            let chunk = chunk.get_or_init(|| (0..CHUNK).map(|_| Striped::default()).collect());
            Some(&chunk[id % CHUNK])
        });
        slots.unwrap_or(&self.unattributed)[stripe()].0[event as usize]
            .fetch_add(n as u64, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        match function {
            Some(function) => function.metrics.add(function, event, n as u64),
            None => export_unattributed(event, n as u64),
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let mut total = Counts::load_striped(&self.unattributed);
        let mut functions: BTreeMap<&'static str, Counts> = BTreeMap::new();
        let mut writers: BTreeMap<&'static str, Counts> = BTreeMap::new();
        for (c, chunk) in self.functions.iter().enumerate() {
            let Some(chunk) = chunk.get() else { continue };
            for (slot, slots) in chunk.iter().enumerate() {
                let counts = Counts::load_striped(slots);
                if counts == Counts::default() {
                    continue;
                }
                total.add(&counts);
                let (name, writer) = Function::name_of((c * CHUNK + slot) as u32);
                let by_name = if writer { &mut writers } else { &mut functions };
                by_name.entry(name).or_default().add(&counts);
            }
        }
        Stats {
            total,
            functions,
            writers,
            local: LocalStats::default(),
            server: ServerStats {
                evicted_keys: self.evicted.load(Ordering::Relaxed),
            },
            write_behind: self
                .queues
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_lands_in_its_own_field() {
        static F: Function = Function::new("stats::f");
        let recorder = Recorder::default();
        recorder.record(Some(&F), Event::Hit);
        recorder.record_n(Some(&F), Event::Miss, 2);
        recorder.record(None, Event::Invalidation);
        let stats = recorder.snapshot();
        let f = stats.function("f").unwrap();
        assert_eq!((f.hits, f.misses, f.invalidations), (1, 2, 0));
        assert_eq!(stats.total.invalidations, 1);
        assert_eq!((f.calls(), f.body_runs()), (3, 2));
        assert!((f.hit_ratio() - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn threads_record_on_their_own_stripes_and_a_snapshot_sums_them() {
        static F: Function = Function::new("stats::striped");
        let recorder = Recorder::default();
        std::thread::scope(|scope| {
            for _ in 0..2 * STRIPES {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        recorder.record(Some(&F), Event::Hit);
                    }
                });
            }
        });
        let hits = recorder.snapshot().function("striped").unwrap().hits;
        assert_eq!(hits, 2 * STRIPES as u64 * 1000);
        let id = F.id() as usize;
        let stripes = &recorder.functions[id / CHUNK].get().unwrap()[id % CHUNK];
        let used = stripes
            .iter()
            .filter(|s| s.0[Event::Hit as usize].load(Ordering::Relaxed) > 0);
        assert!(used.count() > 1, "every thread recorded on one stripe");
    }
}
