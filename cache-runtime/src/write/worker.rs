//! The janitor's worker: clean-up that outlives the call that needed it,
//! the chores of [`crate::cache::janitor`] done in the background.
//!
//! One worker task per cache does all of it, with at most
//! [`MAX_PENDING`] chores, so the tasks, retries and log lines an outage
//! costs are bounded whatever the call rate. Off a cluster it does not
//! wait for the circuit breaker: it pays the op timeout itself, one
//! attempt at a time (one for every key while the server does not
//! answer), so clean-up lands as soon as the backend answers again; on a
//! cluster it skips a primary whose breaker is open, and starts its probe.
//!
//! An invalidation is kept until it is delivered, however long the backend
//! is away (a restart from its AOF or RDB file brings back the entries it
//! had): readers of this process skip its key until then, and once the
//! backend answers again the key is deleted within a few hundred
//! milliseconds, before it is read from there. Only an error that no retry
//! can mend (an ACL that refuses `DEL`) gives one up, counted as lost and
//! logged.
//!
//! A lease that does not fit in [`MAX_PENDING`] expires by itself after
//! its lease time; an invalidation that does not fit makes the cache
//! suspect (see [`crate::cache::janitor`]). The worker holds no strong
//! reference to the cache (a [`WeakCache`]: it uses the cache's operation
//! runner, backend, statistics, local tier and ledger, which is the whole
//! handle but the read path), and ends when the cache is dropped. On the
//! in-process backend a chore cannot fail or stall, so it runs at once, in
//! the caller.
//!
//! What this cannot cover: invalidations pending in a process that exits
//! (or crashes) before the backend is back; their entries stay until their
//! TTL.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::cache::janitor::{Chore, MAX_PENDING};
use crate::cache::{Cache, WeakCache};
use crate::error::CacheError;
use crate::stats::Event;

/// How often an invalidation whose breaker is open (the backend, or its
/// cluster primary, is down) looks again: nothing is sent meanwhile, and
/// its readers in this process skip the key.
const WHILE_A_SHARD_IS_DOWN: Duration = Duration::from_millis(100);
/// How often a suspect cache tries to clear its entries (see `janitor::Suspect`).
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
    /// itself; an invalidation makes the cache [`Suspect`](crate::cache::janitor::Suspect).
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
    /// While the cache is [`Suspect`](crate::cache::janitor::Suspect) and has a prefix: when to try
    /// clearing it next.
    clear_due: Option<Instant>,
    /// [`Janitor::wake`](crate::cache::janitor::Janitor::wake).
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
    /// the end of a [`Suspect`](crate::cache::janitor::Suspect) state.
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

/// When the worker should look at the cache's [`Suspect`](crate::cache::janitor::Suspect) state next, if
/// it is suspect: when its time runs out, or (with a prefix) when the
/// next clear is due, if sooner.
fn suspicion_due(cache: &Cache, clear_due: Option<Instant>) -> Option<Instant> {
    let until = cache.janitor().suspect_until()?;
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
    /// Ends the cache's [`Suspect`](crate::cache::janitor::Suspect) state when it may: with a prefix, by
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
        // A tag is invalidated only once every tag clock this process
        // still has to tick has ticked, on its primary at least (see
        // `crate::tag`): the clocks are tried first, and while one is
        // left, the tags wait (retries are one `DEL` per key, on any
        // backend).
        let is_clock = |p: &Pending| matches!(&p.chore, Chore::Invalidate { key, .. } if crate::tag::is_clock(key));
        let mut due = due;
        due.sort_by_key(|&at| !is_clock(&pending[at]));
        let mut clocks_left = pending.iter().any(|p| is_clock(p) && p.due > now);
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
                pending.due = Instant::now() + WHILE_A_SHARD_IS_DOWN;
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
            if crate::tag::is_clock(key) && deleted.as_ref().is_err_and(|e| !e.is_not_replicated())
            {
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
