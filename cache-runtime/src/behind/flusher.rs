//! The flusher: one task per shard of a queue, in each process that runs
//! one; a lease in Redis lets one process at a time flush a shard, so
//! that the changes of a key reach the database in their order.
//!
//! A shard's holder claims what its previous holder had read and not
//! acknowledged (`XAUTOCLAIM`), then reads new changes (`XREADGROUP`),
//! flushes them in batches, settles their entries (the TTL back) and
//! acknowledges them (`XACK` + `XDEL`). A failed flush is retried with
//! backoff, in smaller batches; a change that keeps failing alone while
//! other changes flush goes to the dead letters.

use std::collections::{HashSet, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use tokio::sync::watch;

use super::stream::{self, Delivered};
use super::{Change, ShardKeys, WriteBehindError, WriteQueue};
use crate::cache::{Cache, WeakCache, within};
use crate::error::CacheError;
use crate::stats::QueueEvent;

/// What a flush of one batch came to.
enum Flushed {
    Done,
    Failed(String),
    /// The change at this index of the batch does not decode: no flush
    /// can take it.
    Undecodable(usize, String),
}

type Handler =
    dyn Fn(Cache, Vec<Delivered>) -> Pin<Box<dyn Future<Output = Flushed> + Send>> + Send + Sync;

/// The settings of a flusher, from [`Cache::flusher`].
#[must_use = "a flusher does nothing until `spawn`"]
pub struct FlusherBuilder<V> {
    cache: Cache,
    queue: WriteQueue<V>,
    handler: Arc<Handler>,
    settings: Settings,
}

#[derive(Debug, Clone)]
struct Settings {
    batch: usize,
    coalesce: bool,
    max_attempts: u32,
    flush_timeout: Duration,
    lease: Duration,
    poll: Duration,
}

impl Cache {
    /// A flusher of `queue`, calling `flush` with batches of changes.
    /// Run one in every process of the service (or in a few): each shard
    /// is flushed by one of them at a time, and another takes over the
    /// shards of one that stopped or died.
    ///
    /// `flush` must write every change of the batch or fail: the batch's
    /// changes are acknowledged only when it returns `Ok`, and retried
    /// otherwise. A change may be seen twice (after a crash, or a flush
    /// that timed out and had written it): write it idempotently, by its
    /// [`Change::version`].
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, Change, WriteQueue};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct User { id: u64 }
    /// # #[derive(Clone)] struct Db;
    /// # impl Db { async fn upsert(&self, _: &[Change<User>]) -> Result<(), String> { Ok(()) } }
    /// # const USERS: WriteQueue<User> = WriteQueue::new("users");
    /// # async fn run(cache: Cache, db: Db) -> Result<(), cache_runtime::WriteBehindError> {
    /// let flusher = cache
    ///     .flusher(&USERS, move |changes: Vec<Change<User>>| {
    ///         let db = db.clone();
    ///         async move { db.upsert(&changes).await }
    ///     })
    ///     .batch(500)
    ///     .spawn()?;
    /// // ... at shutdown: finish the batch in hand and let others take over.
    /// flusher.stop().await;
    /// # Ok(()) }
    /// ```
    pub fn flusher<V, F, Fut, E>(&self, queue: &WriteQueue<V>, flush: F) -> FlusherBuilder<V>
    where
        V: DeserializeOwned + Send + 'static,
        F: Fn(Vec<Change<V>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let flush = Arc::new(flush);
        let handler = move |cache: Cache, batch: Vec<Delivered>| {
            let flush = Arc::clone(&flush);
            // Decoded inside the future, so that a `Deserialize` that
            // panics is caught with the flush (see `Shard::run`).
            Box::pin(async move {
                let codec = cache.codec();
                let decoded: Result<Vec<Change<V>>, (usize, String)> = batch
                    .iter()
                    .enumerate()
                    .map(|(i, change)| {
                        let bytes = change.value.get(change.at..).unwrap_or_default();
                        let value = cache
                            .decoding(bytes, |bytes| codec.decode::<V>(bytes))
                            .map_err(|error| (i, error.to_string()))?;
                        let key = match cache.prefix() {
                            Some(prefix) => change
                                .key
                                .strip_prefix(prefix)
                                .and_then(|k| k.strip_prefix(':'))
                                .unwrap_or(&change.key),
                            None => &change.key,
                        };
                        Ok(Change {
                            key: key.to_owned(),
                            value,
                            version: change.version,
                        })
                    })
                    .collect();
                drop(cache);
                match decoded {
                    Err((i, error)) => Flushed::Undecodable(i, error),
                    Ok(changes) => match flush(changes).await {
                        Ok(()) => Flushed::Done,
                        Err(error) => Flushed::Failed(error.to_string()),
                    },
                }
            }) as Pin<Box<dyn Future<Output = Flushed> + Send>>
        };
        FlusherBuilder {
            cache: self.clone(),
            queue: *queue,
            handler: Arc::new(handler),
            settings: Settings {
                batch: 100,
                coalesce: false,
                max_attempts: 5,
                flush_timeout: Duration::from_secs(10),
                lease: Duration::from_secs(30),
                poll: Duration::from_millis(100),
            },
        }
    }
}

