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
use std::time::Instant;

use futures_util::FutureExt;

use crate::cache::Cache;
use crate::outcome::Encoded;
use crate::read::call::{Answered, Erased};
use crate::read::flight::{Cover, Handed, Joiner, Landing, Leader, Role};
use crate::read::lookup::{REFRESH_RETRY_AFTER, Run};
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
        Role::Leader(leader) => lead(cache, site, key, &header, call, leader).await,
        Role::Waiter(waiter) => match waiter.wait().await {
            Handed::Value(bytes) if cache.decode(site, key, &bytes, call) => {
                cache.record(site, Event::Coalesced);
                Answered::Decoded
            }
            Handed::Nothing if call.call().decode_nothing() => {
                cache.record(site, Event::Coalesced);
                Answered::Decoded
            }
            // The leader's body failed.
            Handed::Failed if cache.flights().failed_lately(key) => {
                kept(cache, site, Event::StaleHit)
            }
            // Cancelled, or its answer is not for this caller: computed
            // here, without storing.
            _ => alone(cache, site, key, call).await,
        },
    }
}

/// The kept value answers, counted as `event` (the call's outcome) and as
/// a fail-safe answer.
fn kept(cache: &Cache, site: &'static Site, event: Event) -> Answered {
    cache.record(site, event);
    cache.record(site, Event::FailSafe);
    Answered::Decoded
}

/// Runs the body; a panic is caught (and logged) when the kept value can
/// answer instead: the body then failed.
async fn run(cache: &Cache, key: &str, call: &mut Erased<'_>) -> Run {
    let started = Instant::now();
    if let Err(panic) = AssertUnwindSafe(call.run_body()).catch_unwind().await {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        crate::limited!(
            cache,
            error!(key, panic = %message, "cached function panicked: answering with the value fail_safe kept")
        );
    }
    Run {
        started,
        took: started.elapsed(),
    }
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
) -> Answered {
    let lock = HeldLease::refresh_lock(cache, site, key).await;
    cache.record(site, Event::Miss);
    let clocks = cache.clocks_for(site, false).await;
    let run = run(cache, key, call).await;
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
    // The proof covers the key; a tagged answer needs its tags unchanged
    // too (see `crate::tag`).
    let fresh = match call.tagging() {
        Some(tagging) if fresh => cache.tokens_unchanged(tagging).await,
        _ => fresh,
    };
    let cover = Cover {
        body_started: run.started,
        fence: if fresh { fence } else { 0 },
    };
    leader.land(match (handed, nothing) {
        (Some(bytes), _) => Landing::Value {
            bytes: bytes.into(),
            cover,
        },
        (None, true) => Landing::Nothing { cover },
        // A value that does not encode: the waiters compute.
        (None, false) => Landing::LookAgain,
    });
    Answered::Body
}

/// Computed by this caller alone, without storing; the kept value answers
/// if the body fails.
async fn alone(cache: &Cache, site: &'static Site, key: &str, call: &mut Erased<'_>) -> Answered {
    cache.record(site, Event::Miss);
    run(cache, key, call).await;
    match call.encode_output(cache.settings().codec) {
        Encoded::Failed => failed(cache, site, key),
        _ => Answered::Body,
    }
}
