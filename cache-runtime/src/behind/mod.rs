//! Write-behind: a write answered from the cache and queued durably in
//! Redis, flushed to the database in batches by a [`Flusher`]
//! ([`guide::write_behind`](crate::guide::write_behind)).
//!
//! A change is one entry of a Redis stream (one stream per shard of a
//! queue, so that a cluster spreads them), read by a consumer group and
//! acknowledged only after the batch that holds it was flushed. The write
//! stores its value as the target's entry *without expiry* in the same
//! script that appends the change (two commands on a cluster, where the
//! entry and the stream live in different slots: the change first), so
//! that reads see it until it is flushed; the flush gives the entry its
//! TTL back if it still holds that value.

mod flusher;
mod memory;
mod stream;

use std::marker::PhantomData;
use std::time::Duration;

pub use self::flusher::{Flusher, FlusherBuilder};
use crate::cache::Cache;
use crate::error::CacheError;

/// A write-behind queue of values of type `V`, named once as a constant
/// and used by both sides, so that rustc checks that the writers'
/// values and the flush function's agree:
///
/// ```
/// use cache_runtime::WriteQueue;
/// # #[derive(serde::Serialize, serde::Deserialize)] struct User { id: u64 }
/// pub const USERS: WriteQueue<User> = WriteQueue::new("users");
/// ```
///
/// The name is part of the queue's Redis keys
/// (`<prefix>:{wb:users:<shard>}`): printable ASCII without spaces,
/// braces or `:`, checked when the queue is first used.
pub struct WriteQueue<V> {
    name: &'static str,
    shards: u16,
    value: PhantomData<fn() -> V>,
}

impl<V> WriteQueue<V> {
    /// A queue of 8 shards.
    pub const fn new(name: &'static str) -> Self {
        WriteQueue {
            name,
            shards: 8,
            value: PhantomData,
        }
    }

    /// The number of streams the changes are spread over, by key (1 to
    /// 1024; 8 by default). Every change of one key goes to one shard, so
    /// its changes keep their order; each shard is flushed by one process
    /// at a time, so more shards flush in parallel (and spread over a
    /// cluster's primaries). Writers and flushers must agree on it: change
    /// it only with the queue drained.
    #[must_use]
    pub const fn shards(mut self, shards: u16) -> Self {
        self.shards = shards;
        self
    }

    /// The queue's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn shard_count(&self) -> u16 {
        self.shards
    }

    /// Whether the name and the shard count can be used.
    pub(crate) fn check(&self) -> Result<(), WriteBehindError> {
        let valid = !self.name.is_empty()
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b':'))
            && (1..=1024).contains(&self.shards);
        if valid {
            Ok(())
        } else {
            Err(WriteBehindError::InvalidQueue {
                name: self.name,
                shards: self.shards,
            })
        }
    }
}

impl<V> Clone for WriteQueue<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for WriteQueue<V> {}

impl<V> std::fmt::Debug for WriteQueue<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteQueue")
            .field("name", &self.name)
            .field("shards", &self.shards)
            .finish()
    }
}

/// One change handed to a flush function: the entry's key, the value
/// written, and its version.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Change<V> {
    /// The cache key, as the target's template rendered it (without the
    /// cache's prefix), e.g. `user:42`.
    pub key: String,
    /// The value the write returned.
    pub value: V,
    /// The change's place in its key's history: later changes of one key
    /// have greater versions. A flush that may see a change twice (it
    /// does after a crash: delivery is at least once) writes it only if
    /// the row's version is older, e.g. `UPDATE ... WHERE version < ?`.
    pub version: ChangeId,
}

/// The version of a change: its stream entry's id (`<ms>-<seq>`, the
/// primary's clock at the append, then a counter). Ordered, and greater
/// for every later change of the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeId {
    /// Milliseconds since the Unix epoch, by the primary's clock.
    pub millis: u64,
    /// The change's number within that millisecond.
    pub seq: u64,
}

impl ChangeId {
    /// Parses `<ms>-<seq>`.
    pub(crate) fn parse(id: &str) -> Option<ChangeId> {
        let (millis, seq) = id.split_once('-')?;
        Some(ChangeId {
            millis: millis.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// One number that orders versions as they are ordered: the
    /// milliseconds shifted left by 20 bits plus the sequence (a column of
    /// `BIGINT` holds it until the year 2248; more than a million changes
    /// of one shard in one millisecond would share a number).
    pub fn as_i64(&self) -> i64 {
        let packed = (self.millis << 20) | self.seq.min((1 << 20) - 1);
        i64::try_from(packed).unwrap_or(i64::MAX)
    }
}

impl std::fmt::Display for ChangeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.millis, self.seq)
    }
}

