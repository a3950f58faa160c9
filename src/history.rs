//! Histories of reads and writes, and a read-your-writes checker (the idea
//! of Jepsen's Knossos, for one simple model): record when each operation
//! started and ended and which version of a row it saw or wrote, then check
//! that **a read that started after a write had completed returned a version
//! at least as new as that write's**.
//!
//! Times are wall-clock nanoseconds, so that histories recorded by several
//! processes on one machine can be merged.
//!
//! ```
//! use cache_harness::history::{Op, Event, read_your_writes};
//! let events = [
//!     Event { op: Op::Write, row: 1, start: 0, end: 10, version: 2 },
//!     Event { op: Op::Read, row: 1, start: 20, end: 30, version: 1 }, // stale
//! ];
//! assert_eq!(read_your_writes(&events).stale_reads, 1);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Read a row (through a cached function); `version` is what it returned.
    Read,
    /// Wrote a row; `version` is the version it committed.
    Write,
}

/// One completed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Read or write.
    pub op: Op,
    /// Which row.
    pub row: u64,
    /// When it was called, in ns since the epoch.
    pub start: u128,
    /// When it returned.
    pub end: u128,
    /// The version read or written.
    pub version: u64,
}

/// How long a test's load runs: `var` seconds from the environment (so a
/// long run can be asked for), or `default` seconds.
pub fn seconds_from_env(var: &str, default: u64) -> Duration {
    let seconds = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Duration::from_secs(seconds)
}

/// Now, in ns since the epoch.
pub fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A history being recorded by concurrent tasks.
#[derive(Debug, Default)]
pub struct History {
    events: Mutex<Vec<Event>>,
}

impl History {
    /// Records a completed operation.
    pub fn record(&self, op: Op, row: u64, start: u128, version: u64) {
        self.record_event(Event {
            op,
            row,
            start,
            end: now(),
            version,
        });
    }

