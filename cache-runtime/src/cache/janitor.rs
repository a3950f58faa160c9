//! The janitor's ledger: the chores a cache's calls could not finish
//! (giving back the lease of a call that was dropped or whose command
//! timed out, and may still land; retrying an invalidation the write could
//! not finish), and what readers consult while they are pending: the
//! abandoned leases, the keys being invalidated, a suspect cache.
//!
//! The worker that does the chores is [`crate::write::worker`]; this
//! module knows nothing of the cache it serves.
//!
//! Invalidations are queued per key, and one queued invalidation of a key
//! covers every write of that key until its next attempt starts: an outage
//! costs one pending retry per distinct key, however many writes there are.
//! At most [`MAX_PENDING`] chores are kept (about 300 bytes each). An
//! invalidation that does not fit makes the whole cache suspect (see
//! [`Suspect`]): readers of this process skip every key until every entry
//! that may predate it is gone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::stats::Function;

/// Chores kept at most, queued and waiting for a retry: distinct keys for
/// invalidations (a key's writes share one).
pub(crate) const MAX_PENDING: usize = 64 * 1024;

/// Something to do for a call that can no longer do it itself.
#[derive(Debug)]
pub(crate) enum Chore {
    /// Delete `key` if it still holds `placeholder` (a lease or refresh
    /// lock), retried until the backend answers or the lease expired.
    Release {
        key: String,
        placeholder: Vec<u8>,
        until: Instant,
    },
    /// Delete `key` after a write. `tried`: the writer's own attempt
    /// failed, so the first retry waits.
    Invalidate {
        writer: Option<&'static Function>,
        key: String,
        tried: bool,
        /// The writer's `DEL` (or `SET`) reached the primary and only the
        /// replicas' acknowledgement is missing (`write_durability`): the
        /// primary serves the right answer, so readers need not skip the
        /// key while the retry makes it durable, as long as that primary
        /// still serves it. The number is the backend's
        /// [`primaries_epoch`](crate::backend::Backend::primaries_epoch)
        /// when the write was sent: once the slot map changes (a failover
        /// may have promoted a replica without the write), readers skip.
        landed: Option<u64>,
    },
}

/// The queue of one cache's chores, and its worker.
#[derive(Debug, Default)]
pub(crate) struct Janitor {
    /// Unbounded: what bounds the chores is [`MAX_PENDING`], checked
    /// before one is sent.
    pub(crate) queue: Mutex<Option<mpsc::UnboundedSender<Chore>>>,
    /// Chores submitted and not finished: 0 once everything is cleaned up.
    pub(crate) pending: AtomicUsize,
    /// Keys in `Ledger::invalidating`, plus one while the cache is
    /// [`Suspect`]: readers look further only when it is not 0, so the hot
    /// path costs one atomic load.
    pub(crate) invalidating: AtomicUsize,
    pub(crate) ledger: Mutex<Ledger>,
    /// Wakes the worker when the cache becomes [`Suspect`], or when a
    /// breaker's probe found the backend back.
    pub(crate) wake: std::sync::Arc<tokio::sync::Notify>,
    /// Set with a wake when the backend is back: every pending invalidation
    /// is due at once, so that a returning server has them before readers
    /// stop skipping their keys (instead of at the end of their back-off).
    pub(crate) retry_now: std::sync::atomic::AtomicBool,
}

/// An invalidation did not fit in [`MAX_PENDING`]: its key is not known
/// any more, so readers of this process skip every key until every entry
/// that may predate it is gone: once the longest expiry this process has
/// stored with or read a function with (see [`crate::backend::longest_px`])
/// has run out since the overflow, or, with a cache prefix, sooner, when a
/// [`Cache::clear`](crate::Cache::clear) started after the overflow has
/// finished (tried every second by the worker). Calls run uncached meanwhile (still coalesced):
/// slower, never served a value older than a write. What it cannot know:
/// without a prefix, entries of a longer TTL that only other programs (or
/// other versions of this one) store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Suspect {
    /// The last overflow: a clear must start after it.
    since: Instant,
}

impl Suspect {
    /// When every entry that may predate it has expired.
    fn until(self) -> Instant {
        let longest = Duration::from_millis(crate::backend::longest_px());
        self.since + longest + Duration::from_secs(1)
    }
}

