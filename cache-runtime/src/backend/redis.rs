//! Redis standalone on the `redis` crate's `ConnectionManager`: one
//! multiplexed connection, re-established by itself after Redis restarts.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::cache::is_rejected_credentials;
use crate::error::CacheError;

/// Stores a computed value only if the key still starts with what the
/// caller saw (its lease placeholder, or the header of the value it
/// refreshed): a `DEL` (invalidation) or another value in the meantime wins.
static COMPARE_AND_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
          end
          return false",
    )
});

/// Gives a lease back (the body failed): deletes the key only if it still
/// holds the caller's placeholder.
static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
              return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

pub(crate) struct RedisBackend {
    client: redis::Client,
    /// Replaced by [`RedisBackend::check`] after Redis rejected the
    /// credentials: a `ConnectionManager` whose connection attempt failed
    /// that way never tries again by itself.
    conn: ArcSwap<ConnectionManager>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend").finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Parses the URL and prepares a connection without opening it: the
    /// first command connects, so a server that is down does not stop the
    /// service from starting. Must be called inside a Tokio runtime.
    pub(crate) fn new(url: &str) -> Result<Self, CacheError> {
        let client = redis::Client::open(url).map_err(CacheError::InvalidUrl)?;
        let conn = ArcSwap::from_pointee(Self::manager(&client)?);
        Ok(RedisBackend { client, conn })
    }

    fn manager(client: &redis::Client) -> Result<ConnectionManager, CacheError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // One connection attempt per command that finds the connection
            // broken, no retry loop: the circuit breaker paces the attempts
            // (one probe per cool-down), and the attempt's own error (refused,
            // WRONGPASS) reaches the log instead of an op timeout.
            .set_number_of_retries(0)
            // The cache's op timeout bounds every operation; a second timer
            // per command would only cost.
            .set_response_timeout(None);
        ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(CacheError::InvalidUrl)
    }

    /// A handle on the shared multiplexed connection (an `Arc` clone).
    fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Whether Redis can be used again, for the circuit breaker's probe. A
    /// command that finds the connection broken fails and only starts the
    /// reconnection, so a failed `PING` is tried once more on the new
    /// connection; after rejected credentials, on a new manager.
    pub(crate) async fn check(&self) -> Result<(), CacheError> {
        match self.ping().await {
            Err(CacheError::Redis(e)) if e.is_io_error() => self.ping().await,
            Err(e) if is_rejected_credentials(&e) => {
                let fresh = Self::manager(&self.client)?;
                self.conn.store(Arc::new(fresh));
                self.ping().await
            }
            outcome => outcome,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut conn = self.conn();
        Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
    }

    pub(crate) async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl_millis: u64,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl_millis)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// `SET key value NX PX ttl`: whether the key was absent and is now set.
    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl_millis: u64,
    ) -> Result<bool, CacheError> {
        let mut conn = self.conn();
        let reply: Option<()> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(ttl_millis)
            .query_async(&mut conn)
            .await?;
        Ok(reply.is_some())
    }

    pub(crate) async fn compare_and_set(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl_millis: u64,
    ) -> Result<bool, CacheError> {
        let mut conn = self.conn();
        let reply: Option<()> = COMPARE_AND_SET
            .key(key)
            .arg(expected)
            .arg(value)
            .arg(ttl_millis)
            .invoke_async(&mut conn)
            .await?;
        Ok(reply.is_some())
    }

    pub(crate) async fn compare_and_delete(
        &self,
        key: &str,
        expected: &[u8],
    ) -> Result<bool, CacheError> {
        let mut conn = self.conn();
        let deleted: u64 = COMPARE_AND_DELETE
            .key(key)
            .arg(expected)
            .invoke_async(&mut conn)
            .await?;
        Ok(deleted > 0)
    }

    /// `DEL` of several keys in one round trip; how many existed.
    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        let mut conn = self.conn();
        Ok(redis::cmd("DEL").arg(keys).query_async(&mut conn).await?)
    }
}
