//! Per-call control: [`refresh`], [`bypass`] and [`origin`] act on the
//! cached calls made while a future runs, through any depth of calls.
//!
//! They set a tokio task-local value around the future, which the read
//! path consults when a cached call starts ([`begin`]) and when it records
//! how the call was answered ([`noted`]); outside of them, a call pays one
//! thread-local read for each.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::stats::Event;

tokio::task_local! {
    static SCOPE: Scope;
}

/// What the innermost of [`refresh`], [`bypass`] and [`origin`] around a
/// call asks.
#[derive(Clone)]
struct Scope {
    mode: Mode,
    /// The innermost [`origin`]'s report, if any.
    report: Option<Arc<Report>>,
}

/// How a cached call treats the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// As configured.
    Normal,
    /// Recompute and store, whatever is cached ([`refresh`]).
    Refresh,
    /// Neither read nor write the cache ([`bypass`]).
    Bypass,
}

/// What an [`origin`] has seen: how many cached calls started, and the
/// outcomes recorded (one bit per [`Origin`]); an `origin` around it sees
/// the same.
#[derive(Default)]
struct Report {
    calls: AtomicU32,
    seen: AtomicU32,
    outer: Option<Arc<Report>>,
}

impl Report {
    /// This report and those of the `origin`s around it.
    fn chain(&self) -> impl Iterator<Item = &Report> {
        std::iter::successors(Some(self), |report| report.outer.as_deref())
    }
}

/// How a cached call was answered, as [`origin`] reports it.
///
/// A batch lookup is one call: it reports the costliest way one of its ids
/// was answered, in the order of this list from the end (`Miss` if the
/// body ran for any id, `Hit` if every id was read from the cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// A copy held in this process (`local = "..."`).
    LocalHit,
    /// A value read from the cache.
    Hit,
    /// A value past its freshness, served while one caller recomputes it
    /// (`stale`, or the grace of `early_refresh`).
    Stale,
    /// The value another caller's run of the body computed for the same
    /// key (`single_flight`).
    Coalesced,
    /// The body ran: the key held no value (or garbage, or another
    /// caller's lease); its value was stored under the key's lease if it
    /// could be.
    Miss,
    /// The body ran to recompute a value: a stale one (`stale`), one drawn
    /// early (`early_refresh`), or any value inside [`refresh`]. A stale
    /// refresh that failed answered with the old value.
    Refresh,
    /// A value kept past its freshness by `fail_safe`: the body failed (or
    /// failed a moment ago for the same key), or was slower than
    /// `soft_timeout` and finishes in the background.
    FailSafe,
    /// The body ran without the cache, because the call was made inside
    /// [`bypass`].
    Bypassed,
    /// The body ran without the cache, because it could not be used: none
    /// installed, unreachable, its circuit breaker open, or an
    /// invalidation of the key still to be delivered.
    Uncached,
    /// The future made no cached call.
    NoCall,
    /// The future made more than one cached call: wrap the one you mean.
    Several,
}

impl Origin {
    /// The outcomes, cheapest first: see [`Origin`] about batches.
    const ANSWERS: [Origin; 9] = [
        Origin::LocalHit,
        Origin::Hit,
        Origin::Stale,
        Origin::Coalesced,
        Origin::Miss,
        Origin::Refresh,
        Origin::FailSafe,
        Origin::Bypassed,
        Origin::Uncached,
    ];

    /// The outcome an event records, if it is one.
    fn of(event: Event) -> Option<Origin> {
        Some(match event {
            Event::LocalHit => Origin::LocalHit,
            Event::Hit => Origin::Hit,
            Event::StaleHit => Origin::Stale,
            Event::Coalesced => Origin::Coalesced,
            Event::Miss => Origin::Miss,
            Event::Refresh => Origin::Refresh,
            Event::FailSafe => Origin::FailSafe,
            Event::Skipped => Origin::Bypassed,
            Event::Bypass => Origin::Uncached,
            _ => return None,
        })
    }

    fn bit(self) -> u32 {
        let at = Origin::ANSWERS.iter().position(|&o| o == self);
        at.map_or(0, |at| 1 << at)
    }
}

/// Recomputes every cached call made while `fut` runs, and stores the
/// values, whatever the cache holds: for a job that re-warms entries, or a
/// page that must show what the database holds now.
///
/// A refresh goes through the key's lease as a miss does: a value it
/// computed from data read before a write is not stored after the write.
/// It never returns a value computed before it started: with
/// `single_flight`, it joins a computation of the key only if that began
/// after it. A local copy (`local = "..."`) is not served; the refresh's
/// store drops every process's copy.
///
/// It acts through any depth of calls (a handler that calls a repository),
/// in this task only: a task spawned inside it is not a part of it (wrap
/// the spawned future in `refresh` again if it should be). Writes
/// (`#[invalidates]`, `#[cache_put]`) are not changed by it. The innermost
/// of `refresh` and [`bypass`] around a call wins.
///
/// ```
/// # use cache_runtime::{Cache, redis_cached};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct User { name: String }
/// #[redis_cached(key = "user:<id>", ttl = 60)]
/// async fn get_user(id: u64) -> Option<User> {
///     Some(User { name: format!("user {id}") }) // the slow query
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # Cache::memory().install();
/// let fresh = cache_runtime::refresh(get_user(42)).await;
/// # assert!(fresh.is_some());
/// # }
/// ```
///
/// # Cancellation safety
///
/// Cancel safe as the calls inside it are.
pub async fn refresh<F: IntoFuture>(fut: F) -> F::Output {
    within(Mode::Refresh, fut.into_future()).await
}

