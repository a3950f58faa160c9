//! Clean-up that outlives the call that needed it: giving back the lease of
//! a call that was dropped or whose command timed out (and may still land),
//! and retrying an invalidation the write could not finish.
//!
//! One worker task per cache does all of it, with at most [`MAX_PENDING`]
//! chores, so the tasks, retries and log lines an outage costs are bounded
//! whatever the call rate. Off a cluster it does not wait for the circuit
//! breaker: it pays the op timeout itself, one attempt at a time (one for
//! every key while the server does not answer), so clean-up lands as soon
//! as the backend answers again; on a cluster it skips a primary whose
//! breaker is open, and starts its probe.
//!
//! Invalidations are queued per key, and one queued invalidation of a key
//! covers every write of that key until its next attempt starts: an outage
//! costs one pending retry per distinct key, however many writes there are.
//!
//! An invalidation is kept until it is delivered, however long the backend
//! is away (a restart from its AOF or RDB file brings back the entries it
//! had): readers of this process skip its key until then, and once the
//! backend answers again the key is deleted within a few hundred
//! milliseconds, before it is read from there. Only an error that no retry can mend (an ACL that
//! refuses `DEL`) gives one up, counted as lost and logged.
//!
//! At most [`MAX_PENDING`] chores are kept (about 300 bytes each). A lease
//! that does not fit expires by itself after its lease time. An
//! invalidation that does not fit makes the whole cache suspect (see
//! [`Suspect`]): readers of this process skip every key until every entry
//! that may predate it is gone. The worker holds no strong reference to
//! the cache: it ends when the cache is dropped. On the in-process backend
//! a chore cannot fail or stall, so it runs at once, in the caller.
//!
//! What this cannot cover: invalidations pending in a process that exits
//! (or crashes) before the backend is back; their entries stay until their
//! TTL.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cache::{Cache, WeakCache};
use crate::error::CacheError;
use crate::stats::Event;
use crate::stats::Function;

/// Chores kept at most, queued and waiting for a retry: distinct keys for
/// invalidations (a key's writes share one).
pub(crate) const MAX_PENDING: usize = 64 * 1024;
/// How often an invalidation whose breaker is open (the backend, or its
/// cluster primary, is down) looks again: nothing is sent meanwhile, and
/// its readers in this process skip the key.
const WHILE_A_SHARD_IS_DOWN: Duration = Duration::from_millis(100);
/// How often a suspect cache tries to clear its entries (see [`Suspect`]).
const CLEAR_RETRY: Duration = Duration::from_secs(1);
/// Pauses between attempts to give a lease back: short, because a live
/// placeholder makes other callers compute (or wait).
const FIRST_RELEASE_RETRY: Duration = Duration::from_millis(10);
const LONGEST_RELEASE_RETRY: Duration = Duration::from_millis(100);
/// The pause before each retry of an invalidation, until it is
/// delivered: short, so that a backend that comes back has its keys
/// deleted at once (readers skip them until then), and cheap, since off a
/// cluster an unreachable backend holds back every key's retry behind one
/// attempt (`invalidate_due`).
const INVALIDATION_RETRY: Duration = Duration::from_millis(250);
/// Retries of an invalidation that failed in a way no retry mends (a
/// refusal) before it is given up.
const HOPELESS_ATTEMPTS: usize = 3;

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
    queue: Mutex<Option<mpsc::UnboundedSender<Chore>>>,
    /// Chores submitted and not finished: 0 once everything is cleaned up.
    pending: AtomicUsize,
    /// Keys in `Ledger::invalidating`, plus one while the cache is
    /// [`Suspect`]: readers look further only when it is not 0, so the hot
    /// path costs one atomic load.
    invalidating: AtomicUsize,
    ledger: Mutex<Ledger>,
    /// Wakes the worker when the cache becomes [`Suspect`], or when a
    /// breaker's probe found the backend back.
    wake: std::sync::Arc<tokio::sync::Notify>,
    /// Set with a wake when the backend is back: every pending invalidation
    /// is due at once, so that a returning server has them before readers
    /// stop skipping their keys (instead of at the end of their back-off).
    retry_now: std::sync::atomic::AtomicBool,
}

/// An invalidation did not fit in [`MAX_PENDING`]: its key is not known
/// any more, so readers of this process skip every key until every entry
/// that may predate it is gone: once the longest expiry this process has
/// stored with or read a function with (see [`crate::backend::longest_px`])
/// has run out since the overflow, or, with a cache prefix, sooner, when a
/// [`Cache::clear`] started after the overflow has finished (tried every
/// [`CLEAR_RETRY`]). Calls run uncached meanwhile (still coalesced):
/// slower, never served a value older than a write. What it cannot know:
/// without a prefix, entries of a longer TTL that only other programs (or
/// other versions of this one) store.
#[derive(Debug, Clone, Copy)]
struct Suspect {
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
struct Ledger {
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

