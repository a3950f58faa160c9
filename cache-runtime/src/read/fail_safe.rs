//! `fail_safe = "1h"`: an entry is kept that long past its freshness (and
//! its stale window), to answer when the body fails.
//!
//! Such an entry, once read past its stale window, is *expired*: it is
//! recomputed as a miss is, and served only if the body returns `Err` or
//! panics. Its recomputation differs from a miss's in three ways, so that
//! the old value survives it:
//!
//! - It runs under the key's refresh lock, not its lease: the entry stays
//!   in place while the body runs, and is replaced by a compare-and-set on
//!   the very entry read, so that a write's `DEL` meanwhile wins (the lease
//!   guarantee), and an invalidated entry is never served (a write is never
//!   undone by fail-safe: the `DEL` removed the kept value too).
//! - One computation at a time in this process, whatever `single_flight`
//!   says: the others wait for its answer; if it fails, they are answered
//!   with the kept value too.
//! - After a failure, the key's kept value answers without running the
//!   body for a moment ([`REFRESH_RETRY_AFTER`]) in this process, and the
//!   refresh lock is held as long, so that a failing database is tried
//!   once per key per moment, not by every caller.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::cache::Cache;
use crate::cache::flight::{BackgroundSlot, Handed, Joiner, Landing, Leader, Role, Waiter};
use crate::outcome::Encoded;
use crate::read::call::{Answered, Erased};
use crate::read::run::{REFRESH_RETRY_AFTER, Ran, Run, run};
use crate::site::Site;
use crate::stats::Event;
use crate::tag::Tagging;
use crate::write::lease::HeldLease;

/// Answers a call that read an expired entry of a `fail_safe` function,
/// whose value is decoded in `call` already. `header` is the entry's
/// headers, which its replacement is compared with.
pub(crate) async fn expired(
    cache: &Cache,
    site: &'static Site,
    key: &str,
    header: Vec<u8>,
    call: &mut Erased<'_>,
    began: Instant,
) -> Answered {
    if cache.flights().failed_lately(key) {
        return kept(cache, site, Event::StaleHit);
    }
    let joiner = Joiner {
        began,
        takes_proof: true,
    };
    match cache.flights().join(key, joiner) {
        Role::Leader(leader) => lead(cache, site, key, &header, call, leader, began).await,
        Role::Waiter(waiter) => match wait(site, waiter, began).await {
            // Slower than the soft timeout.
            None => kept(cache, site, Event::StaleHit),
            Some(Handed::Value(bytes)) if cache.decode(site, key, &bytes, call) => {
                cache.record(site, Event::Coalesced);
                Answered::Decoded
            }
            Some(Handed::Nothing) if call.call().decode_nothing() => {
                cache.record(site, Event::Coalesced);
                Answered::Decoded
            }
            // The leader's body failed (or was slow).
            Some(Handed::Failed) if cache.flights().failed_lately(key) => {
                kept(cache, site, Event::StaleHit)
            }
            // Cancelled, or its answer is not for this caller: computed
            // here, without storing.
            _ => alone(cache, site, key, call, began).await,
        },
    }
}

/// The leader's answer; `None` if the function's soft timeout (counted
/// from when the call began) passed first.
async fn wait(site: &'static Site, waiter: Waiter, began: Instant) -> Option<Handed> {
    match site.soft_timeout_of() {
        Some(limit) => {
            let left = limit.saturating_sub(began.elapsed());
            tokio::time::timeout(left, waiter.wait()).await.ok()
        }
        None => Some(waiter.wait().await),
    }
}

/// The kept value answers, counted as `event` (the call's outcome) and as
/// a fail-safe answer.
fn kept(cache: &Cache, site: &'static Site, event: Event) -> Answered {
    cache.record(site, event);
    cache.record(site, Event::FailSafe);
    Answered::Decoded
}

/// What is left of a function's soft timeout for a call that began at
/// `began`, if it has one.
pub(crate) fn soft_limit(site: &'static Site, began: Instant) -> Option<Duration> {
    site.soft_timeout_of()
        .map(|limit| limit.saturating_sub(began.elapsed()))
}

/// For a caller that holds the key's refresh lock: the soft timeout left,
/// with a place in the background for the body if it is slower, when the
/// body can finish without its call (its function's arguments are owned,
/// it needs nothing of the call after it: not `tags_from`) and there is
/// room. `None`: the body runs to its end, however long it takes (it is
/// the one that refreshes the entry; the other callers are answered at
/// their soft timeout meanwhile).
pub(crate) fn background(
    cache: &Cache,
    site: &'static Site,
    call: &Erased<'_>,
    began: Instant,
) -> Option<(Duration, BackgroundSlot)> {
    let limit = soft_limit(site, began)?;
    if !call.can_detach() || site.derives_tags() {
        return None;
    }
    Some((limit, cache.flights().background_slot()?))
}

/// A body still running at its soft timeout, whose caller answers with
/// the old value: handed to a task with the refresh lock (and the place
/// [`background`] gave), to finish and store its value over the entry
/// read (`header`), as its caller would have.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_late(
    cache: &Cache,
    site: &'static Site,
    key: &str,
    header: &[u8],
    call: &mut Erased<'_>,
    lock: HeldLease<'_>,
    slot: BackgroundSlot,
    started: Instant,
    fail_safe: bool,
) {
    let Some(body) = call.detach(cache.settings().codec) else {
        // `background` checked that it can be: nothing to finish.
        return;
    };
    cache.record(site, Event::BackgroundCompletion);
    let stamp = call.tagging().map(Tagging::stamp).unwrap_or_default();
    let task = Late {
        cache: cache.clone(),
        site,
        key: key.to_owned(),
        header: header.to_vec(),
        stamp,
        lock: lock.into_owned(),
        started,
        fail_safe,
        _slot: slot,
    };
    tokio::spawn(task.complete(body));
}

