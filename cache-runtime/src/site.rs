//! What generated code knows about one `#[redis_cached]` function at
//! compile time: its configuration ([`Site`]), with its identity for
//! statistics ([`Function`]).

use crate::stats::Function;

/// The static configuration of one `#[redis_cached]` function.
#[doc(hidden)]
#[derive(Debug)]
pub struct Site {
    function: Function,
    ttl_millis: u64,
    jitter: f64,
    single_flight: SingleFlight,
    stale_millis: u64,
    early_refresh_beta: f64,
    /// `cache_none` / `none_ttl`: the TTL of a cached `None`; 0 when `None`
    /// is not cached.
    none_ttl_millis: u64,
    /// `local = "5s"`: how long a copy stays in process memory at most.
    local_millis: u64,
    /// `tags_from = path`: the value names tags of its own.
    derives_tags: bool,
    /// `fail_safe = "1h"`: how long past its freshness (and its stale
    /// window) an entry is kept to answer when the body fails.
    fail_safe_millis: u64,
    /// `soft_timeout = "150ms"`: how long a caller with an old value in
    /// hand waits for the body; 0 without.
    soft_timeout_millis: u64,
}

/// `single_flight`: who shares one computation of a missing key.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SingleFlight {
    /// Every caller that misses computes.
    Off,
    /// Callers in this process wait for one computation.
    Local,
    /// Callers in every process wait for the lease holder's value.
    Distributed,
}

impl Site {
    /// Made by generated code; the macro has validated the arguments.
    pub const fn new(name: &'static str, ttl_millis: u64, jitter: f64) -> Self {
        Site {
            function: Function::new(name),
            ttl_millis,
            jitter,
            single_flight: SingleFlight::Off,
            stale_millis: 0,
            early_refresh_beta: 0.0,
            none_ttl_millis: 0,
            local_millis: 0,
            derives_tags: false,
            fail_safe_millis: 0,
            soft_timeout_millis: 0,
        }
    }

    /// `fail_safe = "1h"`: keep entries `millis` past their freshness, to
    /// answer when the body fails.
    pub const fn fail_safe(mut self, millis: u64) -> Self {
        self.fail_safe_millis = millis;
        self
    }

    /// `soft_timeout = "150ms"`: wait at most `millis` for the body when an
    /// old value can answer meanwhile.
    pub const fn soft_timeout(mut self, millis: u64) -> Self {
        self.soft_timeout_millis = millis;
        self
    }

    /// `tags_from = path`: the value names tags of its own (see
    /// `crate::tag`).
    pub const fn tags_from(mut self) -> Self {
        self.derives_tags = true;
        self
    }

    /// `local = "5s"`: keep a copy in process memory for at most `millis`.
    pub const fn local(mut self, millis: u64) -> Self {
        self.local_millis = millis;
        self
    }

    /// `cache_none` (`millis` is the function's TTL) or `none_ttl = "5s"`:
    /// an answer of `None` is cached for `millis`.
    pub const fn cache_none(mut self, millis: u64) -> Self {
        self.none_ttl_millis = millis;
        self
    }

    /// `single_flight` / `single_flight = "distributed"`.
    pub const fn single_flight(mut self, mode: SingleFlight) -> Self {
        self.single_flight = mode;
        self
    }

    /// `stale = "30s"`: how long after the TTL an old value may be served
    /// while one caller refreshes it.
    pub const fn stale(mut self, millis: u64) -> Self {
        self.stale_millis = millis;
        self
    }

    /// `early_refresh` (β = 1) or `early_refresh = β`.
    pub const fn early_refresh(mut self, beta: f64) -> Self {
        self.early_refresh_beta = beta;
        self
    }

