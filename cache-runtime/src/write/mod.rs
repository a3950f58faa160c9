//! The write path: `Cache::invalidate`, and what `#[invalidates]` and
//! `#[cache_put]` do once their body succeeded.
//!
//! A write never fails or waits longer than one op timeout because of the
//! cache. What it could not finish (the cache was down, the command timed
//! out and may or may not have landed, or the writer's future was dropped
//! while it waited) goes to the janitor, which retries the deletion until
//! it is delivered; an invalidation retried after it had landed deletes at
//! worst a newer value, which is a miss, never a stale read.

pub(crate) mod lease;
pub(crate) mod worker;

use crate::cache::janitor::Chore;
use crate::cache::{Cache, within};
use crate::error::CacheError;
use crate::key::CacheKey;
use crate::local::LocalTier;
use crate::local::tracking::Tracking;
use crate::outcome::Encoded;
use crate::stats::Event;
use crate::stats::Function;
use crate::tag::Tagging;

impl Cache {
    /// Deletes a key, e.g. `cache.invalidate(&get_user_cache_key(&42))`,
    /// including a lease placeholder, so that a value being computed from
    /// data read before now is not stored. Returns whether an entry was
    /// there. A failure is returned, and the deletion is retried in the
    /// background as a `#[invalidates]` write's is, until it is delivered
    /// (readers of this process skip the key meanwhile).
    ///
    /// Cancel safe: dropping the future leaves the deletion to the
    /// background, as a failure does.
    pub async fn invalidate<V>(&self, key: &CacheKey<V>) -> Result<bool, CacheError> {
        let redis_key = self.redis_key(key);
        // Declared first, so that it drops after `unfinished` has queued
        // what is left: see `Cache::drop_local`.
        let _local = self.drop_local(std::slice::from_ref(&redis_key));
        let mut unfinished = Unfinished {
            cache: self,
            writer: None,
            keys: vec![redis_key],
            tried: false,
            landed: None,
        };
        let redis_key = &unfinished.keys[0];
        let epoch = self.backend().primaries_epoch();
        let deleted = self
            .guarded(
                redis_key,
                self.backend()
                    .delete_durably(std::slice::from_ref(redis_key)),
            )
            .await;
        self.announce(std::slice::from_ref(redis_key)).await;
        let stats = &self.recorder();
        match &deleted {
            Ok(_) => {
                if let Some(event) = crate::tag::invalidation_of(redis_key) {
                    stats.record(None, event);
                }
                unfinished.keys.clear();
            }
            Err(error) => {
                unfinished.tried = true;
                unfinished.landed = error.is_not_replicated().then_some(epoch);
                if !matches!(error, CacheError::CircuitOpen) {
                    stats.record(None, Event::Error);
                    crate::limited!(
                        self,
                        warn!(key = %redis_key, %error, "cache invalidation failed: retrying in the background")
                    );
                }
            }
        }
        deleted.map(|n| n > 0)
    }

    /// Deletes every entry of this cache: the keys under its prefix, on
    /// every primary of a cluster (`SCAN` + `UNLINK`, never `FLUSHDB`).
    /// Returns how many there were. Fails with
    /// [`CacheError::ClearWithoutPrefix`] when the cache has no prefix.
    ///
    /// Lease placeholders go too, so values being computed from data read
    /// before the clear are not stored. This process's local copies are
    /// dropped; other processes' are dropped by the server (or the
    /// broadcast). Each step is bounded by the op timeout; the whole
    /// takes one round trip per thousand keys or so.
    ///
    /// Cancel safe: dropping the future stops the clear where it is.
    pub async fn clear(&self) -> Result<u64, CacheError> {
        self.clear_prefix("").await
    }

