//! Redis standalone on the `redis` crate's `ConnectionManager`: one
//! multiplexed connection, re-established by itself after Redis restarts.
//! The commands themselves are in [`super::commands`].
//!
//! Commands of one connection are applied in the order they were sent, so a
//! compensation sent after a command that timed out on the client lands
//! after it, whenever that one lands.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::Fetched;
use super::commands::{self, DurablePool, Wanted};
use crate::error::CacheError;

pub(crate) struct RedisBackend {
    /// Boxed: with TLS parameters it is most of this struct's size, and it
    /// is used only to make a new connection manager.
    client: Box<redis::Client>,
    /// Replaced by [`RedisBackend::check`] after Redis rejected the
    /// credentials: a `ConnectionManager` whose connection attempt failed
    /// that way never tries again by itself.
    conn: ArcSwap<ConnectionManager>,
    /// Unless writes are acknowledged by the primary only: connections of their own for the writes
    /// that `WAIT` for replicas, since `WAIT` blocks the connection it is
    /// sent on (and every hit queued behind it).
    durable: Option<DurablePool<ConnectionManager>>,
    /// The same server in RESP3, for the local tier's tracking connection.
    tracking_client: Box<redis::Client>,
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
    pub(crate) fn new(url: &str, options: &super::ConnectOptions<'_>) -> Result<Self, CacheError> {
        let super::ConnectOptions {
            nodelay,
            durability,
            tls,
            ..
        } = *options;
        let info = super::connection_info(url)?;
        // TCP_NODELAY by default: see `CacheBuilder::tcp_nodelay`. Found by
        // bench/src/bin/batch_bench.rs through a 1 ms proxy: a batch's ten
        // concurrent lease commands went out one, then nine a round trip
        // later.
        let tcp = info.tcp_settings().clone().set_nodelay(nodelay);
        let info = info.set_tcp_settings(tcp);
        let tracking_client = Box::new(super::client(super::resp3(info.clone()), tls)?);
        let client = super::client(info, tls)?;
        let conn = ArcSwap::from_pointee(Self::manager(&client)?);
        let durable = match durability {
            Some(durability) => {
                let conns = (0..commands::DURABLE_CONNECTIONS)
                    .map(|_| Self::manager(&client))
                    .collect::<Result<_, _>>()?;
                Some(DurablePool::new(durability, conns))
            }
            None => None,
        };
        Ok(RedisBackend {
            client: Box::new(client),
            conn,
            durable,
            tracking_client,
        })
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

    /// A client for the local tier's tracking connection (RESP3).
    pub(crate) fn tracking_client(&self) -> redis::Client {
        redis::Client::clone(&self.tracking_client)
    }

    /// A handle on the shared multiplexed connection (an `Arc` clone).
    pub(crate) fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    pub(crate) async fn ping(&self) -> Result<(), CacheError> {
        commands::ping(&mut self.conn()).await
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

    /// One `GETRANGE` per key, pipelined: one round trip.
    pub(crate) async fn get_many(
        &self,
        keys: &[String],
        limit: usize,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        commands::get_many(&mut self.conn(), keys, limit).await
    }

    /// `DEL` of several keys in one round trip; how many existed.
    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        commands::delete(&mut self.conn(), keys).await
    }

    /// [`RedisBackend::delete`], then `WAIT` for replicas if configured.
    pub(crate) async fn delete_durably(&self, keys: &[String]) -> Result<u64, CacheError> {
        let Some(pool) = self.waits().await? else {
            return self.delete(keys).await;
        };
        let mut conn = pool.pick();
        let existed = commands::delete(&mut conn, keys).await?;
        commands::wait_replicated(&mut conn, Self::asked(pool)).await?;
        Ok(existed)
    }

    /// [`commands::set`], then `WAIT` for replicas if configured.
    pub(crate) async fn set_durably(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<(), CacheError> {
        let Some(pool) = self.waits().await? else {
            return commands::set(&mut self.conn(), key, value, px).await;
        };
        let mut conn = pool.pick();
        commands::set(&mut conn, key, value, px).await?;
        commands::wait_replicated(&mut conn, Self::asked(pool)).await
    }

    /// A write of its own on `key` (write-behind's), then `WAIT` for
    /// replicas if configured, on the same connection, the one of `key`.
    pub(crate) async fn run_durably(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, CacheError> {
        let Some(pool) = self.waits().await? else {
            return commands::query(&mut self.conn(), cmd).await;
        };
        let mut conn = pool.pick_for(key);
        let value = commands::query(&mut conn, cmd).await?;
        commands::wait_replicated(&mut conn, Self::asked(pool)).await?;
        Ok(value)
    }

    /// The connections for a write that waits for replicas; `None` when
    /// it waits for none. With `Wanted::All`, the server is asked first
    /// (`ROLE`, on the shared connection, at most once per second of
    /// writes): one without replicas gets its writes on the shared
    /// connection, and the durable ones are never opened.
    async fn waits(&self) -> Result<Option<&DurablePool<ConnectionManager>>, CacheError> {
        let Some(pool) = &self.durable else {
            return Ok(None);
        };
        if pool.durability.wanted == Wanted::All {
            let count = match pool.replicas.known() {
                Some(count) => count,
                None => commands::role_count(&mut self.conn(), &pool.replicas)
                    .await?
                    .unwrap_or(0),
            };
            if count == 0 {
                return Ok(None);
            }
        }
        Ok(Some(pool))
    }

    /// What a `WAIT` on the server asks for. Its own word on its replicas
    /// is all there is to go by: no failover moves its data elsewhere
    /// behind its back (Sentinel's does, see `SentinelBackend`).
    fn asked(pool: &DurablePool<ConnectionManager>) -> commands::Asked<'_> {
        commands::Asked {
            durability: pool.durability,
            replicas: &pool.replicas,
            listed: None,
            trust_role: pool.durability.wanted == Wanted::All,
        }
    }
}