impl<V> FlusherBuilder<V> {
    /// The most changes one flush gets (100 by default; 1 to 1,000).
    pub fn batch(mut self, changes: usize) -> Self {
        self.settings.batch = changes.clamp(1, 1000);
        self
    }

    /// Flush only the last of the changes of a key that are waiting, and
    /// acknowledge the earlier ones with it (by default, every change is
    /// flushed, in order, never two of one key in one batch).
    pub fn coalesce(mut self) -> Self {
        self.settings.coalesce = true;
        self
    }

    /// How many times a change is flushed alone and fails, while other
    /// changes flush, before it goes to the dead letters (5 by default;
    /// at least 1). While no change flushes (the database is down), none
    /// is dead-lettered: they wait.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.settings.max_attempts = attempts.max(1);
        self
    }

    /// How long one flush may take before it is dropped and counted as a
    /// failure (10 s by default). Keep it well under the lease.
    pub fn flush_timeout(mut self, timeout: Duration) -> Self {
        self.settings.flush_timeout = timeout;
        self
    }

    /// How long a shard stays with a flusher that stopped renewing it (it
    /// died, or lost Redis): the time before another process claims its
    /// changes (30 s by default). Raised to 3 × the flush timeout if
    /// shorter, so that a slow flush is dropped before the next holder
    /// flushes the same changes.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.settings.lease = lease.max(Duration::from_millis(300));
        self
    }

    /// How often an empty shard is read again (100 ms by default).
    pub fn poll(mut self, poll: Duration) -> Self {
        self.settings.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// Starts the flusher: a task per shard on the current Tokio runtime.
    /// Fails if the queue's name or shard count cannot be used.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn spawn(self) -> Result<Flusher, WriteBehindError> {
        self.queue.check()?;
        let (stop, stopped) = watch::channel(false);
        let consumer = format!("{:016x}", fastrand::u64(..));
        let mut settings = self.settings;
        // A flush must end (or be dropped) well before its shard can pass
        // to another process, or two would flush one key's changes at once.
        settings.lease = settings.lease.max(settings.flush_timeout * 3);
        let settings = Arc::new(settings);
        let successes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks: Vec<_> = (0..self.queue.shard_count())
            .map(|shard| {
                let shard = Shard {
                    cache: self.cache.downgrade(),
                    queue: self.queue.name(),
                    keys: ShardKeys::of(&self.cache, self.queue.name(), shard),
                    consumer: consumer.clone(),
                    token: format!("{consumer}{:016x}", fastrand::u64(..)),
                    handler: Arc::clone(&self.handler),
                    settings: Arc::clone(&settings),
                    stopped: stopped.clone(),
                    successes: Arc::clone(&successes),
                };
                tokio::spawn(shard.run())
            })
            .collect();
        tasks.push(tokio::spawn(watch_depth(
            self.cache.downgrade(),
            self.queue.name(),
            self.queue.shard_count(),
            stopped,
        )));
        Ok(Flusher { tasks, stop })
    }
}

