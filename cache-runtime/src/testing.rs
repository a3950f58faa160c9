//! Hooks for this workspace's own test suites, behind the `__testing`
//! feature that no user turns on: the backend contract's operations for the
//! conformance suite, and counts of what a cache still holds for the
//! cancellation sweep. Not public API.

use crate::{Cache, CacheError};

/// The backend contract's operations on a cache's backend, under its op
/// timeout and circuit breaker, for the conformance suite
/// (`tests/conformance.rs`). See the `backend` module's docs. Keys get the
/// cache's prefix, as cached functions' keys do.
pub struct BackendOps<'a>(&'a Cache);

/// A cache's backend operations; see [`BackendOps`].
pub fn backend_ops(cache: &Cache) -> BackendOps<'_> {
    BackendOps(cache)
}

/// The key of `key`'s refresh lock (`stale`, `early_refresh`) in `cache`.
pub fn refresh_lock_key(cache: &Cache, key: &str) -> String {
    crate::key::refresh_lock_key(cache.prefix(), key)
}

/// Clean-ups (lease give-backs, invalidation retries) submitted to the
/// cache's janitor and not finished: 0 once the cache is quiescent.
pub fn pending_chores(cache: &Cache) -> usize {
    cache.pending_chores()
}

/// Single flights, failing-key gates, bodies finishing in the background,
/// stores whose replies are awaited in the background and keys with a
/// shared read in flight: 0 once no call is under way, whatever ended the
/// calls.
pub fn flights_in_use(cache: &Cache) -> usize {
    cache.flights().len() + cache.shared_reads().in_flight()
}

/// From now on, `cache`'s calls share a read of a key as soon as one is
/// in flight (by default, two are first): every hot-key collision then
/// goes through the sharing, for the tests that check it.
pub fn share_reads_from_the_first(cache: &Cache) {
    cache.shared_reads().share_from_the_first();
}

/// Calls of `cache` that shared another call's read so far.
pub fn shared_reads(cache: &Cache) -> u64 {
    cache.shared_reads().joined()
}

pub use crate::backend::Fetched;

/// A read limit that any value is within.
const WHOLE: usize = i64::MAX as usize;

impl BackendOps<'_> {
    /// `get(key, limit)`.
    pub async fn get_limited(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Fetched<Vec<u8>>, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        self.0.guarded(key, self.0.backend().get(key, limit)).await
    }

    /// `get(key)` without a limit, `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(match self.get_limited(key, WHOLE).await? {
            Fetched::Found(bytes) => Some(bytes),
            Fetched::Absent | Fetched::TooLarge => None,
        })
    }

    /// `get_with_ttl(key, limit)`: the bytes and the milliseconds left
    /// (`None`: no expiry).
    pub async fn get_with_ttl_limited(
        &self,
        key: &str,
        limit: usize,
    ) -> Result<Fetched<(Vec<u8>, Option<u64>)>, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let stored = self
            .0
            .guarded(key, self.0.backend().get_with_ttl(key, limit))
            .await?;
        Ok(stored.map(|s| (s.bytes, s.ttl_millis)))
    }

    /// `get_with_ttl(key)` without a limit, `None` when absent.
    pub async fn get_with_ttl(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<u64>)>, CacheError> {
        Ok(match self.get_with_ttl_limited(key, WHOLE).await? {
            Fetched::Found(read) => Some(read),
            Fetched::Absent | Fetched::TooLarge => None,
        })
    }

    /// `get_many(keys, limit)`.
    /// `get_tagged(key, tags, limit)`: the entry and the tags' tokens.
    #[allow(clippy::type_complexity)]
    pub async fn get_tagged(
        &self,
        key: &str,
        tags: &[&str],
        limit: usize,
    ) -> Result<(Fetched<Vec<u8>>, Vec<Fetched<Vec<u8>>>), CacheError> {
        let key = self.0.prefixed(key).into_owned();
        let tags: Vec<String> = tags
            .iter()
            .map(|tag| self.0.prefixed(tag).into_owned())
            .collect();
        self.0
            .guarded(&key, self.0.backend().get_tagged(&key, &tags, limit))
            .await
    }

    pub async fn get_many(
        &self,
        keys: &[String],
        limit: usize,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| self.0.prefixed(k).into_owned())
            .collect();
        let route = keys.first().map_or("", String::as_str);
        self.0
            .guarded(route, self.0.backend().get_many(&keys, limit))
            .await
    }

    /// `set_if_longer(key, limit, value, px)`.
    pub async fn set_if_longer(
        &self,
        key: &str,
        limit: usize,
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let set = self.0.backend().set_if_longer(key, limit, value, px);
        self.0.guarded(key, set).await
    }

    /// `set(key, value, px)`.
    pub async fn set(&self, key: &str, value: &[u8], px: u64) -> Result<(), CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        self.0
            .guarded(key, self.0.backend().set(key, value, px))
            .await
    }

    /// `set_if_absent(key, value, px)`.
    pub async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let set = self.0.backend().set_if_absent(key, value, px);
        self.0.guarded(key, set).await
    }

    /// `compare_and_set(key, prefix, value, px)`.
    pub async fn compare_and_set(
        &self,
        key: &str,
        prefix: &[u8],
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let set = self.0.backend().compare_and_set(key, prefix, value, px);
        self.0.guarded(key, set).await
    }

    /// `compare_and_delete(key, prefix)`.
    pub async fn compare_and_delete(&self, key: &str, prefix: &[u8]) -> Result<bool, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let delete = self.0.backend().compare_and_delete(key, prefix);
        self.0.guarded(key, delete).await
    }

    /// `compare_and_expire(key, prefix, px)`.
    pub async fn compare_and_expire(
        &self,
        key: &str,
        prefix: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let key = self.0.prefixed(key);
        let key = &*key;
        let expire = self.0.backend().compare_and_expire(key, prefix, px);
        self.0.guarded(key, expire).await
    }

    /// `delete(keys)`, as an invalidation sends it (waiting for replicas
    /// where the cache is configured to).
    pub async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| self.0.prefixed(k).into_owned())
            .collect();
        let keys = &keys[..];
        let route = keys.first().map_or("", String::as_str);
        self.0
            .guarded(route, self.0.backend().delete_durably(keys))
            .await
    }

    /// `check()`.
    pub async fn check(&self) -> Result<(), CacheError> {
        self.0.backend().check(self.0.breaker()).await
    }
}
