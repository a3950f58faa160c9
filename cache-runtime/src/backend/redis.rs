//! Redis standalone on the `redis` crate's `ConnectionManager`: one
//! multiplexed connection, re-established by itself after Redis restarts.
//! The compare operations of the backend contract are Lua scripts, each on
//! one key, so they are atomic on the server.
//!
//! Commands of one connection are applied in the order they were sent, so a
//! compensation sent after a command that timed out on the client lands
//! after it, whenever that one lands.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};

use super::Stored;
use crate::error::CacheError;

/// `GET` and `PTTL` in one step: the remaining TTL by the server's clock.
/// Keys per `MGET` of a batch lookup.
const MGET_CHUNK: usize = 256;

static GET_WITH_TTL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local value = redis.call('GET', KEYS[1])
          if not value then return false end
          return {value, redis.call('PTTL', KEYS[1])}",
    )
});

static COMPARE_AND_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
          end
          return false",
    )
});

static COMPARE_AND_DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('DEL', KEYS[1])
          end
          return 0",
    )
});

static COMPARE_AND_EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local current = redis.call('GET', KEYS[1])
          if current and string.sub(current, 1, #ARGV[1]) == ARGV[1] then
              return redis.call('PEXPIRE', KEYS[1], ARGV[2])
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
    pub(crate) fn new(url: &str, nodelay: bool) -> Result<Self, CacheError> {
        let info = url
            .into_connection_info()
            .map_err(CacheError::invalid_url)?;
        // TCP_NODELAY by default: see `CacheBuilder::tcp_nodelay`. Found by
        // examples/batch_bench.rs through a 1 ms proxy: a batch's ten
        // concurrent lease commands went out one, then nine a round trip
        // later.
        let tcp = info.tcp_settings().clone().set_nodelay(nodelay);
        let client =
            redis::Client::open(info.set_tcp_settings(tcp)).map_err(CacheError::invalid_url)?;
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
            .map_err(CacheError::invalid_url)
    }

    /// A handle on the shared multiplexed connection (an `Arc` clone).
    fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(CacheError::redis)
    }

    /// Whether Redis can be used again, for the circuit breaker's probe. A
    /// command that finds the connection broken fails and only starts the
    /// reconnection, so a failed `PING` is tried once more on the new
    /// connection; after rejected credentials, on a new manager.
    pub(crate) async fn check(&self) -> Result<(), CacheError> {
        match self.ping().await {
            Err(e) if e.is_rejected_credentials() => {
                let fresh = Self::manager(&self.client)?;
                self.conn.store(Arc::new(fresh));
                self.ping().await
            }
            Err(e) if e.is_unavailable() => self.ping().await,
            outcome => outcome,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)
    }

    /// One `MGET` per [`MGET_CHUNK`] keys, pipelined: one round trip, and
    /// no single command so long that it stalls the server.
    pub(crate) async fn get_many(
        &self,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(MGET_CHUNK) {
            pipe.cmd("MGET").arg(chunk);
        }
        let chunks: Vec<Vec<Option<Vec<u8>>>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        let values: Vec<Option<Vec<u8>>> = chunks.into_iter().flatten().collect();
        if values.len() != keys.len() {
            return Err(CacheError::redis(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "MGET answered a different number of values than keys",
            ))));
        }
        Ok(values)
    }

    pub(crate) async fn get_with_ttl(&self, key: &str) -> Result<Option<Stored>, CacheError> {
        let reply: Option<(Vec<u8>, i64)> = GET_WITH_TTL
            .key(key)
            .invoke_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        Ok(reply.map(|(bytes, pttl)| Stored {
            bytes,
            // -1: no expiry. (-2, gone, cannot follow a GET in one script.)
            ttl_millis: u64::try_from(pttl).ok(),
        }))
    }

    pub(crate) async fn set(&self, key: &str, value: &[u8], px: u64) -> Result<(), CacheError> {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(px)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(CacheError::redis)
    }

    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let reply: Option<()> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(px)
            .query_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        Ok(reply.is_some())
    }

    pub(crate) async fn compare_and_set(
        &self,
        key: &str,
        prefix: &[u8],
        value: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let reply: Option<()> = COMPARE_AND_SET
            .key(key)
            .arg(prefix)
            .arg(value)
            .arg(px)
            .invoke_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        Ok(reply.is_some())
    }

    pub(crate) async fn compare_and_delete(
        &self,
        key: &str,
        prefix: &[u8],
    ) -> Result<bool, CacheError> {
        let deleted: u64 = COMPARE_AND_DELETE
            .key(key)
            .arg(prefix)
            .invoke_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        Ok(deleted > 0)
    }

    pub(crate) async fn compare_and_expire(
        &self,
        key: &str,
        prefix: &[u8],
        px: u64,
    ) -> Result<bool, CacheError> {
        let set: u64 = COMPARE_AND_EXPIRE
            .key(key)
            .arg(prefix)
            .arg(px)
            .invoke_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)?;
        Ok(set > 0)
    }

    /// `DEL` of several keys in one round trip; how many existed.
    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut self.conn())
            .await
            .map_err(CacheError::redis)
    }
}