    /// Deletes every entry whose key starts with `prefix` (after the
    /// cache's own prefix): `clear_prefix("user:")` deletes every entry of
    /// `#[redis_cached(key = "user:<id>", ...)]` (every `version` too) and
    /// of any other template that starts with `user:`. `*`, `?`, `[` and
    /// `\` in `prefix` are matched as themselves. See [`Cache::clear`].
    ///
    /// Fails with [`CacheError::ClearWithoutPrefix`] when the cache has no
    /// prefix, whatever `prefix` is: a Redis database is shared (sessions,
    /// rate limits, other services' caches), and without a prefix of its
    /// own the cache cannot tell its entries from their keys
    /// (`clear_prefix("s")` would delete anyone's `s*`).
    pub async fn clear_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        if !self.has_prefix() {
            return Err(CacheError::ClearWithoutPrefix);
        }
        let start = self.prefixed(prefix).into_owned();
        let pattern = format!("{}*", glob_escape(&start));
        let backend = &self.backend();
        let timeout = self.settings().op_timeout;
        let mut deleted = 0;
        for target in within(timeout, backend.scan_targets()).await? {
            let mut cursor = 0;
            loop {
                let scan = backend.scan(target.as_deref(), cursor, &pattern, &start);
                let (next, keys) = within(timeout, scan).await?;
                // SCAN's pattern is matched by the server; the memory
                // backend filters exactly.
                // Write-behind's queues hold changes not yet in the
                // database: never cleared.
                let keys: Vec<String> = keys
                    .into_iter()
                    .filter(|k| k.starts_with(&start) && !self.is_queue_key(k))
                    .collect();
                if !keys.is_empty() {
                    let _local = self.drop_local(&keys);
                    deleted += within(timeout, backend.unlink(&keys)).await?;
                    self.recorder()
                        .record_n(None, Event::Invalidation, keys.len());
                    self.announce(&keys).await;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted)
    }

    /// After a successful write: deletes `keys`, waiting at most one op
    /// timeout; what is left is retried in the background.
    pub(crate) async fn invalidate_after_write(
        &self,
        writer: &'static Function,
        keys: Vec<String>,
    ) {
        self.invalidate_keys(Some(writer), keys).await;
    }

    /// Deletes `keys` (with the clock of each tag key among them, first:
    /// see [`crate::tag`]), waiting at most one op timeout, and says why
    /// not all of them were; what is left is retried in the background.
    pub(crate) async fn invalidate_keys(
        &self,
        writer: Option<&'static Function>,
        keys: Vec<String>,
    ) -> Option<CacheError> {
        let keys = crate::tag::with_clocks(keys);
        // Declared first, so that it drops after `unfinished` has queued
        // what is left: see `Cache::drop_local`.
        let _local = self.drop_local(&keys);
        let mut unfinished = Unfinished {
            cache: self,
            writer,
            keys,
            tried: false,
            landed: None,
        };
        // Read before the write is sent: see `Chore::Invalidate::landed`.
        let epoch = self.backend().primaries_epoch();
        // On a cluster, each primary's keys are deleted under its own
        // breaker: what failed is all that is left to retry.
        let (failed, error) = self.delete_ordered(&unfinished.keys).await;
        self.announce(&unfinished.keys).await;
        let (mut entries, mut tags) = (0, 0);
        for key in &unfinished.keys {
            // `failed` is empty but when the cache failed.
            if !failed.contains(key) {
                match crate::tag::invalidation_of(key) {
                    Some(Event::TagInvalidation) => tags += 1,
                    Some(_) => entries += 1,
                    None => {}
                }
            }
        }
        self.recorder()
            .record_n(writer, Event::Invalidation, entries);
        if tags > 0 {
            self.recorder()
                .record_n(writer, Event::TagInvalidation, tags);
        }
        unfinished.keys = failed;
        let error = error?;
        unfinished.tried = true;
        unfinished.landed = error.is_not_replicated().then_some(epoch);
        if !matches!(error, CacheError::CircuitOpen) {
            self.recorder().record(writer, Event::Error);
        }
        crate::limited!(
            self,
            warn!(keys = ?unfinished.keys, %error, "cache invalidation failed: retrying in the background")
        );
        Some(error)
    }

    /// [`Cache::delete_many`], the tag clocks among `keys` first. Off a
    /// cluster, one `DEL` deletes them all at once; on a cluster, where
    /// they live on other primaries than their tags, the clocks are
    /// deleted before the rest is sent. If the clocks' `DEL` may not have
    /// reached their primary, nothing else is sent: all of it is left to
    /// retry, with an error that makes this process's readers skip it
    /// (unlike one that only lacks a replica's acknowledgement: the
    /// clocks' primary has them then, and the rest goes on).
    async fn delete_ordered(&self, keys: &[String]) -> (Vec<String>, Option<CacheError>) {
        let clocks = keys
            .iter()
            .take_while(|key| crate::tag::is_clock(key))
            .count();
        if clocks == 0 || !matches!(self.backend(), crate::backend::Backend::Cluster(_)) {
            return self.delete_many(keys).await;
        }
        let (mut failed, error) = self.delete_many(&keys[..clocks]).await;
        match error {
            None => self.delete_many(&keys[clocks..]).await,
            Some(error) if error.is_not_replicated() => {
                let (rest, rest_error) = self.delete_many(&keys[clocks..]).await;
                failed.extend(rest);
                // As `delete_many` does: the error that says least about
                // what landed.
                (failed, Some(rest_error.unwrap_or(error)))
            }
            Some(error) => {
                failed.extend_from_slice(&keys[clocks..]);
                (failed, Some(error))
            }
        }
    }

    /// Write-through (`#[cache_put]`): stores the encoded `answer` under `key` with the
    /// key's function's TTL, replacing any value or lease placeholder. If
    /// that fails or is cut short, the key is invalidated instead (in the
    /// background), so that the old value does not outlive the write.
    pub(crate) async fn put_after_write(
        &self,
        writer: &'static Function,
        key: CacheKey,
        answer: Encoded,
        tagging: Option<&Tagging>,
    ) {
        // Generated targets carry their function's configuration; a key
        // without one has no TTL to store with, so it is only invalidated.
        // So is the key of a tagged function whose tags' tokens could not
        // be read before the write's body ran, and that of a function whose
        // value names tags of its own (`tags_from`): its next call reads
        // them from the value it computes.
        let stamp = tagging.map(Tagging::stamp).unwrap_or_default();
        let untold = (key.has_tags() && tagging.is_none())
            || tagging.is_some_and(|_| stamp.is_empty())
            || key.site().is_some_and(crate::site::Site::derives_tags);
        let site = key.site();
        let redis_key = self.redis_key_of(key);
        let (encoded, life) = match answer {
            Encoded::Value(encoded, life) => (encoded, life),
            Encoded::Nothing | Encoded::Failed => {
                return self.invalidate_after_write(writer, vec![redis_key]).await;
            }
        };
        // A value its function would not store (`unless`) is not put
        // either: the old one is invalidated.
        let ttl = site.filter(|_| !untold).and_then(|site| site.ttl_of(life));
        // Declared first, so that it drops after `unfinished` has queued
        // what is left: see `Cache::drop_local`.
        let _local = self.drop_local(std::slice::from_ref(&redis_key));
        let mut unfinished = Unfinished {
            cache: self,
            writer: Some(writer),
            keys: vec![redis_key],
            tried: false,
            landed: None,
        };
        let redis_key = &unfinished.keys[0];
        let encoded = ttl
            .and_then(|_| self.fit_for_store(Some(writer), redis_key, encoded))
            .map(|bytes| match &stamp[..] {
                [] => bytes,
                stamp => [stamp, &bytes].concat(),
            });
        let (Some(ttl), Some(bytes)) = (ttl, encoded) else {
            // Not storable: at least the old value must go, before the
            // write returns.
            let keys = std::mem::take(&mut unfinished.keys);
            return self.invalidate_after_write(writer, keys).await;
        };
        let epoch = self.backend().primaries_epoch();
        let stored = self
            .guarded(
                redis_key,
                self.backend().set_durably(redis_key, &bytes, ttl),
            )
            .await;
        self.announce(&unfinished.keys).await;
        match stored {
            Ok(()) => {
                unfinished.keys.clear();
                self.recorder().record(Some(writer), Event::Set);
            }
            Err(error) => {
                // Stored on the primary, not acknowledged by a replica: the
                // primary serves the new value meanwhile.
                unfinished.landed = error.is_not_replicated().then_some(epoch);
                if !matches!(error, CacheError::CircuitOpen) {
                    self.recorder().record(Some(writer), Event::Error);
                }
                crate::limited!(
                    self,
                    warn!(key = %redis_key, %error, "cache put failed: invalidating the key in the background")
                );
            }
        }
    }
}

impl Cache {
    /// With a broadcast local tier ([`crate::LocalInvalidation::Broadcast`]):
    /// tells the other processes that `keys` were written, once the write
    /// was sent (whether or not it landed: a needless announcement only
    /// costs them a copy). If it cannot be sent, their copies of these
    /// keys live until their `local` time.
    pub(crate) async fn announce(&self, keys: &[String]) {
        let Some(channel) = self.local().and_then(Tracking::channel) else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        // Split by `Sink` at `BROADCAST_SEPARATOR`.
        let message = keys.join("\n");
        let sent = self
            .guarded(channel, self.backend().publish(channel, message.as_bytes()))
            .await;
        if let Err(error) = sent
            && !matches!(error, CacheError::CircuitOpen)
        {
            crate::limited!(
                self,
                warn!(%error, keys = keys.len(), "local tier broadcast failed: other processes keep their copies of these keys for up to their `local` time")
            );
        }
    }