    /// Whether the cache is [`Suspect`].
    pub(crate) fn is_suspect(&self) -> bool {
        self.ledger().suspect.is_some()
    }

    /// An invalidation did not fit: the cache is [`Suspect`] from now.
    fn suspect(&self) {
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
    fn clear_suspicion(&self, cleared: Option<Instant>) {
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
    fn readers_skip(&self, key: &str, landed: Option<u64>) {
        if let Some(queued) = self.ledger().invalidating.get_mut(key) {
            queued.readers_skip = landed.is_none();
            queued.landed = landed;
        }
    }

    /// Enters a chore in the ledger; `false` if a queued one covers it.
    fn enter(&self, chore: &Chore) -> bool {
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
    fn strike(&self, chore: &Chore) {
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
    fn asked_again(&self, key: &str) -> bool {
        self.ledger()
            .invalidating
            .get_mut(key)
            .is_some_and(|queued| std::mem::take(&mut queued.asked_again))
    }
}

impl Cache {
    /// Hands a chore to the janitor; see the module docs.
    pub(crate) fn tidy(&self, chore: Chore) {
        if let Some(memory) = self.backend().as_memory() {
            // Cannot fail: no retry, no task.
            match chore {
                Chore::Release {
                    key, placeholder, ..
                } => {
                    if memory.compare_and_delete(&key, &placeholder) {
                        self.recorder().record(None, Event::Compensation);
                    }
                }
                Chore::Invalidate { writer, key, .. } => {
                    memory.delete(std::slice::from_ref(&key));
                    if let Some(event) = crate::tag::invalidation_of(&key) {
                        self.recorder().record(writer, event);
                    }
                }
            }
            return;
        }
        let janitor = &self.janitor();
        if janitor.pending.load(Ordering::SeqCst) >= MAX_PENDING {
            // Not entered: a queued invalidation of its key covers it
            // only until its next attempt starts.
            return self.overflow(chore);
        }
        if !janitor.enter(&chore) {
            return;
        }
        janitor.pending.fetch_add(1, Ordering::SeqCst);
        let mut queue = janitor.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let chore = match queue.as_ref() {
            None => chore,
            Some(sender) => match sender.send(chore) {
                Ok(()) => return,
                Err(mpsc::error::SendError(chore)) => chore,
            },
        };
        // No worker yet, or its runtime has shut down: start one here.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            drop(queue);
            return self.drop_chore(chore, "no Tokio runtime to run it");
        };
        let (sender, receiver) = mpsc::unbounded_channel();
        let _ = sender.send(chore);
        *queue = Some(sender);
        runtime.spawn(work(Worker {
            cache: self.downgrade(),
            queue: receiver,
            pending: Vec::new(),
            clear_due: None,
            wake: janitor.wake.clone(),
            epoch: matches!(self.backend(), crate::backend::Backend::Cluster(_))
                .then(|| self.backend().primaries_epoch()),
        }));
    }

    /// Chores submitted to the janitor and not finished yet.
    #[cfg(feature = "__testing")]
    pub(crate) fn pending_chores(&self) -> usize {
        self.janitor().pending.load(Ordering::SeqCst)
    }

    /// A chore that does not fit in [`MAX_PENDING`]: a lease expires by
    /// itself; an invalidation makes the cache [`Suspect`].
    fn overflow(&self, chore: Chore) {
        let Chore::Invalidate { writer, key, .. } = chore else {
            return;
        };
        self.recorder().record(writer, Event::Error);
        self.janitor().suspect();
        crate::limited!(
            self,
            error!(
                key,
                pending = MAX_PENDING,
                "too many cache invalidations are waiting for the backend: every key is read \
                 uncached until the entries that may predate them are gone"
            )
        );
        // The worker clears (with a prefix) or waits.
        self.janitor().wake.notify_one();
    }

    fn drop_chore(&self, chore: Chore, why: &'static str) {
        self.janitor().strike(&chore);
        if let Chore::Invalidate { writer, key, .. } = chore {
            self.recorder().record(writer, Event::LostInvalidation);
            crate::limited!(
                self,
                error!(
                    key,
                    why, "cache invalidation lost: the entry stays until its TTL"
                )
            );
        }
    }
}

/// A chore and when to try it next.
struct Pending {
    chore: Chore,
    due: Instant,
    attempts: usize,
}

/// The worker's state. Dropped with the worker's task (its runtime shut
/// down while the cache lives on), it takes its chores out of the ledger,
/// so that a later write of their keys is queued anew, not taken as covered.
struct Worker {
    cache: WeakCache,
    queue: mpsc::UnboundedReceiver<Chore>,
    pending: Vec<Pending>,
    /// While the cache is [`Suspect`] and has a prefix: when to try
    /// clearing it next.
    clear_due: Option<Instant>,
    /// [`Janitor::wake`].
    wake: std::sync::Arc<tokio::sync::Notify>,
    /// The backend's primaries epoch when last looked at; `None` for a
    /// backend whose primaries do not move under it (not a cluster).
    epoch: Option<u64>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let Some(cache) = self.cache.upgrade() else {
            return;
        };
        let queued = std::iter::from_fn(|| self.queue.try_recv().ok());
        let chores: Vec<Chore> = self
            .pending
            .drain(..)
            .map(|p| p.chore)
            .chain(queued)
            .collect();
        for chore in chores {
            cache.drop_chore(chore, "the runtime running the clean-up shut down");
        }
    }
}

/// Built before the task is spawned, so that a task dropped before its
/// first poll still drops a `Worker`.
async fn work(mut worker: Worker) {
    loop {
        let Some(cache) = worker.cache.upgrade() else {
            return;
        };
        let next = worker.next_due(&cache);
        drop(cache);
        let wake = worker.wake.notified();
        let received = tokio::select! {
            chore = worker.queue.recv() => match chore {
                Some(chore) => Some(chore),
                None => return, // the cache is gone
            },
            () = sleep_until(next) => None,
            () = wake => None,
        };
        let Some(cache) = worker.cache.upgrade() else {
            return;
        };
        worker.hurry_when_told(&cache);
        worker.admit(&cache, received);
        // First: until it is done, every key is read uncached; and it
        // deletes what the pending invalidations would (they follow).
        cache.end_suspicion(&mut worker.clear_due).await;
        if !(cache.has_prefix() && cache.janitor().is_suspect()) {
            cache.invalidate_due(&mut worker.pending).await;
        }
        release_due(&cache, &mut worker.pending).await;
    }
}

impl Worker {
    /// When the next chore is due: the earliest pending one (invalidations
    /// wait while a clear is to come: it goes first), a look at the
    /// primaries now and then while invalidations wait on a cluster, and
    /// the end of a [`Suspect`] state.
    fn next_due(&self, cache: &Cache) -> Option<Instant> {
        let clearing = cache.has_prefix() && cache.janitor().is_suspect();
        let suspect = suspicion_due(cache, self.clear_due);
        let is_invalidation = |p: &&Pending| matches!(p.chore, Chore::Invalidate { .. });
        let mut next = self
            .pending
            .iter()
            .filter(|p| !(clearing && is_invalidation(p)))
            .map(|p| p.due)
            .min();
        if self.epoch.is_some() && self.pending.iter().any(|p| is_invalidation(&p)) {
            let soon = Instant::now() + WHILE_A_SHARD_IS_DOWN;
            next = Some(next.map_or(soon, |next| next.min(soon)));
        }
        match (next, suspect) {
            (Some(next), Some(due)) => Some(next.min(due)),
            (next, due) => next.or(due),
        }
    }

    /// Pending invalidations are retried at once when the backend came
    /// back (a breaker's probe succeeded), and when a key moved to another
    /// primary (a failover, say): there, instead of at the end of their
    /// back-off, as their readers skip the keys until then.
    fn hurry_when_told(&mut self, cache: &Cache) {
        let back = cache.janitor().retry_now.swap(false, Ordering::SeqCst);
        if back {
            self.clear_due = None;
        }
        let now_epoch = cache.backend().primaries_epoch();
        let moved = self.epoch.is_some_and(|seen| seen != now_epoch);
        if moved {
            self.epoch = Some(now_epoch);
        }
        if back || moved {
            let now = Instant::now();
            for pending in &mut self.pending {
                if matches!(pending.chore, Chore::Invalidate { .. }) {
                    pending.due = pending.due.min(now);
                }
            }
        }
    }

    /// Takes `received` and whatever else is queued into the pending
    /// chores, up to [`MAX_PENDING`].
    fn admit(&mut self, cache: &Cache, received: Option<Chore>) {
        let queue = &mut self.queue;
        for chore in received
            .into_iter()
            .chain(std::iter::from_fn(|| queue.try_recv().ok()))
        {
            if self.pending.len() >= MAX_PENDING {
                // Submitters that raced past the bound together.
                cache.janitor().strike(&chore);
                cache.overflow(chore);
                continue;
            }
            let tried = matches!(chore, Chore::Invalidate { tried: true, .. });
            self.pending.push(Pending {
                chore,
                due: Instant::now()
                    + if tried {
                        INVALIDATION_RETRY
                    } else {
                        Duration::ZERO
                    },
                attempts: usize::from(tried),
            });
        }
    }
}

/// Gives back the leases whose release is due; those that are done leave
/// `pending`.
async fn release_due(cache: &Cache, pending: &mut Vec<Pending>) {
    let mut i = 0;
    while i < pending.len() {
        if pending[i].due > Instant::now() || !matches!(pending[i].chore, Chore::Release { .. }) {
            i += 1;
            continue;
        }
        match cache.release(&mut pending[i]).await {
            Some(next) => {
                pending[i].due = next;
                i += 1;
            }
            None => {
                let done = pending.swap_remove(i);
                cache.janitor().strike(&done.chore);
            }
        }
    }
}

/// When the worker should look at the cache's [`Suspect`] state next, if
/// it is suspect: when its time runs out, or (with a prefix) when the
/// next clear is due, if sooner.
fn suspicion_due(cache: &Cache, clear_due: Option<Instant>) -> Option<Instant> {
    let until = cache.janitor().ledger().suspect?.until();
    if !cache.has_prefix() {
        return Some(until);
    }
    Some(until.min(clear_due.unwrap_or_else(Instant::now)))
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

impl Cache {
    /// Ends the cache's [`Suspect`] state when it may: with a prefix, by
    /// clearing every entry (tried again after [`CLEAR_RETRY`] if it
    /// fails); without, once its time has run out.
    async fn end_suspicion(&self, clear_due: &mut Option<Instant>) {
        let janitor = &self.janitor();
        janitor.clear_suspicion(None);
        if !janitor.is_suspect() {
            *clear_due = None;
            return;
        }
        if !self.has_prefix() || clear_due.is_some_and(|due| due > Instant::now()) {
            return;
        }
        let started = Instant::now();
        match self.clear().await {
            Ok(cleared) => {
                janitor.clear_suspicion(Some(started));
                *clear_due = None;
                tracing::warn!(
                    cleared,
                    "cache cleared after too many invalidations waited for the backend; \
                     keys are read from the cache again"
                );
            }
            Err(error) => {
                *clear_due = Some(Instant::now() + CLEAR_RETRY);
                if error.is_unavailable() {
                    tracing::debug!(%error, "the suspect cache could not be cleared yet");
                } else {
                    crate::limited!(
                        self,
                        warn!(%error, "the cache cannot clear its entries (an ACL without SCAN or UNLINK?): every key is read uncached until its longest TTL has run out")
                    );
                }
            }
        }
    }

    /// One attempt at giving a lease back: when to try again, or `None`
    /// when done.
    async fn release(&self, pending: &mut Pending) -> Option<Instant> {
        pending.attempts += 1;
        let Chore::Release {
            key,
            placeholder,
            until,
        } = &pending.chore
        else {
            return None;
        };
        if Instant::now() >= *until {
            return None; // expired by itself
        }
        let delete = self.backend().compare_and_delete(key, placeholder);
        match self.timed(key, delete).await {
            Ok(deleted) => {
                if deleted {
                    self.recorder().record(None, Event::Compensation);
                }
                None
            }
            Err(error) if error.is_unavailable() => {
                let pause = FIRST_RELEASE_RETRY * (1 << pending.attempts.min(5));
                Some(Instant::now() + pause.min(LONGEST_RELEASE_RETRY))
            }
            Err(_) => None,
        }
    }

    /// One attempt at every invalidation that is due, one key after the
    /// other: each key fails alone (a `DEL` of many fails for all of them
    /// when one slot's part fails, as it keeps doing while a cluster
    /// connection catches up with a failover), and a burst of attempts
    /// would hold the cluster connection's requests while it re-reads the
    /// slots. Takes the finished ones out of `pending`.
    async fn invalidate_due(&self, pending: &mut Vec<Pending>) {
        let now = Instant::now();
        let due: Vec<usize> = (0..pending.len())
            .filter(|&at| {
                pending[at].due <= now && matches!(pending[at].chore, Chore::Invalidate { .. })
            })
            .collect();
        let mut done = Vec::new();
        let janitor = &self.janitor();
        let backend = &self.backend();
        // Off a cluster, every key is on the one primary: once it is found
        // unreachable (or its replicas lagging), the other keys wait with
        // the first (one attempt per retry delay, not one per key).
        let one_primary = !matches!(backend, crate::backend::Backend::Cluster(_));
        let mut unreachable_until = None;
        // On a cluster, a tag is invalidated only once every tag clock
        // this process still has to tick has ticked (see `crate::tag`):
        // the clocks are tried first, and while one is left, the tags
        // wait. Off a cluster, a tag and its clock went in one `DEL`.
        let is_clock = |p: &Pending| matches!(&p.chore, Chore::Invalidate { key, .. } if crate::tag::is_clock(key));
        let mut due = due;
        due.sort_by_key(|&at| !is_clock(&pending[at]));
        let mut clocks_left = !one_primary && pending.iter().any(|p| is_clock(p) && p.due > now);
        for at in due {
            let pending = &mut pending[at];
            if let Some(next) = unreachable_until {
                pending.due = next;
                continue;
            }
            let Chore::Invalidate { key, .. } = &pending.chore else {
                continue;
            };
            if clocks_left && crate::tag::clock_of(key).is_some() {
                continue;
            }
            pending.attempts += 1;
            // Writes that asked until now are covered by this attempt, and
            // a new one gets a whole retry window.
            if janitor.asked_again(key) {
                pending.attempts = 1;
            }
            let epoch = backend.primaries_epoch();
            let deleted = self
                .timed(key, backend.delete_durably(std::slice::from_ref(key)))
                .await;
            if deleted.is_ok() {
                self.announce(std::slice::from_ref(key)).await;
            }
            let unreachable = one_primary
                && deleted
                    .as_ref()
                    .is_err_and(|e| e.is_unavailable() || e.is_not_replicated());
            if !one_primary && deleted.is_err() && crate::tag::is_clock(key) {
                clocks_left = true;
            }
            match self.settle_invalidation(pending, deleted.as_ref().map(drop), epoch) {
                Some(next) => {
                    pending.due = next;
                    if unreachable {
                        unreachable_until = Some(next);
                    }
                }
                None => done.push(at),
            }
        }
        // Highest first, so that each removal leaves the others in place.
        done.sort_unstable();
        for at in done.into_iter().rev() {
            let finished = pending.swap_remove(at);
            self.janitor().strike(&finished.chore);
        }
    }

    /// What an attempt at an invalidation, sent under the primaries'
    /// `epoch`, leads to: when to try again, or `None` when done (or lost,
    /// counted and logged).
    fn settle_invalidation(
        &self,
        pending: &mut Pending,
        outcome: Result<(), &CacheError>,
        epoch: u64,
    ) -> Option<Instant> {
        let janitor = &self.janitor();
        let Chore::Invalidate { writer, key, .. } = &pending.chore else {
            return None;
        };
        match outcome {
            Ok(()) => {
                if let Some(event) = crate::tag::invalidation_of(key) {
                    self.recorder().record(*writer, event);
                }
                if pending.attempts > 1 {
                    tracing::debug!(key, "cache invalidation succeeded on retry");
                }
                // A write during the attempt may have committed after the
                // DEL: once more.
                janitor.asked_again(key).then(Instant::now)
            }
            // An open breaker (the backend's, or a cluster primary's):
            // nothing was sent, so the attempt is not counted, and the next
            // one comes soon after the backend is back (or, on a cluster,
            // failed over and the slot map says so), instead of at the end
            // of a back-off.
            Err(CacheError::CircuitOpen) => {
                pending.attempts -= 1;
                Some(Instant::now() + WHILE_A_SHARD_IS_DOWN)
            }
            Err(error) => {
                self.recorder().record(*writer, Event::Error);
                janitor.readers_skip(key, error.is_not_replicated().then_some(epoch));
                let delay = INVALIDATION_RETRY;
                if error.is_unavailable() || error.is_not_replicated() {
                    // Kept until delivered: see the module docs.
                    return Some(Instant::now() + delay);
                }
                if pending.attempts < HOPELESS_ATTEMPTS {
                    return Some(Instant::now() + delay);
                }
                if janitor.asked_again(key) {
                    pending.attempts = 1;
                    return Some(Instant::now() + INVALIDATION_RETRY);
                }
                self.recorder().record(*writer, Event::LostInvalidation);
                crate::limited!(
                    self,
                    error!(key, %error, "cache invalidation refused by the backend: the entry stays until its TTL")
                );
                None
            }
        }
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