/// What the janitor has in hand, for callers to consult.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Placeholders of this process's leases waiting to be given back: a
    /// caller that finds one knows its holder is gone and may take the
    /// lease over it at once, instead of computing without storing.
    abandoned: HashSet<Vec<u8>>,
    /// Keys with an invalidation queued.
    invalidating: HashMap<String, Queued>,
    suspect: Option<Suspect>,
}

/// An invalidation in the ledger.
#[derive(Debug, Default)]
struct Queued {
    /// A write asked for it again since its last attempt started.
    asked_again: bool,
    /// Readers of this process skip the key until it is done: the `DEL`
    /// may not have reached the primary.
    readers_skip: bool,
    /// The `DEL` reached the primary under this epoch of the backend's
    /// primaries (see `Chore::Invalidate::landed`); readers skip the key
    /// under any other.
    landed: Option<u64>,
}

impl Janitor {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `placeholder` is a lease of this cache whose holder is gone.
    pub(crate) fn is_abandoned(&self, placeholder: &[u8]) -> bool {
        self.ledger().abandoned.contains(placeholder)
    }

    /// Whether a write of this process left `key` to be invalidated in
    /// the background (its own attempt failed or timed out): until that
    /// lands, the entry may be the old value, so readers of this process
    /// skip it. Read-your-writes within a process then holds even when an
    /// invalidation could not be delivered at once.
    /// `epoch`: the backend's primaries epoch now, asked for only when
    /// something is queued.
    pub(crate) fn is_invalidating(&self, key: &str, epoch: impl FnOnce() -> u64) -> bool {
        if self.invalidating.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let epoch = epoch();
        let mut ledger = self.ledger();
        if let Some(suspect) = ledger.suspect {
            // Its time may run out while the worker is busy elsewhere.
            if Instant::now() < suspect.until() {
                return true;
            }
            ledger.suspect = None;
            self.invalidating.fetch_sub(1, Ordering::SeqCst);
        }
        ledger.invalidating.get(key).is_some_and(|queued| {
            queued.readers_skip || queued.landed.is_some_and(|landed| landed != epoch)
        })
    }

    /// A breaker's probe found the backend (or a cluster primary) back.
    pub(crate) fn backend_back(&self) {
        if self.invalidating.load(Ordering::SeqCst) > 0 {
            self.retry_now.store(true, Ordering::SeqCst);
            self.wake.notify_one();
        }
    }

    /// When the cache stops being [`Suspect`] by itself, if it is.
    pub(crate) fn suspect_until(&self) -> Option<Instant> {
        Some(self.ledger().suspect?.until())
    }

    /// Whether the cache is [`Suspect`].
    pub(crate) fn is_suspect(&self) -> bool {
        self.ledger().suspect.is_some()
    }

    /// An invalidation did not fit: the cache is [`Suspect`] from now.
    pub(crate) fn suspect(&self) {
        let mut ledger = self.ledger();
        if ledger.suspect.is_none() {
            self.invalidating.fetch_add(1, Ordering::SeqCst);
        }
        ledger.suspect = Some(Suspect {
            since: Instant::now(),
        });
    }