/// Why a write-behind write was not accepted: the change is not
/// acknowledged. It may still have been queued (a command that timed
/// out may have landed), as a database write that timed out may have
/// been committed: retrying the write is safe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteBehindError {
    /// No cache is installed (and none was named with `cache = ...`).
    #[error("write-behind needs a cache: none is installed")]
    NoCache,
    /// The cache could not take the change (down, timed out, circuit
    /// open, not replicated as configured).
    /// The write is not written around the queue: a change of the same
    /// key still queued would be flushed after it and undo it.
    #[error("write-behind: the change could not be queued: {0}")]
    Unavailable(#[source] CacheError),
    /// The value could not be stored: it failed to encode, or its encoding
    /// is larger than the cache's `max_value_size`.
    #[error("write-behind: the value cannot be stored in the cache")]
    NotStorable,
    /// The target is tagged (`tags`, `tags_from`): not supported by
    /// write-behind yet.
    #[error("write-behind: the target function is tagged, which write-behind does not support")]
    Tagged,
    /// The queue's name or shard count cannot be used.
    #[error(
        "write-behind queue {name:?} ({shards} shards): use a name of printable ASCII without spaces, braces or `:`, and 1 to 1024 shards"
    )]
    InvalidQueue {
        /// The name given.
        name: &'static str,
        /// The shard count given.
        shards: u16,
    },
}

/// A return type a `#[write_behind]` function can fail with: a `Result`
/// whose error converts from [`crate::WriteBehindError`], so that a
/// change the cache could not queue is the caller's error.
#[diagnostic::on_unimplemented(
    message = "`#[write_behind]` needs a function returning `Result<T, E>` where `E: From<cache_runtime::WriteBehindError>`",
    label = "this return type cannot carry a write-behind error",
    note = "a write-behind write is answered by the cache: when the cache cannot queue it, the caller must hear of it; add `impl From<cache_runtime::WriteBehindError> for YourError`"
)]
pub trait Rejectable<R> {
    /// The caller's error, from the cache's.
    fn rejected(error: WriteBehindError) -> R;
}

impl<T, E: From<WriteBehindError>> Rejectable<Result<T, E>> for crate::outcome::ResultShape {
    fn rejected(error: WriteBehindError) -> Result<T, E> {
        Err(E::from(error))
    }
}

/// The Redis keys of one shard of a queue. The hash tag keeps them in one
/// slot of a cluster.
#[derive(Debug, Clone)]
pub(crate) struct ShardKeys {
    pub(crate) stream: String,
    pub(crate) dead: String,
    pub(crate) lease: String,
    /// A hash of entry key to the id of its latest change in the shard:
    /// a flushed change settles its entry only if it is still the latest.
    pub(crate) latest: String,
}

impl ShardKeys {
    pub(crate) fn of(cache: &Cache, queue: &str, shard: u16) -> ShardKeys {
        let stream = cache
            .prefixed(&format!("{{wb:{queue}:{shard}}}"))
            .into_owned();
        ShardKeys {
            dead: format!("{stream}:dead"),
            lease: format!("{stream}:lease"),
            latest: format!("{stream}:latest"),
            stream,
        }
    }
}

impl Cache {
    /// Whether `key` is one of write-behind's (a queue, its dead letters
    /// or its lease): `<prefix>:{wb:...`.
    pub(crate) fn is_queue_key(&self, key: &str) -> bool {
        let rest = match self.prefix() {
            Some(prefix) => key
                .strip_prefix(prefix)
                .and_then(|k| k.strip_prefix(':'))
                .unwrap_or(key),
            None => key,
        };
        rest.starts_with("{wb:")
    }
}

/// One change as read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// The stream entry's id.
    pub(crate) id: String,
    pub(crate) version: ChangeId,
    /// The entry's Redis key.
    pub(crate) key: String,
    /// The stored bytes (tags' stamp, then the encoded value).
    pub(crate) value: Vec<u8>,
    /// The TTL the entry gets back once flushed, in milliseconds.
    pub(crate) ttl: u64,
    /// Where the encoded value starts in `value`.
    pub(crate) at: usize,
}

/// What a read of a stream delivered: the changes, and the ids of entries
/// that are not changes of ours (written by hand, or damaged), to be
/// acknowledged and dropped rather than claimed forever.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Read {
    pub(crate) changes: Vec<Delivered>,
    pub(crate) malformed: Vec<String>,
}

/// Where a key's changes go: the same shard for every change of a key.
pub(crate) fn shard_of(redis_key: &str, shards: u16) -> u16 {
    crate::slot::slot_of(redis_key.as_bytes()) % shards.max(1)
}