/// A running flusher ([`Cache::flusher`]). Dropping it stops its tasks
/// where they are (a batch being flushed is flushed again by the next
/// holder of its shard, after the lease); [`Flusher::stop`] stops them
/// between batches and hands the shards over at once.
#[derive(Debug)]
pub struct Flusher {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Flusher {
    /// Stops after the batches in hand, and releases the shards so that
    /// another process's flusher takes them over without waiting for the
    /// lease.
    ///
    /// Cancel safe: dropping the future stops the tasks where they are,
    /// as dropping the flusher does.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Reads the queue's depth every few seconds, for [`crate::QueueStats`]
/// and the gauges.
async fn watch_depth(
    cache: WeakCache,
    queue: &'static str,
    shards: u16,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if let Ok(status) = stream::status(&cache, queue, shards).await {
            let oldest = status.oldest.map_or(0, |o| o.as_millis() as u64);
            cache
                .recorder()
                .note_queue(queue, QueueEvent::Depth(status.pending, oldest));
        }
        drop(cache);
        if pause(&mut stopped, Duration::from_secs(5)).await {
            return;
        }
    }
}

/// Sleeps `duration`; whether the flusher was stopped meanwhile.
async fn pause(stopped: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *stopped.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(duration) => *stopped.borrow(),
        changed = stopped.changed() => changed.is_err() || *stopped.borrow(),
    }
}

/// A change read and not acknowledged yet.
struct Pending {
    change: Delivered,
    /// Flushes of this change alone that failed.
    alone: u32,
    /// The flusher's count of good flushes (every shard's) when it first
    /// failed alone.
    successes_then: u64,
}

/// The changes a flush gets, and those it settles with them: `flushed`
/// indexes `work`; `acked` (in `work` too) includes them and, when
/// coalescing, the earlier changes of their keys.
struct Batch {
    flushed: Vec<usize>,
    acked: Vec<usize>,
}

/// One shard's flushing loop.
struct Shard {
    cache: WeakCache,
    queue: &'static str,
    keys: ShardKeys,
    consumer: String,
    token: String,
    handler: Arc<Handler>,
    settings: Arc<Settings>,
    stopped: watch::Receiver<bool>,
    /// Good flushes of the flusher's shards: that the database takes
    /// writes, which a change that keeps failing alone is judged by.
    successes: Arc<std::sync::atomic::AtomicU64>,
}

/// What a shard's loop does after a turn.
enum Turn {
    /// Goes on at once.
    Again,
    /// Waits, then goes on.
    Wait(Duration),
    /// Lets go of what it holds in hand (its lease is lost, or what the
    /// stream holds is unsure), waits (if not zero), then goes on.
    LetGo(Duration),
}

/// What a shard's loop keeps between turns.
struct Progress {
    /// Whether this shard's lease is ours.
    held: bool,
    /// The changes read and not acknowledged, in stream order.
    work: VecDeque<Pending>,
    /// Where claiming what earlier holders left goes on (`None`: done,
    /// new changes are read).
    claim: Option<String>,
    /// How many changes a batch takes now (halved while batches fail).
    limit: usize,
    failures_in_a_row: u32,
    /// The front change failed in the last attempt: try another key.
    probe: bool,
}

impl Shard {
    async fn run(mut self) {
        let mut progress = Progress {
            held: false,
            work: VecDeque::new(),
            claim: None,
            limit: self.settings.batch,
            failures_in_a_row: 0,
            probe: false,
        };
        loop {
            if *self.stopped.borrow() {
                break;
            }
            let Some(cache) = self.cache.upgrade() else {
                return;
            };
            let turn = self.turn(&mut progress, &cache).await;
            // Not kept while waiting: a flusher does not keep its cache alive.
            drop(cache);
            let wait = match turn {
                Turn::Again => continue,
                Turn::Wait(wait) => wait,
                Turn::LetGo(wait) => {
                    progress.held = false;
                    progress.work.clear();
                    wait
                }
            };
            if !wait.is_zero() && self.pause(wait).await {
                break;
            }
        }
        if progress.held
            && let Some(cache) = self.cache.upgrade()
        {
            self.release(&cache).await;
        }
    }