/// A body finishing in the background, with what it stores under.
struct Late {
    cache: Cache,
    site: &'static Site,
    key: String,
    header: Vec<u8>,
    stamp: Vec<u8>,
    lock: HeldLease<'static>,
    started: Instant,
    fail_safe: bool,
    _slot: BackgroundSlot,
}

impl Late {
    /// Runs `body` to its end and stores its value as the call would
    /// have; a failure holds the lock for a moment (and, for `fail_safe`,
    /// notes the key as failing). Dropped (its runtime shutting down), the
    /// lock is given back by its guard.
    async fn complete(self, body: crate::read::call::Detached) {
        // No longer than the lock it stores under: past it, storing would
        // be moot, and the place in the background is given back.
        let limit = self.cache.settings().lease;
        let answer = tokio::time::timeout(limit, AssertUnwindSafe(body).catch_unwind())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(Encoded::Failed);
        let run = Run {
            started: self.started,
            took: self.started.elapsed(),
        };
        let cache = &self.cache;
        if let Encoded::Failed = answer {
            if self.fail_safe {
                cache.flights().note_failure(&self.key, REFRESH_RETRY_AFTER);
            }
            self.lock.hold_for(REFRESH_RETRY_AFTER).await;
            return;
        }
        let entry = cache.entry_of(self.site, &self.key, answer).1;
        cache
            .replace_entry(self.site, &self.key, &self.header, entry, run, &self.stamp)
            .await;
        self.lock.give_back().await;
    }
}

/// The body was slower than the soft timeout: the kept value answers.
fn kept_for_slow(cache: &Cache, site: &'static Site) -> Answered {
    cache.record(site, Event::FailSafe);
    Answered::Decoded
}

/// The body failed: the key is noted as failing (for this process's other
/// callers), and the kept value answers.
fn failed(cache: &Cache, site: &'static Site, key: &str) -> Answered {
    cache.flights().note_failure(key, REFRESH_RETRY_AFTER);
    crate::limited!(
        cache,
        warn!(
            key,
            "cached function failed: answering with the value fail_safe kept"
        )
    );
    cache.record(site, Event::FailSafe);
    Answered::Decoded
}

/// This process's computation of the key: under the refresh lock if it
/// can be taken (else another process computes, or failed a moment ago:
/// computed here without storing), its answer handed to the waiters.
async fn lead(
    cache: &Cache,
    site: &'static Site,
    key: &str,
    header: &[u8],
    call: &mut Erased<'_>,
    leader: Leader<'_>,
    began: Instant,
) -> Answered {
    let lock = HeldLease::refresh_lock(cache, site, key).await;
    cache.record(site, Event::Miss);
    let clocks = cache.clocks_for(site, false).await;
    // Under the lock, a slow body finishes in the background if it can,
    // else it runs to its end; without the lock (another process holds
    // it), nothing is stored: the body is given up at the soft timeout.
    let (limit, slot) = match &lock {
        Some(_) => match background(cache, site, call, began) {
            Some((limit, slot)) => (Some(limit), Some(slot)),
            None => (None, None),
        },
        None => (soft_limit(site, began), None),
    };
    let run = match run(cache, key, call, limit, true).await {
        Ran::Done(run) => run,
        Ran::Slow { started } => {
            // The kept value answers this process's callers meanwhile.
            cache.flights().note_failure(key, REFRESH_RETRY_AFTER);
            leader.land(Landing::Failed);
            match (lock, slot) {
                (Some(lock), Some(slot)) => {
                    finish_late(cache, site, key, header, call, lock, slot, started, true);
                }
                _ => call.drop_body(),
            }
            return kept_for_slow(cache, site);
        }
    };
    cache.derive_tags(site, call, clocks).await;
    let answer = call.encode_output(cache.settings().codec);
    if let Encoded::Failed = answer {
        let answered = failed(cache, site, key);
        leader.land(Landing::Failed);
        if let Some(lock) = lock {
            lock.hold_for(REFRESH_RETRY_AFTER).await;
        }
        return answered;
    }
    // Its tags could not be told (see `crate::tag`): nothing is stored,
    // and the waiters read the key themselves.
    if call.tagging().is_some_and(|t| !t.is_read()) {
        leader.land(Landing::LookAgain);
        if let Some(lock) = lock {
            lock.give_back().await;
        }
        return Answered::Body;
    }
    let nothing = matches!(answer, Encoded::Nothing);
    let (handed, entry) = cache.entry_of(site, key, answer);
    let fence = leader.fence();
    let fresh = match lock {
        Some(lock) => {
            let stamp = call.tagging().map(Tagging::stamp).unwrap_or_default();
            let replaced = cache
                .replace_entry(site, key, header, entry, run, &stamp)
                .await;
            lock.give_back().await;
            replaced
        }
        // Not stored: fresh only if the entry read is still there.
        None => cache.still_begins(key, header).await,
    };
    cache
        .hand_over(leader, fence, handed, nothing, fresh, run, call.tagging())
        .await;
    Answered::Body
}

/// Computed by this caller alone, without storing; the kept value answers
/// if the body fails.
async fn alone(
    cache: &Cache,
    site: &'static Site,
    key: &str,
    call: &mut Erased<'_>,
    began: Instant,
) -> Answered {
    cache.record(site, Event::Miss);
    if let Ran::Slow { .. } = run(cache, key, call, soft_limit(site, began), true).await {
        call.drop_body();
        return kept_for_slow(cache, site);
    }
    match call.encode_output(cache.settings().codec) {
        Encoded::Failed => failed(cache, site, key),
        _ => Answered::Body,
    }
}
