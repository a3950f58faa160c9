//! Redis behind Sentinel: the primary of a named service, found through the
//! sentinels and found again after every failover.
//!
//! The `redis` crate finds the primary but does not follow it: a
//! `ConnectionManager` reconnects to the address it was built with, which
//! after a failover is a replica. So this backend keeps one multiplexed
//! connection to the primary it resolved, and drops it as soon as a reply
//! says the node is no longer usable as a primary: the connection broke
//! (Sentinel's reconfiguration of a demoted primary ends with `CLIENT
//! KILL`), the node refused a write (`READONLY`), or it is syncing
//! (`MASTERDOWN`, `LOADING`). The next command asks the sentinels again and
//! connects to the address they name, after checking with `ROLE` that the
//! node there says it is a primary (the Sentinel client guidelines): a
//! replica is never read, so the lease protocol holds as on a single server.
//!
//! A primary that stops answering (no reply at all) is not dropped on a
//! timeout, which a slow command can cause too; the circuit breaker opens,
//! and its probe asks the sentinels afresh, so the cache follows a failover
//! away from a hung primary within one cool-down.
//!
//! # The fence: invalidations a failover lost
//!
//! Replication is asynchronous, and during a failover the old primary goes
//! on accepting writes until Sentinel demotes it (about 10 s after
//! `SENTINEL FAILOVER` in the deployment tests): every `DEL` it took after
//! the replica's promotion, or just before it without replicating it, is
//! lost, and the new primary serves those entries' old values. The cache
//! therefore remembers the keys it invalidated or wrote in the last
//! [`FENCE_WINDOW`] (at most [`FENCE_KEYS`]), and every time it connects
//! to a primary after the first, it deletes them there before any command
//! of a caller is sent to it. What remains: another process's invalidation
//! lost the same way is replayed by that process when it switches, so a
//! reader here may see its old value in the moment between the two
//! switches; and a write older than the window (a primary cut off from the
//! sentinels for longer, still taking writes) is not covered: set
//! `min-replicas-to-write` on the servers for that case.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use super::commands::{self, Durability, DurablePool, Wanted};

/// A Sentinel service as `CacheBuilder::sentinel` names it.
#[derive(Clone, Copy)]
pub(crate) struct SentinelService<'a> {
    /// The service name the sentinels monitor (`mymaster`).
    pub(crate) name: &'a str,
    /// The sentinels' URLs.
    pub(crate) sentinels: &'a [String],
    /// The sentinels' own credentials, if any.
    pub(crate) auth: Option<&'a SentinelAuth>,
    /// Whether a new primary gets the fence (off only in tests).
    pub(crate) fence: bool,
}

/// The credentials of the sentinels themselves (not of the nodes).
#[derive(Clone)]
pub(crate) struct SentinelAuth {
    pub(crate) username: Option<String>,
    pub(crate) password: String,
}

impl std::fmt::Debug for SentinelAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("SentinelAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}
use crate::error::CacheError;

/// How far back the keys replayed on a new primary go; see the module docs.
pub(crate) const FENCE_WINDOW: Duration = Duration::from_secs(30);
/// The most keys remembered for the fence (the oldest go first).
pub(crate) const FENCE_KEYS: usize = 100_000;
/// Keys per `DEL` of the replay.
const REPLAY_CHUNK: usize = 512;

/// How to reach a service's primary through its sentinels.
#[derive(Clone)]
pub(crate) struct SentinelBackend {
    resolver: Arc<Resolver>,
}

struct Resolver {
    service: String,
    /// Asks the sentinels; locked while one resolution runs, so that a
    /// failover costs one resolution, not one per waiting command.
    sentinel: tokio::sync::Mutex<SentinelClient>,
    config: AsyncConnectionConfig,
    db: i64,
    durability: Option<Durability>,
    current: ArcSwapOption<Primary>,
    /// The nodes' certificates, for the local tier's tracking connection.
    tls: Option<super::Tls>,
    /// Whether a primary was connected before: the next one gets the fence.
    connected_before: AtomicBool,
    fence: Fence,
}

/// The keys invalidated or written lately, with when.
struct Fence {
    /// Off only in tests, to show what the fence prevents.
    enabled: bool,
    recent: Mutex<VecDeque<(Instant, String)>>,
}

impl Fence {
    fn note(&self, keys: &[String]) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        while recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > FENCE_WINDOW)
        {
            recent.pop_front();
        }
        for key in keys {
            if recent.len() >= FENCE_KEYS {
                recent.pop_front();
            }
            recent.push_back((now, key.clone()));
        }
    }

    /// The distinct keys noted within the window.
    fn keys(&self) -> Vec<String> {
        let now = Instant::now();
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashSet::new();
        recent
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= FENCE_WINDOW)
            .filter(|(_, key)| seen.insert(key.as_str()))
            .map(|(_, key)| key.clone())
            .collect()
    }
}

