//! A circuit breaker, so that a dead or stalled Redis costs no timeout per
//! call: after `threshold` consecutive failures the cache is skipped for
//! `cooldown`; then one probe is let through, and its outcome closes or
//! re-opens the breaker.
//!
//! Failures are counted as independent events: when a connection drops,
//! every command in flight on it fails at the same moment (the `redis`
//! crate's cluster client replaces all its connections when it reconnects
//! to the seed nodes, the healthy primaries' too), and that is one
//! failure, not one per command. So a failure that is not a timeout counts
//! only if no other failure was counted since its operation started
//! ([`Breaker::failures_counted`] noted at the start). Timeouts count one
//! each: every one of them cost its caller the whole op timeout.
//!
//! The probe belongs to the breaker, not to the call that triggered it: it
//! runs in its own task (see `Cache::guarded`), so a caller dropped by a
//! request timeout cannot leave it pending. Should the probe itself end
//! without an outcome, its [`ProbeSlot`] gives the slot back on drop and the
//! next call probes.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive_failures: AtomicU32,
    /// Failures counted since the breaker was made; see the module docs.
    counted: AtomicU64,
    /// Milliseconds since `epoch()` until which the breaker is open; 0 = closed.
    open_until: AtomicU64,
    probing: AtomicBool,
    /// The Redis Cluster primary (`host:port`) this breaker is for; `None`
    /// for the whole backend (standalone, Sentinel) or for cluster keys
    /// whose primary is not known yet.
    node: Option<String>,
}

fn now_millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // +1 so that 0 can mean "closed".
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// What the breaker allows for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    /// Closed: call the cache.
    Call,
    /// Half-open: this call is the one probe.
    Probe,
    /// Open: skip the cache.
    Skip,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self::for_node((threshold, cooldown), None)
    }

    /// The breaker of one cluster primary.
    pub(crate) fn for_node((threshold, cooldown): (u32, Duration), node: Option<String>) -> Self {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            consecutive_failures: AtomicU32::new(0),
            counted: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            node,
        }
    }

    /// The cluster primary this breaker is for, if any.
    pub(crate) fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    pub(crate) fn permit(&self) -> Permit {
        let open_until = self.open_until.load(Ordering::Relaxed);
        if open_until == 0 {
            return Permit::Call;
        }
        if now_millis() < open_until {
            return Permit::Skip;
        }
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            Permit::Probe
        } else {
            Permit::Skip
        }
    }

    /// Whether the breaker is open or half-open (not closed).
    pub(crate) fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn record_success(&self) {
        // Plain stores only when something changes: the hot path stays read-only.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Relaxed);
            self.probing.store(false, Ordering::Release);
            match &self.node {
                Some(node) => {
                    tracing::info!(node, "cache node reachable again: circuit breaker closed");
                }
                None => tracing::info!("cache reachable again: circuit breaker closed"),
            }
        }
    }

    /// How many failures have been counted so far: noted when an operation
    /// starts, for [`Breaker::record_failure_of`].
    pub(crate) fn failures_counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// The failure of an operation that started when
    /// [`Breaker::failures_counted`] was `started`: not counted when it is
    /// not a timeout and another failure was counted meanwhile (both came
    /// from one broken connection). Returns true when it opened the
    /// breaker.
    pub(crate) fn record_failure_of(&self, started: u64, timed_out: bool) -> bool {
        if !timed_out && self.counted.load(Ordering::Relaxed) != started {
            return false;
        }
        self.record_failure(false)
    }

    /// Returns true when this failure opened the breaker.
    pub(crate) fn record_failure(&self, probe: bool) -> bool {
        self.counted.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if probe || failures >= self.threshold {
            let was_open = self.open_until.load(Ordering::Relaxed) != 0;
            let cooldown = u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX);
            self.open_until.store(
                now_millis().saturating_add(cooldown).max(1),
                Ordering::Relaxed,
            );
            self.probing.store(false, Ordering::Release);
            return !was_open;
        }
        false
    }
}

/// The one probe of a half-open breaker, held while it runs. Dropped
/// without [`ProbeSlot::settled`] (its task was cancelled, or panicked), it
/// lets the next call probe instead of leaving the breaker open for good.
pub(crate) struct ProbeSlot<'a> {
    breaker: &'a Breaker,
    settled: bool,
}

impl<'a> ProbeSlot<'a> {
    /// For the caller that got [`Permit::Probe`].
    pub(crate) fn new(breaker: &'a Breaker) -> Self {
        ProbeSlot {
            breaker,
            settled: false,
        }
    }

    /// Records the probe's outcome; returns true when a failure opened the
    /// breaker (see [`Breaker::record_failure`]).
    pub(crate) fn settled(mut self, healthy: bool) -> bool {
        self.settled = true;
        if healthy {
            self.breaker.record_success();
            false
        } else {
            self.breaker.record_failure(true)
        }
    }
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_once_then_closes() {
        let b = Breaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert_eq!(b.permit(), Permit::Call);
            assert!(!b.record_failure(false));
        }
        assert!(b.record_failure(false), "third failure opens");
        assert_eq!(b.permit(), Permit::Skip);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Skip, "only one probe at a time");
        b.record_success();
        assert_eq!(b.permit(), Permit::Call);
    }

    #[test]
    fn a_probe_dropped_without_an_outcome_lets_the_next_call_probe() {
        let b = Breaker::new(1, Duration::from_millis(20));
        b.record_failure(false);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Probe);
        drop(ProbeSlot::new(&b));
        assert_eq!(b.permit(), Permit::Probe, "the slot came back");
        ProbeSlot::new(&b).settled(true);
        assert_eq!(b.permit(), Permit::Call);
    }

    #[test]
    fn commands_failing_together_are_one_failure_but_timeouts_count_each() {
        let b = Breaker::new(3, Duration::from_secs(60));
        // Thirty commands in flight on a connection that drops.
        let started = b.failures_counted();
        for _ in 0..30 {
            assert!(!b.record_failure_of(started, false));
        }
        assert_eq!(b.permit(), Permit::Call, "one broken connection");
        // Commands sent after it fail too: the node is down.
        let started = b.failures_counted();
        assert!(!b.record_failure_of(started, false));
        let started = b.failures_counted();
        assert!(b.record_failure_of(started, false), "third failure opens");

        // Three concurrent calls that each waited the op timeout.
        let b = Breaker::new(3, Duration::from_secs(60));
        let started = b.failures_counted();
        assert!(!b.record_failure_of(started, true));
        assert!(!b.record_failure_of(started, true));
        assert!(b.record_failure_of(started, true), "a stall opens at once");
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(20));
        b.record_failure(false);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.permit(), Permit::Probe);
        b.record_failure(true);
        assert_eq!(b.permit(), Permit::Skip);
    }
}