/// Runs every cached call made while `fut` runs without the cache: nothing
/// is read or stored, and the body runs, as it would without the
/// attribute. Counted as `skipped` in [`Stats`](crate::Stats).
///
/// Writes made inside it still keep the cache right: `#[invalidates]`
/// invalidates and `#[cache_put]` stores, as always (a write that skipped
/// the cache would leave the old value there for other callers). What a
/// spawned task inherits, and which of nested scopes wins, is as for
/// [`refresh`].
///
/// ```
/// # use cache_runtime::{Cache, redis_cached};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct User { name: String }
/// # #[redis_cached(key = "user:<id>", ttl = 60)]
/// # async fn get_user(id: u64) -> Option<User> { Some(User { name: format!("user {id}") }) }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # Cache::memory().install();
/// let direct = cache_runtime::bypass(get_user(42)).await;
/// # assert!(direct.is_some());
/// # }
/// ```
///
/// # Cancellation safety
///
/// Cancel safe as the calls inside it are.
pub async fn bypass<F: IntoFuture>(fut: F) -> F::Output {
    within(Mode::Bypass, fut.into_future()).await
}

/// Runs `fut` and says how the one cached call it made was answered: from
/// the cache, from process memory, by the body, and so on (see [`Origin`]).
/// [`Origin::NoCall`] when it made none, [`Origin::Several`] when it made
/// more than one. For tests, debugging and logs.
///
/// It does not change what the calls do; inside [`refresh`] or [`bypass`]
/// they act as those say. An `origin` inside another one reports its own
/// calls, which the outer one sees too. Calls made by tasks spawned inside
/// it are not counted.
///
/// ```
/// # use cache_runtime::{Cache, Origin, redis_cached};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct User { name: String }
/// # #[redis_cached(key = "user:<id>", ttl = 60)]
/// # async fn get_user(id: u64) -> Option<User> { Some(User { name: format!("user {id}") }) }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// # Cache::memory().install();
/// let (_, first) = cache_runtime::origin(get_user(42)).await;
/// let (_, second) = cache_runtime::origin(get_user(42)).await;
/// assert_eq!((first, second), (Origin::Miss, Origin::Hit));
/// # }
/// ```
///
/// # Cancellation safety
///
/// Cancel safe as the calls inside it are.
pub async fn origin<F: IntoFuture>(fut: F) -> (F::Output, Origin) {
    let (mode, outer) = SCOPE
        .try_with(|scope| (scope.mode, scope.report.clone()))
        .unwrap_or((Mode::Normal, None));
    let report = Arc::new(Report {
        outer,
        ..Report::default()
    });
    let scope = Scope {
        mode,
        report: Some(report.clone()),
    };
    let output = SCOPE.scope(scope, fut.into_future()).await;
    (output, report.origin())
}

/// `fut` with `mode`, keeping the report of an [`origin`] around it.
async fn within<F: Future>(mode: Mode, fut: F) -> F::Output {
    let report = SCOPE.try_with(|scope| scope.report.clone()).ok().flatten();
    SCOPE.scope(Scope { mode, report }, fut).await
}

impl Report {
    fn origin(&self) -> Origin {
        match self.calls.load(Ordering::Relaxed) {
            0 => Origin::NoCall,
            1 => {
                let seen = self.seen.load(Ordering::Relaxed);
                // The costliest outcome seen; a call that recorded none
                // ran without a cache.
                Origin::ANSWERS
                    .iter()
                    .rev()
                    .find(|origin| seen & origin.bit() != 0)
                    .copied()
                    .unwrap_or(Origin::Uncached)
            }
            _ => Origin::Several,
        }
    }
}

/// A cached call starts: counted by an [`origin`] around it; how it is to
/// treat the cache.
pub(crate) fn begin() -> Mode {
    SCOPE
        .try_with(|scope| {
            for report in scope.report.iter().flat_map(|report| report.chain()) {
                report.calls.fetch_add(1, Ordering::Relaxed);
            }
            scope.mode
        })
        .unwrap_or(Mode::Normal)
}

/// How the cached calls of this task are to treat the cache, without
/// counting a call (see [`begin`]).
pub(crate) fn mode() -> Mode {
    SCOPE.try_with(|scope| scope.mode).unwrap_or(Mode::Normal)
}

/// A call recorded `event`: noted by an [`origin`] around it, if it says
/// how the call was answered.
pub(crate) fn noted(event: Event) {
    let Some(origin) = Origin::of(event) else {
        return;
    };
    let _ = SCOPE.try_with(|scope| {
        for report in scope.report.iter().flat_map(|report| report.chain()) {
            report.seen.fetch_or(origin.bit(), Ordering::Relaxed);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_has_its_own_bit() {
        let bits: u32 = Origin::ANSWERS.iter().map(|o| o.bit()).sum();
        assert_eq!(bits, (1 << Origin::ANSWERS.len()) - 1);
        assert_eq!(Origin::NoCall.bit(), 0);
    }

    #[tokio::test]
    async fn the_innermost_scope_wins_and_reports_reach_the_origin() {
        let (mode, origin) = origin(refresh(async {
            assert_eq!(bypass(async { begin() }).await, Mode::Bypass);
            noted(Event::Skipped);
            begin()
        }))
        .await;
        assert_eq!(mode, Mode::Refresh);
        assert_eq!(origin, Origin::Several);
        let ((), origin) = super::origin(async {
            begin();
            noted(Event::Hit);
            noted(Event::Miss);
            noted(Event::Error);
        })
        .await;
        assert_eq!(origin, Origin::Miss, "the costliest");
        assert_eq!(super::origin(async {}).await.1, Origin::NoCall);
        assert_eq!(begin(), Mode::Normal);
    }
}