/// The primary a local tier's tracking connection was opened to: its
/// copies are good only while this is still the primary in use.
pub(crate) struct PrimaryInUse(Arc<Primary>);

/// The primary in use, and its connections.
struct Primary {
    address: String,
    /// How it was reached (address, credentials, database, TLS mode).
    client_info: redis::ConnectionInfo,
    conn: MultiplexedConnection,
    /// Unless writes are acknowledged by the primary only: the connections
    /// for writes that `WAIT`.
    durable: Option<DurablePool<MultiplexedConnection>>,
}

impl std::fmt::Debug for SentinelBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelBackend")
            .field("service", &self.resolver.service)
            .finish_non_exhaustive()
    }
}

impl SentinelBackend {
    /// Checks the sentinel URLs without connecting: the first command
    /// connects. The user, password and database of the first URL are
    /// those of the Redis nodes; the sentinels get `auth`, if any. A
    /// `rediss://` URL makes every connection TLS, to the sentinels and to
    /// the nodes, with the builder's certificates.
    pub(crate) fn new(
        service: &SentinelService<'_>,
        options: &super::ConnectOptions<'_>,
    ) -> Result<Self, CacheError> {
        let SentinelService {
            name: service,
            sentinels,
            auth,
            fence,
        } = *service;
        let super::ConnectOptions {
            nodelay,
            durability,
            tls,
            ..
        } = *options;
        let infos = sentinels
            .iter()
            .map(|url| super::connection_info(url))
            .collect::<Result<Vec<_>, _>>()?;
        let first = infos.first().ok_or(CacheError::NoBackend)?;
        let settings = first.redis_settings();
        let db = settings.db();
        let tcp = first.tcp_settings().clone().set_nodelay(nodelay);
        let mut builder = SentinelClientBuilder::new(
            infos.iter().map(|info| info.addr().clone()),
            service,
            SentinelServerType::Master,
        )
        .map_err(CacheError::invalid_url)?
        .set_client_to_redis_db(db)
        .set_client_to_redis_tcp_settings(tcp.clone())
        .set_client_to_sentinel_tcp_settings(tcp);
        if let Some(username) = settings.username() {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = settings.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(auth) = auth {
            if let Some(username) = &auth.username {
                builder = builder.set_client_to_sentinel_username(username);
            }
            builder = builder.set_client_to_sentinel_password(&auth.password);
        }
        if let Some(mode) = super::tls_mode(first) {
            builder = builder
                .set_client_to_redis_tls_mode(mode)
                .set_client_to_sentinel_tls_mode(mode);
            builder = super::sentinel_certificates(builder, tls);
        }
        let sentinel = builder.build().map_err(CacheError::invalid_url)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // The cache's op timeout bounds every operation.
            .set_response_timeout(None);
        Ok(SentinelBackend {
            resolver: Arc::new(Resolver {
                service: service.to_owned(),
                sentinel: tokio::sync::Mutex::new(sentinel),
                config,
                db,
                durability,
                current: ArcSwapOption::empty(),
                tls: tls.cloned(),
                connected_before: AtomicBool::new(false),
                fence: Fence {
                    enabled: fence,
                    recent: Mutex::default(),
                },
            }),
        })
    }

    /// A connection that sends to the current primary, resolving it first
    /// if none is known.
    pub(crate) fn conn(&self) -> SentinelConn {
        SentinelConn {
            resolver: self.resolver.clone(),
            primary: self.resolver.current.load_full(),
            durable: false,
            key: None,
            picked: None,
        }
    }

    /// Resolves the primary and checks that it answers.
    pub(crate) async fn connect(&self) -> Result<(), CacheError> {
        commands::ping(&mut self.conn()).await
    }

    /// The circuit breaker's probe: asks the sentinels again (the primary
    /// may have moved while nothing answered), then pings.
    pub(crate) async fn check(&self) -> Result<(), CacheError> {
        let resolver = &self.resolver;
        let fresh = {
            let mut sentinel = resolver.sentinel.lock().await;
            resolver.connect(&mut sentinel).await
        };
        match fresh {
            Ok(primary) => {
                let address = primary.address.clone();
                let old = resolver.current.swap(Some(Arc::new(primary)));
                if let Some(old) = old.filter(|old| old.address != address) {
                    tracing::info!(from = %old.address, to = %address, service = %resolver.service, "the Sentinel primary moved");
                }
                self.connect().await
            }
            Err(error) => {
                resolver.current.store(None);
                Err(CacheError::redis(error))
            }
        }
    }

    /// For the local tier's tracking connection: a RESP3 client of the
    /// primary in use (resolved first if none is), and which primary that
    /// is. The caller checks `ROLE` on its own connection.
    pub(crate) async fn tracking_client(
        &self,
    ) -> Result<(redis::Client, PrimaryInUse), CacheError> {
        let primary = self.resolver.primary().await.map_err(CacheError::redis)?;
        let info = super::resp3(primary.client_info.clone());
        let client = super::client(info, self.resolver.tls.as_ref())?;
        Ok((client, PrimaryInUse(primary)))
    }

    /// Whether `primary` is still the primary in use: after a failover
    /// (or any reconnection) the local tier drops its copies.
    pub(crate) fn is_in_use(&self, primary: &PrimaryInUse) -> bool {
        self.resolver
            .current
            .load()
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &primary.0))
    }

    /// `UNLINK`, noted for the fence like a `DEL`.
    pub(crate) async fn unlink(&self, keys: &[String]) -> Result<u64, CacheError> {
        self.resolver.fence.note(keys);
        commands::unlink(&mut self.conn(), keys).await
    }

    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        // Noted before it is sent: a `DEL` whose reply is lost may have
        // landed on a primary that is about to lose it.
        self.resolver.fence.note(keys);
        commands::delete(&mut self.conn(), keys).await
    }

    /// [`SentinelBackend::delete`], then `WAIT` for replicas if configured.
    pub(crate) async fn delete_durably(&self, keys: &[String]) -> Result<u64, CacheError> {
        let Some(durability) = self.resolver.durability else {
            return self.delete(keys).await;
        };
        self.resolver.fence.note(keys);
        let mut conn = self.conn();
        conn.durable = true;
        let existed = commands::delete(&mut conn, keys).await?;
        conn.wait_replicated(Some(durability)).await?;
        Ok(existed)
    }

    /// A write of its own on `key` (write-behind's), then `WAIT` for
    /// replicas if configured; `key` is noted for the fence, as a
    /// write-through's is.
    pub(crate) async fn run_durably(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, CacheError> {
        self.resolver
            .fence
            .note(std::slice::from_ref(&key.to_owned()));
        let mut conn = self.conn();
        conn.durable = self.resolver.durability.is_some();
        conn.key = Some(key.to_owned());
        let value = commands::query(&mut conn, cmd).await?;
        conn.wait_replicated(self.resolver.durability).await?;
        Ok(value)
    }

    /// `SET`, then `WAIT` for replicas if configured.
    pub(crate) async fn set_durably(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<(), CacheError> {
        // A write-through lost in a failover leaves the old value: the
        // replay deletes it.
        self.resolver
            .fence
            .note(std::slice::from_ref(&key.to_owned()));
        let mut conn = self.conn();
        conn.durable = self.resolver.durability.is_some();
        commands::set(&mut conn, key, value, px).await?;
        conn.wait_replicated(self.resolver.durability).await
    }
}

impl Resolver {
    /// The primary in use, or a newly resolved one. The resolution runs in
    /// a task of its own: a caller that times out does not cut a replay
    /// short, and the next caller finds the primary installed.
    async fn primary(self: &Arc<Self>) -> RedisResult<Arc<Primary>> {
        if let Some(primary) = self.current.load_full() {
            return Ok(primary);
        }
        let resolver = self.clone();
        let resolution = tokio::spawn(async move {
            let mut sentinel = resolver.sentinel.lock().await;
            // Resolved by another command while this one waited for the lock.
            if let Some(primary) = resolver.current.load_full() {
                return Ok(primary);
            }
            let primary = Arc::new(resolver.connect(&mut sentinel).await?);
            resolver.current.store(Some(primary.clone()));
            Ok(primary)
        });
        resolution.await.unwrap_or_else(|join| {
            Err(RedisError::from((
                redis::ErrorKind::Client,
                "the Sentinel resolution task failed",
                join.to_string(),
            )))
        })
    }

    /// Asks the sentinels for the primary, connects, and checks its role.
    async fn connect(&self, sentinel: &mut SentinelClient) -> RedisResult<Primary> {
        let client = sentinel.async_get_client().await?;
        let address = client.get_connection_info().addr().to_string();
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the node Sentinel named as primary says it is not one (a failover is under way)",
                address,
            )));
        }
        let durable = match self.durability {
            Some(durability) => {
                let mut conns = Vec::new();
                for _ in 0..commands::DURABLE_CONNECTIONS {
                    conns.push(
                        client
                            .get_multiplexed_async_connection_with_config(&self.config)
                            .await?,
                    );
                }
                Some(DurablePool::new(durability, conns))
            }
            None => None,
        };
        if self.connected_before.swap(true, Ordering::SeqCst) {
            self.replay(&mut conn, &address).await?;
        } else {
            tracing::debug!(primary = %address, service = %self.service, "connected to the Sentinel primary");
        }
        Ok(Primary {
            address,
            client_info: client.get_connection_info().clone(),
            conn,
            durable,
        })
    }

    /// The fence (see the module docs): deletes on a primary connected to
    /// again the keys invalidated or written within the window, before any
    /// caller's command reaches it.
    async fn replay(&self, conn: &mut MultiplexedConnection, address: &str) -> RedisResult<()> {
        if !self.fence.enabled {
            return Ok(());
        }
        let keys = self.fence.keys();
        let mut pipe = redis::pipe();
        for chunk in keys.chunks(REPLAY_CHUNK) {
            pipe.cmd("DEL").arg(chunk).ignore();
        }
        if !keys.is_empty() {
            pipe.query_async::<()>(conn).await?;
        }
        tracing::info!(primary = %address, service = %self.service, replayed = keys.len(), "connected to a Sentinel primary again: deleted the keys written in the last {FENCE_WINDOW:?}, which a failover may have lost");
        Ok(())
    }

    /// Drops `primary` if a reply says it cannot serve as the primary any
    /// more (see the module docs); the next command resolves again.
    fn judge<T>(&self, primary: &Arc<Primary>, reply: &RedisResult<T>, server_error: Option<&str>) {
        let gone = match reply {
            Err(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || is_not_primary(e.code())
            }
            Ok(_) => is_not_primary(server_error),
        };
        if !gone {
            return;
        }
        let current = self.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, primary)) {
            tracing::debug!(primary = %primary.address, "the Sentinel primary is gone: resolving again");
            self.current.compare_and_swap(&current, None);
        }
    }
}