    /// One turn: the lease held, the work filled, one batch flushed and
    /// settled (or its failure handled).
    async fn turn(&self, progress: &mut Progress, cache: &Cache) -> Turn {
        if let Some(turn) = self.hold(progress, cache).await {
            return turn;
        }
        if let Some(turn) = self.fill(progress, cache).await {
            return turn;
        }
        if progress.work.is_empty() {
            return Turn::Wait(self.settings.poll);
        }
        let batch = select(
            &progress.work,
            progress.limit,
            self.settings.coalesce,
            progress.probe,
        );
        let started = Instant::now();
        match self.flush(cache, &progress.work, &batch).await {
            Flushed::Done => self.flushed(progress, cache, &batch, started).await,
            Flushed::Undecodable(i, error) => {
                self.undecodable(progress, cache, batch.flushed[i], &error)
                    .await
            }
            Flushed::Failed(error) => self.failed(progress, cache, &batch, &error).await,
        }
    }

    /// The shard's lease taken (with the group made and what earlier
    /// holders left to claim), or renewed before each batch; a turn to
    /// end with if not.
    async fn hold(&self, progress: &mut Progress, cache: &Cache) -> Option<Turn> {
        let backend = cache.backend();
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let lease_ms = u64::try_from(self.settings.lease.as_millis()).unwrap_or(u64::MAX);
        let lease = if progress.held {
            within(
                timeout,
                stream::renew_lease(backend, &self.keys, &self.token, lease_ms),
            )
            .await
        } else {
            // Free, or still ours (a renewal that timed out): taken, and
            // what it held is claimed afresh.
            within(
                timeout,
                stream::take_lease(backend, &self.keys, &self.token, lease_ms),
            )
            .await
        };
        match lease {
            Ok(true) if !progress.held => {
                if let Err(error) = within(timeout, stream::ensure_group(backend, &self.keys)).await
                {
                    self.trouble(cache, &error);
                    return Some(Turn::Wait(backoff(1)));
                }
                progress.held = true;
                progress.work.clear();
                progress.claim = Some("0-0".to_owned());
                let prune =
                    stream::prune_consumers(backend, &self.keys, &self.consumer, IDLE_CONSUMER_MS);
                let _ = within(timeout, prune).await;
                None
            }
            Ok(true) => None,
            Ok(false) => Some(Turn::LetGo(
                (self.settings.lease / 3).min(Duration::from_secs(2)),
            )),
            Err(error) => {
                self.trouble(cache, &error);
                Some(Turn::LetGo(backoff(progress.failures_in_a_row.max(1))))
            }
        }
    }

    /// Reads more changes when the work in hand is short of a batch: first
    /// what earlier holders left, then new ones; a turn to end with if the
    /// read failed.
    async fn fill(&self, progress: &mut Progress, cache: &Cache) -> Option<Turn> {
        let batch = self.settings.batch;
        let work = &progress.work;
        let mut keys_in_hand: Vec<&str> = work.iter().map(|p| p.change.key.as_str()).collect();
        keys_in_hand.sort_unstable();
        keys_in_hand.dedup();
        // Also when the changes in hand are of fewer keys than a batch
        // takes (a hot key's run), or of one key a probe cannot pass.
        let few_keys =
            keys_in_hand.len() < progress.limit || (progress.probe && keys_in_hand.len() < 2);
        if work.len() >= batch && !(few_keys && work.len() < batch * 10) {
            return None;
        }
        let wanted = if work.len() < batch {
            batch * 2 - work.len()
        } else {
            batch
        };
        let backend = cache.backend();
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let read = match &progress.claim {
            Some(cursor) => {
                let claim = stream::claim(backend, &self.keys, &self.consumer, cursor, wanted);
                within(timeout, claim).await.map(|(next, read)| {
                    progress.claim = next;
                    read
                })
            }
            None => {
                let read = stream::read_new(backend, &self.keys, &self.consumer, wanted);
                within(timeout, read).await
            }
        };
        let read = match read {
            Ok(read) => read,
            Err(error) => {
                // Perhaps the stream (and its group) went: made again with
                // the lease next time.
                self.trouble(cache, &error);
                return Some(Turn::LetGo(backoff(1)));
            }
        };
        if !read.malformed.is_empty() {
            let ids: Vec<&str> = read.malformed.iter().map(String::as_str).collect();
            crate::limited!(
                cache,
                warn!(queue = self.queue, shard = %self.keys.stream, ids = ?ids, "write-behind: stream entries that are not changes: dropped")
            );
            let ack = stream::ack(backend, &self.keys, &self.token, &ids, &[]);
            let _ = within(timeout, ack).await;
        }
        progress
            .work
            .extend(read.changes.into_iter().map(|change| Pending {
                change,
                alone: 0,
                successes_then: 0,
            }));
        None
    }