/// What a queue holds now, read by [`Cache::write_queue_status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStatus {
    /// Changes not flushed yet, over every shard.
    pub pending: u64,
    /// Changes in the dead-letter streams.
    pub dead: u64,
    /// How long the oldest pending change has waited, by the server's
    /// clock.
    pub oldest: Option<Duration>,
}

/// A dead-lettered change, as [`Cache::dead_letters`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its entry in the dead-letter stream (what
    /// [`Cache::replay_dead_letters`] moves).
    pub id: String,
    /// The entry's Redis key (with the cache's prefix).
    pub key: String,
    /// The version the change had in the queue.
    pub version: Option<ChangeId>,
    /// The last error of its flush.
    pub error: String,
    /// How many flushes of it failed.
    pub failures: u32,
    /// The stored bytes of the value (see [`crate::inspect`] to read
    /// them).
    pub value: Vec<u8>,
}

impl Cache {
    /// What `queue` holds now: pending and dead-lettered changes, and the
    /// age of the oldest pending one. One round trip per shard.
    ///
    /// Cancel safe: it only reads.
    pub async fn write_queue_status<V>(
        &self,
        queue: &WriteQueue<V>,
    ) -> Result<QueueStatus, CacheError> {
        stream::status(self, queue.name, queue.shards).await
    }

    /// The changes of the queue named `queue` that were dead-lettered
    /// (at most `limit`), oldest first. The queue is found by name, so that
    /// `cachectl`, which does not know its type, can show it.
    ///
    /// Cancel safe: it only reads.
    pub async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, CacheError> {
        stream::dead_letters(self, queue, limit).await
    }

    /// Appends every dead-lettered change of the queue named `queue` to
    /// its queue again, as the newest change of its key (so it is flushed
    /// after, and overwrites, any change of the key made since it was
    /// dead-lettered), and removes it from the dead letters. Returns how
    /// many were replayed.
    ///
    /// Cancel safe: a change is appended before it is removed, so a
    /// dropped call may leave it in both (replayed again next time: a
    /// flush sees a change at least once).
    pub async fn replay_dead_letters(&self, queue: &str) -> Result<u64, CacheError> {
        stream::replay(self, queue).await
    }
}

impl Cache {
    /// After a write-behind write's body returned a value: stores it as
    /// `key`'s entry without expiry and queues the change, in one step
    /// where the deployment allows (see the module docs).
    pub(crate) async fn write_behind(
        &self,
        writer: &'static crate::stats::Function,
        queue: (&'static str, u16),
        key: crate::key::CacheKey,
        answer: crate::outcome::Encoded,
    ) -> Result<(), WriteBehindError> {
        let (name, shards) = queue;
        if key.has_tags() || key.site().is_some_and(crate::site::Site::derives_tags) {
            return Err(WriteBehindError::Tagged);
        }
        let site = key.site();
        let redis_key = self.redis_key_of(key);
        let crate::outcome::Encoded::Value(encoded, life) = answer else {
            return Err(WriteBehindError::NotStorable);
        };
        // The TTL the entry gets once flushed; a value its function would
        // not store (`unless`) still waits in the cache until then.
        let ttl = site
            .and_then(|site| site.ttl_of(life).or_else(|| Some(site.ttl_millis())))
            .unwrap_or(crate::outcome::LONGEST_TTL);
        let bytes = self
            .fit_for_store(Some(writer), &redis_key, encoded)
            .ok_or(WriteBehindError::NotStorable)?;
        // Untagged: the encoded value from the start.
        let (value, at) = (bytes, 0);
        let keys = ShardKeys::of(self, name, shard_of(&redis_key, shards));
        let _local = self.drop_local(std::slice::from_ref(&redis_key));
        // Not retried: a try that timed out may land later, after the
        // retry and after the caller's next write of the key.
        let outcome = self
            .guarded(
                &keys.stream,
                stream::enqueue(self.backend(), &keys, &redis_key, &value, ttl, at),
            )
            .await;
        self.announce(std::slice::from_ref(&redis_key)).await;
        match outcome {
            Ok(()) => {
                self.recorder()
                    .note_queue(name, crate::stats::QueueEvent::Queued);
                Ok(())
            }
            Err(error) => {
                self.recorder()
                    .record(Some(writer), crate::stats::Event::Error);
                crate::limited!(
                    self,
                    warn!(key = %redis_key, queue = name, %error, "write-behind: the change could not be queued")
                );
                Err(WriteBehindError::Unavailable(error))
            }
        }
    }
}
