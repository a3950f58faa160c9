//! Redis standalone on the `redis` crate's `ConnectionManager`: one
//! multiplexed connection, re-established by itself after Redis restarts.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::CacheError;

#[derive(Clone)]
pub(crate) struct RedisBackend {
    conn: ConnectionManager,
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
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // Reconnection backoff: short enough that hits resume soon after
            // a restart; when retries run out, the next command starts over.
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(4);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(CacheError::InvalidUrl)?;
        Ok(RedisBackend { conn })
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
    }

    pub(crate) async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl_millis: u64,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl_millis)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<bool, CacheError> {
        let mut conn = self.conn.clone();
        let deleted: u64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
        Ok(deleted > 0)
    }
}