    /// The batch handed to the flush function, under the flush timeout; a
    /// flush that panics is a failure like any other (the task must live
    /// on: the next holder would panic on the same change).
    async fn flush(&self, cache: &Cache, work: &VecDeque<Pending>, batch: &Batch) -> Flushed {
        let changes: Vec<Delivered> = batch
            .flushed
            .iter()
            .map(|&i| work[i].change.clone())
            .collect();
        let flush = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe((self
            .handler)(
            cache.clone(),
            changes,
        )));
        match tokio::time::timeout(self.settings.flush_timeout, flush).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Flushed::Failed("the flush panicked".to_owned()),
            Err(_) => Flushed::Failed(format!(
                "the flush timed out after {:?}",
                self.settings.flush_timeout
            )),
        }
    }

    /// After a good flush: the lease checked, the batch settled and
    /// acknowledged, and dropped from the work.
    async fn flushed(
        &self,
        progress: &mut Progress,
        cache: &Cache,
        batch: &Batch,
        started: Instant,
    ) -> Turn {
        let flushed = QueueEvent::Flushed(batch.acked.len(), started.elapsed());
        cache.recorder().note_queue(self.queue, flushed);
        self.successes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        progress.failures_in_a_row = 0;
        progress.probe = false;
        progress.limit = (progress.limit * 2).min(self.settings.batch);
        // Still ours? If not, another holder may have claimed these
        // changes: they are left to it (flushed again).
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let lease_ms = u64::try_from(self.settings.lease.as_millis()).unwrap_or(u64::MAX);
        let still = stream::renew_lease(cache.backend(), &self.keys, &self.token, lease_ms);
        if !matches!(within(timeout, still).await, Ok(true)) {
            return Turn::LetGo(Duration::ZERO);
        }
        match self.settle(cache, &progress.work, batch).await {
            Ok(true) => {
                remove(&mut progress.work, batch.acked.clone());
                Turn::Again
            }
            Ok(false) => Turn::LetGo(Duration::ZERO),
            Err(error) => {
                // Not acknowledged: flushed again, in order, by the next
                // holder (this process, perhaps).
                self.trouble(cache, &error);
                self.release(cache).await;
                Turn::LetGo(backoff(1))
            }
        }
    }

    /// A change the flush function could not decode: to the dead letters
    /// at once.
    async fn undecodable(
        &self,
        progress: &mut Progress,
        cache: &Cache,
        at: usize,
        error: &str,
    ) -> Turn {
        let why = format!("undecodable: {error}");
        if self.bury_at(progress, cache, at, &why, 1).await {
            Turn::Again
        } else {
            Turn::LetGo(backoff(1))
        }
    }

    /// After a failed flush: counted, the batch halved after two failures
    /// in a row; a change that failed alone `max_attempts` times, while
    /// other flushes succeeded, to the dead letters; else a probe of
    /// another key next.
    async fn failed(
        &self,
        progress: &mut Progress,
        cache: &Cache,
        batch: &Batch,
        error: &str,
    ) -> Turn {
        let successes = self.successes.load(std::sync::atomic::Ordering::Relaxed);
        cache.recorder().note_queue(self.queue, QueueEvent::Retried);
        progress.failures_in_a_row += 1;
        crate::limited!(
            cache,
            warn!(queue = self.queue, changes = batch.flushed.len(), %error, "write-behind flush failed: retrying")
        );
        let [at] = batch.flushed[..] else {
            if progress.failures_in_a_row >= 2 {
                progress.limit = (batch.flushed.len() / 2).max(1);
            }
            return Turn::Wait(backoff(progress.failures_in_a_row));
        };
        let pending = &mut progress.work[at];
        if pending.alone == 0 {
            pending.successes_then = successes;
        }
        pending.alone += 1;
        if pending.alone >= self.settings.max_attempts && successes > pending.successes_then {
            let failures = pending.alone;
            if self.bury_at(progress, cache, at, error, failures).await {
                progress.failures_in_a_row = 0;
                progress.probe = false;
                return Turn::Again;
            }
            progress.probe = false;
            return Turn::LetGo(backoff(progress.failures_in_a_row));
        }
        // Next, another key's change, if there is one: if that one
        // flushes, the database is up and this one is the trouble.
        let front = progress.work.front().map(|p| p.change.key.as_str());
        progress.probe = progress
            .work
            .get(at)
            .is_some_and(|p| Some(p.change.key.as_str()) == front);
        Turn::Wait(backoff(progress.failures_in_a_row))
    }

    /// The change at `at` moved to the dead letters (`why`, after
    /// `failures` failed flushes of it alone), counted, logged and dropped
    /// from the work; `false` if it was not (the lease is lost, or Redis
    /// failed): the shard is then let go.
    async fn bury_at(
        &self,
        progress: &mut Progress,
        cache: &Cache,
        at: usize,
        why: &str,
        failures: u32,
    ) -> bool {
        let change = &progress.work[at].change;
        match self.bury(cache, change, why, failures).await {
            Ok(true) => {
                cache
                    .recorder()
                    .note_queue(self.queue, QueueEvent::DeadLettered);
                crate::limited!(
                    cache,
                    warn!(queue = self.queue, key = %change.key, failures, error = why, "write-behind change moved to the dead letters")
                );
                remove(&mut progress.work, vec![at]);
                true
            }
            Ok(false) => false,
            Err(error) => {
                self.trouble(cache, &error);
                false
            }
        }
    }

    /// `change` moved to the dead letters, fenced by the shard's lease
    /// (`Ok(false)`: the lease is lost).
    async fn bury(
        &self,
        cache: &Cache,
        change: &Delivered,
        why: &str,
        failures: u32,
    ) -> Result<bool, CacheError> {
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let bury = stream::bury(
            cache.backend(),
            &self.keys,
            &self.token,
            change,
            why,
            failures,
        );
        within(timeout, bury).await
    }

    /// Gives the flushed changes' entries their TTL back (those still
    /// their keys' latest), then acknowledges the changes; `false` if the
    /// shard's lease was lost meanwhile (nothing acknowledged).
    async fn settle(
        &self,
        cache: &Cache,
        work: &VecDeque<Pending>,
        batch: &Batch,
    ) -> Result<bool, CacheError> {
        let backend = cache.backend();
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let flushed: Vec<&Delivered> = batch.flushed.iter().map(|&i| &work[i].change).collect();
        within(timeout, stream::settle(backend, &self.keys, &flushed)).await?;
        let ids: Vec<&str> = batch
            .acked
            .iter()
            .map(|&i| work[i].change.id.as_str())
            .collect();
        let latest: Vec<(&str, &str)> = flushed
            .iter()
            .map(|c| (c.key.as_str(), c.id.as_str()))
            .collect();
        within(
            timeout,
            stream::ack(backend, &self.keys, &self.token, &ids, &latest),
        )
        .await
    }

    /// Hands the shard over (best effort: else it expires).
    async fn release(&self, cache: &Cache) {
        let timeout = cache.settings().op_timeout.max(Duration::from_secs(1));
        let _ = within(
            timeout,
            stream::release_lease(cache.backend(), &self.keys, &self.token),
        )
        .await;
    }

    fn trouble(&self, cache: &Cache, error: &CacheError) {
        if !matches!(error, CacheError::CircuitOpen) {
            crate::limited!(
                cache,
                warn!(queue = self.queue, shard = %self.keys.stream, %error, "write-behind flusher: Redis trouble, retrying")
            );
        }
    }

    async fn pause(&mut self, duration: Duration) -> bool {
        pause(&mut self.stopped, duration).await
    }
}