    /// Ends the suspicion if nothing overflowed since `cleared` (when a
    /// clear that has finished started) or if its time has run out.
    pub(crate) fn clear_suspicion(&self, cleared: Option<Instant>) {
        let mut ledger = self.ledger();
        let Some(suspect) = ledger.suspect else {
            return;
        };
        let over = cleared.is_some_and(|started| suspect.since < started)
            || Instant::now() >= suspect.until();
        if over {
            ledger.suspect = None;
            self.invalidating.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Sets whether readers skip a queued key, after a retry: they do if it
    /// failed in a way that leaves open whether the primary that serves the
    /// key has the `DEL` (`landed: None`), and stop when a retry reached the
    /// primary under `landed` (only the replicas' acknowledgement was
    /// missing).
    pub(crate) fn readers_skip(&self, key: &str, landed: Option<u64>) {
        if let Some(queued) = self.ledger().invalidating.get_mut(key) {
            queued.readers_skip = landed.is_none();
            queued.landed = landed;
        }
    }

    /// Enters a chore in the ledger; `false` if a queued one covers it.
    pub(crate) fn enter(&self, chore: &Chore) -> bool {
        let mut ledger = self.ledger();
        match chore {
            Chore::Release { placeholder, .. } => {
                ledger.abandoned.insert(placeholder.clone());
                true
            }
            Chore::Invalidate { key, landed, .. } => {
                let (queued, new) = match ledger.invalidating.get_mut(key) {
                    Some(queued) => {
                        queued.asked_again = true;
                        (queued, false)
                    }
                    None => {
                        self.invalidating.fetch_add(1, Ordering::SeqCst);
                        (ledger.invalidating.entry(key.clone()).or_default(), true)
                    }
                };
                match landed {
                    // Two writes that landed under different epochs: the
                    // readers skip under both.
                    Some(epoch) if !queued.readers_skip => match queued.landed {
                        Some(earlier) if earlier != *epoch => queued.readers_skip = true,
                        _ => queued.landed = Some(*epoch),
                    },
                    Some(_) => {}
                    None => queued.readers_skip = true,
                }
                new
            }
        }
    }

    /// Takes a finished or dropped chore out of the ledger.
    pub(crate) fn strike(&self, chore: &Chore) {
        let mut ledger = self.ledger();
        match chore {
            Chore::Release { placeholder, .. } => {
                ledger.abandoned.remove(placeholder);
            }
            Chore::Invalidate { key, .. } => {
                if ledger.invalidating.remove(key).is_some() {
                    self.invalidating.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        drop(ledger);
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a write asked again for `key` since the flag was last reset;
    /// resets it.
    pub(crate) fn asked_again(&self, key: &str) -> bool {
        self.ledger()
            .invalidating
            .get_mut(key)
            .is_some_and(|queued| std::mem::take(&mut queued.asked_again))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalidate(key: &str, landed: Option<u64>) -> Chore {
        Chore::Invalidate {
            writer: None,
            key: key.to_owned(),
            tried: true,
            landed,
        }
    }

    #[test]
    fn readers_skip_a_landed_key_once_the_primaries_changed() {
        let janitor = Janitor::default();
        assert!(!janitor.is_invalidating("k", || 0), "nothing queued");
        // Reached its primary under epoch 3: the primary serves the write.
        assert!(janitor.enter(&invalidate("k", Some(3))));
        assert!(!janitor.is_invalidating("k", || 3));
        // A slot map later, the key may be on a replica promoted without it.
        assert!(janitor.is_invalidating("k", || 4));
        // A retry that reached the new primary (still unreplicated).
        janitor.readers_skip("k", Some(4));
        assert!(!janitor.is_invalidating("k", || 4));
        // A retry that failed in a way that leaves the primary unknown.
        janitor.readers_skip("k", None);
        assert!(janitor.is_invalidating("k", || 4));
        janitor.strike(&invalidate("k", None));
        assert!(!janitor.is_invalidating("k", || 4));
        assert_eq!(janitor.invalidating.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_suspect_cache_skips_every_key_until_its_suspicion_ends() {
        let janitor = Janitor::default();
        janitor.suspect();
        assert!(janitor.is_invalidating("any", || 0));
        let before = Instant::now() - Duration::from_millis(1);
        janitor.clear_suspicion(Some(before));
        assert!(janitor.is_suspect(), "a clear begun before the overflow");
        std::thread::sleep(Duration::from_millis(1));
        janitor.clear_suspicion(Some(Instant::now()));
        assert!(!janitor.is_invalidating("any", || 0), "cleared since");
        assert_eq!(janitor.invalidating.load(Ordering::SeqCst), 0);
        // Or once the longest expiry stored with has run out.
        janitor.suspect();
        janitor.clear_suspicion(None);
        assert!(janitor.is_suspect(), "within a second at least");
        let long_ago = Instant::now() - Duration::from_millis(crate::backend::longest_px() + 1001);
        janitor.ledger().suspect.as_mut().unwrap().since = long_ago;
        janitor.clear_suspicion(None);
        assert!(!janitor.is_suspect());
        assert_eq!(janitor.invalidating.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_write_that_did_not_land_makes_readers_skip_whatever_came_before() {
        let janitor = Janitor::default();
        assert!(janitor.enter(&invalidate("k", Some(1))));
        assert!(
            !janitor.enter(&invalidate("k", None)),
            "covered by the queued one"
        );
        assert!(janitor.is_invalidating("k", || 1));
        // Two landed writes under different maps: skip under both.
        assert!(janitor.enter(&invalidate("j", Some(1))));
        assert!(!janitor.enter(&invalidate("j", Some(2))));
        assert!(janitor.is_invalidating("j", || 1) && janitor.is_invalidating("j", || 2));
    }
}