    /// The function, for statistics.
    pub fn function(&'static self) -> &'static Function {
        &self.function
    }

    pub(crate) fn single_flight_mode(&self) -> SingleFlight {
        self.single_flight
    }

    /// Whether the function's values name tags of their own (`tags_from`).
    pub(crate) fn derives_tags(&self) -> bool {
        self.derives_tags
    }

    /// `local = "..."`, in milliseconds (0 without a local tier).
    pub(crate) fn local_millis(&self) -> u64 {
        self.local_millis
    }

    pub(crate) fn stale_millis(&self) -> u64 {
        self.stale_millis
    }

    /// `fail_safe = "..."`, in milliseconds (0 without).
    pub(crate) fn fail_safe_millis(&self) -> u64 {
        self.fail_safe_millis
    }

    /// `soft_timeout = "..."`, if the function has one.
    pub(crate) fn soft_timeout_of(&self) -> Option<std::time::Duration> {
        (self.soft_timeout_millis > 0)
            .then(|| std::time::Duration::from_millis(self.soft_timeout_millis))
    }

    pub(crate) fn early_refresh_beta(&self) -> Option<f64> {
        (self.early_refresh_beta > 0.0).then_some(self.early_refresh_beta)
    }

    /// Whether stored values carry a freshness header (`stale`,
    /// `early_refresh`, `fail_safe`).
    pub(crate) fn tracks_freshness(&self) -> bool {
        self.stale_millis > 0 || self.early_refresh_beta > 0.0 || self.fail_safe_millis > 0
    }

    /// The longest expiry an entry of this function is stored with, about:
    /// its TTL at the top of its jitter, plus its stale and fail-safe
    /// windows.
    pub(crate) fn longest_expiry_millis(&self) -> u64 {
        let ttl = self.ttl_millis.max(self.none_ttl_millis) as f64 * (1.0 + self.jitter.max(0.0));
        (ttl.ceil() as u64)
            .saturating_add(self.stale_millis)
            .saturating_add(self.fail_safe_millis)
    }

    /// The TTL for one write: the configured TTL spread by ±`jitter`, at least 1 ms.
    pub(crate) fn ttl_millis(&self) -> u64 {
        self.jittered(self.ttl_millis)
    }

    /// The TTL for one write of a value that lives `life`: the configured
    /// TTL or `ttl_from`'s, spread like [`Site::ttl_millis`]; `None` for a
    /// value not to be stored.
    pub(crate) fn ttl_of(&self, life: crate::outcome::Life) -> Option<u64> {
        match life {
            crate::outcome::Life::Ttl => Some(self.ttl_millis()),
            crate::outcome::Life::Millis(millis) => Some(self.jittered(millis)),
            crate::outcome::Life::Unstored => None,
        }
    }

    /// The TTL for one write of an answer of `None`, if it is cached
    /// (`cache_none`, `none_ttl`), spread like [`Site::ttl_millis`].
    pub(crate) fn none_ttl_millis(&self) -> Option<u64> {
        (self.none_ttl_millis > 0).then(|| self.jittered(self.none_ttl_millis))
    }

    fn jittered(&self, millis: u64) -> u64 {
        if self.jitter <= 0.0 {
            return millis.max(1);
        }
        let spread = self.jitter * (2.0 * fastrand::f64() - 1.0);
        let ttl = millis as f64 * (1.0 + spread);
        (ttl.round() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let site = Site::new("f", 10_000, 0.1);
        let ttls: Vec<u64> = (0..1000).map(|_| site.ttl_millis()).collect();
        assert!(ttls.iter().all(|t| (9_000..=11_000).contains(t)));
        let distinct: std::collections::BTreeSet<_> = ttls.iter().collect();
        assert!(
            distinct.len() > 100,
            "jitter spreads TTLs: {} distinct",
            distinct.len()
        );
        assert_eq!(Site::new("f", 5, 0.0).ttl_millis(), 5);
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        static A: Function = Function::writer("a");
        static B: Site = Site::new("b", 1, 0.0);
        let a = A.id();
        assert_eq!(A.id(), a);
        assert_ne!(B.function().id(), a);
        assert_eq!(Function::name_of(a), ("a", true));
        assert_eq!(Function::name_of(B.function().id()), ("b", false));
    }
}