    /// Drops this process's local copies of the keys a write is about to
    /// change, now and again when the returned guard drops (the write
    /// returned, failed or was cancelled): a read of this process that
    /// started before the write landed and keeps its copy after it would
    /// serve the old value (see [`crate::local`]).
    pub(crate) fn drop_local(&self, keys: &[String]) -> Option<LocalDrop<'_>> {
        let tier = self.local()?.tier();
        for key in keys {
            tier.invalidate(key.as_bytes());
        }
        Some(LocalDrop {
            tier,
            keys: keys.to_vec(),
        })
    }
}

/// `text` as a `SCAN MATCH` pattern that matches it literally.
pub(crate) fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Drops local copies of a write's keys once the write is over.
pub(crate) struct LocalDrop<'c> {
    tier: &'c LocalTier,
    keys: Vec<String>,
}

impl Drop for LocalDrop<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.tier.invalidate(key.as_bytes());
        }
    }
}

/// Keys a write still has to delete. Whatever is left when it drops (an
/// error, a timeout, the writer's future dropped at an `.await`) goes to
/// the janitor.
struct Unfinished<'c> {
    cache: &'c Cache,
    /// `None` for `Cache::invalidate`.
    writer: Option<&'static Function>,
    keys: Vec<String>,
    /// Whether an attempt failed already, so the first retry waits.
    tried: bool,
    /// Whether that attempt reached the primary, and under which slot map
    /// (see `Chore::Invalidate`).
    landed: Option<u64>,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        for key in self.keys.drain(..) {
            self.cache.tidy(Chore::Invalidate {
                writer: self.writer,
                key,
                tried: self.tried,
                landed: self.landed,
            });
        }
    }
}