/// How long a consumer of a queue's group that holds nothing may go
/// without reading before a new holder of its shard removes it (an hour:
/// a process that stopped).
const IDLE_CONSUMER_MS: u64 = 3_600_000;

/// 100 ms, doubling per failure in a row, at most 10 s.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_millis(100 << exp).min(Duration::from_secs(10))
}

/// Removes the changes at `indexes` from `work`.
fn remove(work: &mut VecDeque<Pending>, mut indexes: Vec<usize>) {
    indexes.sort_unstable();
    indexes.dedup();
    for i in indexes.into_iter().rev() {
        work.remove(i);
    }
}

/// The next batch from `work`, at most `limit` keys. In order, a key's
/// first waiting change (its later ones wait for later batches); when
/// coalescing, a key's last waiting change, acknowledging the earlier
/// ones with it. With `probe`, a batch of one change whose key is not the
/// front change's, if there is one.
fn select(work: &VecDeque<Pending>, limit: usize, coalesce: bool, probe: bool) -> Batch {
    let front = work.front().map(|p| p.change.key.as_str());
    let mut seen: HashSet<&str> = HashSet::new();
    let mut batch = Batch {
        flushed: Vec::new(),
        acked: Vec::new(),
    };
    if probe {
        // The first change of each other key; of those, the first that has
        // not failed alone, else the one that failed alone least (so two
        // failing keys do not keep a third from being tried).
        let mut firsts: Vec<usize> = Vec::new();
        for (i, pending) in work.iter().enumerate() {
            let key = pending.change.key.as_str();
            if Some(key) != front && seen.insert(key) {
                firsts.push(i);
            }
        }
        seen.clear();
        if let Some(&other) = firsts
            .iter()
            .find(|&&i| work[i].alone == 0)
            .or_else(|| firsts.iter().min_by_key(|&&i| work[i].alone))
        {
            let key = work[other].change.key.as_str();
            let mine: Vec<usize> = (other..work.len())
                .filter(|&i| work[i].change.key == key)
                .collect();
            let flushed = if coalesce {
                *mine.last().unwrap_or(&other)
            } else {
                other
            };
            batch.flushed.push(flushed);
            batch.acked = if coalesce { mine } else { vec![other] };
            return batch;
        }
    }
    for (i, pending) in work.iter().enumerate() {
        let key = pending.change.key.as_str();
        if !seen.insert(key) {
            continue;
        }
        if batch.flushed.len() == limit {
            break;
        }
        if coalesce {
            let mine: Vec<usize> = (i..work.len())
                .filter(|&j| work[j].change.key == key)
                .collect();
            batch.flushed.push(*mine.last().unwrap_or(&i));
            batch.acked.extend(mine);
        } else {
            batch.flushed.push(i);
            batch.acked.push(i);
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::behind::ChangeId;

    fn work(keys: &[&str]) -> VecDeque<Pending> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| Pending {
                change: Delivered {
                    id: format!("{i}-0"),
                    version: ChangeId {
                        millis: i as u64,
                        seq: 0,
                    },
                    key: (*key).to_owned(),
                    value: Vec::new(),
                    ttl: 1,
                    at: 0,
                },
                alone: 0,
                successes_then: 0,
            })
            .collect()
    }

    #[test]
    fn in_order_a_batch_holds_each_key_once_and_first() {
        let w = work(&["a", "b", "a", "c", "b"]);
        let batch = select(&w, 10, false, false);
        assert_eq!(batch.flushed, [0, 1, 3]);
        assert_eq!(batch.acked, [0, 1, 3]);
        let batch = select(&w, 2, false, false);
        assert_eq!(batch.flushed, [0, 1]);
    }

    #[test]
    fn coalescing_flushes_a_key_s_last_change_and_acks_the_rest() {
        let w = work(&["a", "b", "a", "c", "b"]);
        let batch = select(&w, 10, true, false);
        assert_eq!(batch.flushed, [2, 4, 3]);
        let mut acked = batch.acked.clone();
        acked.sort_unstable();
        assert_eq!(acked, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_probe_tries_another_key() {
        let w = work(&["a", "a", "b", "c"]);
        let batch = select(&w, 1, false, true);
        assert_eq!(batch.flushed, [2]);
        let only = work(&["a", "a"]);
        assert_eq!(select(&only, 1, false, true).flushed, [0]);
        // b failed alone already: c is tried before it.
        let mut w = work(&["a", "b", "c"]);
        w[1].alone = 2;
        assert_eq!(select(&w, 1, false, true).flushed, [2]);
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(30), Duration::from_secs(10));
    }
}