fn is_not_primary(code: Option<&str>) -> bool {
    matches!(code, Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// The server error code in a reply, if it is one.
fn error_code(value: &Value) -> Option<&str> {
    match value {
        Value::ServerError(e) => Some(e.code()),
        _ => None,
    }
}

/// A connection to the current primary: resolves it on first use, and
/// reports replies that show it gone (see [`Resolver::judge`]).
pub(crate) struct SentinelConn {
    resolver: Arc<Resolver>,
    primary: Option<Arc<Primary>>,
    /// Send on one of the primary's connections for durable writes, the
    /// same for every command of this handle (a `WAIT` covers the writes
    /// sent before it on its own connection only).
    durable: bool,
    /// With `durable`: the connection of this key (see
    /// `DurablePool::pick_for`), else the next in turn.
    key: Option<String>,
    picked: Option<MultiplexedConnection>,
}

impl SentinelConn {
    /// `WAIT` on the primary this handle wrote to.
    async fn wait_replicated(&mut self, durability: Option<Durability>) -> Result<(), CacheError> {
        let Some(primary) = self.primary.clone() else {
            return Ok(()); // nothing was written
        };
        let (Some(pool), Some(durability)) = (&primary.durable, durability) else {
            return Ok(());
        };
        // The fence covers a write that a primary took after its replica
        // was promoted away: its own word on its replicas may count.
        let asked = commands::Asked {
            durability,
            replicas: &pool.replicas,
            listed: None,
            trust_role: self.resolver.fence.enabled || durability.wanted == Wanted::All,
        };
        commands::wait_replicated(self, asked).await
    }

    async fn target(&mut self) -> RedisResult<(Arc<Primary>, MultiplexedConnection)> {
        let primary = match &self.primary {
            Some(primary) => primary.clone(),
            None => {
                let primary = self.resolver.primary().await?;
                self.primary = Some(primary.clone());
                primary
            }
        };
        let conn = match (&primary.durable, self.durable) {
            (Some(pool), true) => {
                let key = self.key.as_deref();
                let picked = self.picked.get_or_insert_with(|| match key {
                    Some(key) => pool.pick_for(key),
                    None => pool.pick(),
                });
                picked.clone()
            }
            _ => primary.conn.clone(),
        };
        Ok((primary, conn))
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (primary, mut conn) = self.target().await?;
            let reply = conn.req_packed_command(cmd).await;
            let code = reply.as_ref().ok().and_then(error_code);
            self.resolver.judge(&primary, &reply, code);
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (primary, mut conn) = self.target().await?;
            let reply = conn.req_packed_commands(pipeline, offset, count).await;
            let code = reply
                .as_ref()
                .ok()
                .and_then(|values| values.iter().find_map(error_code));
            self.resolver.judge(&primary, &reply, code);
            reply
        })
    }

    fn get_db(&self) -> i64 {
        self.resolver.db
    }
}