    /// Records an event completed elsewhere (merging histories).
    pub fn record_event(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The histories of a load: one per read arm (cached function), and the
/// writes under [`WRITES`].
pub type Histories = BTreeMap<&'static str, History>;

/// The arm of [`Histories`] that holds the writes.
pub const WRITES: &str = "write";

/// Empty histories for `arms` and the writes.
pub fn histories(arms: &[&'static str]) -> Histories {
    arms.iter()
        .chain(&[WRITES])
        .map(|arm| (*arm, History::default()))
        .collect()
}

/// Runs one operation of `arm` on `row`, as a service with a request
/// `timeout` would, and records the version it returned (a write when `arm`
/// is [`WRITES`]). `false` when it failed or ran past the timeout.
pub async fn run_recorded<E>(
    histories: &Histories,
    arm: &'static str,
    row: u64,
    timeout: Duration,
    operation: impl Future<Output = Result<u64, E>>,
) -> bool {
    let start = now();
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(version)) => {
            let op = if arm == WRITES { Op::Write } else { Op::Read };
            histories[arm].record(op, row, start, version);
            true
        }
        _ => false,
    }
}

/// Checks each read arm's history together with the writes; prints one
/// line for `phase` (and examples of stale reads) and returns the stale
/// reads in all.
pub fn check_arms(phase: &str, histories: &Histories, arms: &[&str]) -> usize {
    let writes = histories[WRITES].events();
    let mut stale = 0;
    let mut line = format!("{phase}: {} writes;", writes.len());
    for arm in arms {
        let mut events = writes.clone();
        events.extend(histories[arm].events());
        let verdict = read_your_writes(&events);
        line.push_str(&format!(
            " {arm} {} stale of {};",
            verdict.stale_reads, verdict.reads
        ));
        if verdict.stale_reads > 0 {
            println!("{phase}: {arm} stale, e.g. {:?}", verdict.examples);
        }
        stale += verdict.stale_reads;
    }
    println!("{line}");
    stale
}

/// Reads every row through every arm at rest (no load running) and
/// compares it with `truth(row)`; prints each difference for `phase` and
/// returns how many there were.
pub async fn stale_at_rest(
    phase: &str,
    rows: u64,
    arms: &[&'static str],
    truth: impl Fn(u64) -> u64,
    read: impl AsyncFn(&'static str, u64) -> u64,
) -> usize {
    let mut stale = 0;
    for row in 0..rows {
        let truth = truth(row);
        for &arm in arms {
            let seen = read(arm, row).await;
            if seen != truth {
                stale += 1;
                println!("{phase}: at rest, {arm}({row}) = {seen}, database {truth}");
            }
        }
    }
    stale
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Reads checked.
    pub reads: usize,
    /// Writes in the history.
    pub writes: usize,
    /// Reads that returned a version older than a write completed before
    /// they started.
    pub stale_reads: usize,
    /// A few of them: the read, and the newest write it should have seen.
    pub examples: Vec<(Event, Event)>,
    /// The longest a stale read started after the first write it missed
    /// had completed, in ns (0 without stale reads): how late the read
    /// was, e.g. the delivery time of an invalidation to a local tier.
    pub max_lag_ns: u128,
}

/// Checks read-your-writes over a whole history; see the module docs.
pub fn read_your_writes(events: &[Event]) -> Verdict {
    // Per row: writes by completion time, with the newest version
    // completed so far.
    let mut writes: HashMap<u64, Vec<&Event>> = HashMap::new();
    for event in events.iter().filter(|e| e.op == Op::Write) {
        writes.entry(event.row).or_default().push(event);
    }
    let mut newest: HashMap<u64, Vec<(u128, &Event)>> = HashMap::new();
    for (row, mut list) in writes {
        list.sort_by_key(|w| w.end);
        let mut best: Option<&Event> = None;
        let running = list
            .into_iter()
            .map(|w| {
                if best.is_none_or(|b| w.version > b.version) {
                    best = Some(w);
                }
                (w.end, best.unwrap_or(w))
            })
            .collect();
        newest.insert(row, running);
    }
    let mut verdict = Verdict {
        writes: events.iter().filter(|e| e.op == Op::Write).count(),
        ..Verdict::default()
    };
    for read in events.iter().filter(|e| e.op == Op::Read) {
        verdict.reads += 1;
        let Some(completed) = newest.get(&read.row) else {
            continue;
        };
        // Writes that completed strictly before the read started.
        let before = completed.partition_point(|(end, _)| *end < read.start);
        if let Some((_, write)) = before.checked_sub(1).map(|i| completed[i])
            && read.version < write.version
        {
            verdict.stale_reads += 1;
            // The running newest versions grow: the first write the read
            // missed is the first whose newest is past what it read.
            let missed = completed.partition_point(|(_, w)| w.version <= read.version);
            let lag = read.start.saturating_sub(completed[missed].0);
            verdict.max_lag_ns = verdict.max_lag_ns.max(lag);
            if verdict.examples.len() < 5 {
                verdict.examples.push((read.clone(), write.clone()));
            }
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: Op, start: u128, end: u128, version: u64) -> Event {
        Event {
            op,
            row: 1,
            start,
            end,
            version,
        }
    }

    #[test]
    fn concurrent_reads_may_see_either_version_later_ones_must_see_the_write() {
        let events = [
            event(Op::Write, 10, 20, 2),
            event(Op::Read, 5, 25, 1), // overlaps the write: either is fine
            event(Op::Read, 15, 30, 1), // started before it completed: fine
            event(Op::Read, 21, 30, 2), // after: sees it
            event(Op::Read, 22, 40, 1), // after: stale
            event(Op::Write, 30, 35, 3),
            event(Op::Read, 36, 40, 2), // stale again
        ];
        let verdict = read_your_writes(&events);
        assert_eq!(
            (verdict.reads, verdict.writes, verdict.stale_reads),
            (5, 2, 2)
        );
    }

    #[test]
    fn an_older_write_completing_late_does_not_lower_the_bar() {
        let events = [
            event(Op::Write, 0, 10, 3),
            event(Op::Write, 0, 12, 2),
            event(Op::Read, 15, 16, 2),
        ];
        assert_eq!(read_your_writes(&events).stale_reads, 1);
    }
}
