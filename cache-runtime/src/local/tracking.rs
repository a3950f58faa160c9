//! The tracking connection of the local tier: a RESP3 connection with
//! `CLIENT TRACKING ON OPTIN`, on which the local tier's reads (and tagged
//! reads, whose tags' tokens it keeps) are sent, so that
//! the server sends an invalidation for every key read on it, right after
//! `CLIENT CACHING YES`, when that key changes (any write, expiry,
//! eviction, `FLUSHDB`). A tagged hit's entry is read there untracked
//! (see `backend::commands::Track`).
//!
//! Why not the `redis` crate's client-side cache (`cache-aio`): it keeps
//! the *replies*, so each hit would still decode the value (microseconds
//! for a 1 KB JSON value, where a local hit must take well under one); it
//! is bounded by a number of replies, not bytes; it has one TTL per
//! connection where each function has its own; and it leaves no room for
//! a fill to be refused when it raced with its key's invalidation. This
//! module uses the crate's building blocks instead: a multiplexed RESP3
//! connection and its push messages, handled as they are read, in order.
//!
//! The connection is opened on the first read of a `local` function (or
//! of a tagged one, on a standalone server: see "Tags' tokens" in
//! [`crate::local`]) and
//! kept by a background task that sends a `PING` every second: when the
//! connection is lost (the server closed it, `CLIENT KILL`, a restart) or
//! stops answering, every local copy is dropped (invalidations may have
//! been missed) and a new connection is opened and tracked before it is
//! used again. The task ends with the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

use crate::backend::{ClusterBackend, PrimaryInUse, SentinelBackend};
use crate::error::CacheError;
use crate::local::LocalTier;

/// Between two heartbeats of the tracking connection, and how long one
/// may take: a connection that stopped answering is given up after about
/// twice this.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Between the keys of one broadcast message (`Cache::announce` joins them
/// with it): no key of the cache holds it (key parts are escaped).
const BROADCAST_SEPARATOR: u8 = b'\n';

/// How often the connection's anchor (a Sentinel primary) is looked at.
const ANCHOR_CHECK: Duration = Duration::from_millis(100);
/// First and longest pause between two attempts to open the connection.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// Where the tracking connection goes.
pub(crate) enum Source {
    /// A standalone server: a client of it speaking RESP3 (boxed: with
    /// TLS parameters it is large).
    Server(Box<redis::Client>),
    /// The primary of a Sentinel service, whichever it is: the connection
    /// is opened to the primary in use, and given up (every copy dropped)
    /// as soon as the cache moves to another one.
    Sentinel(SentinelBackend),
    /// A cluster primary, as long as the slot map is the one it was
    /// opened under: when a slot moves, every copy is dropped and the
    /// connection closed (the next read opens one for the new map).
    ClusterNode {
        client: Box<redis::Client>,
        cluster: ClusterBackend,
        epoch: u64,
    },
    /// Any node of a cluster (for a broadcast's subscription: a cluster
    /// delivers every `PUBLISH` to every node): the primary of the
    /// channel's slot when the connection is opened.
    AnyNode(ClusterBackend),
}

/// Where a local function's read is sent so that its copy may be kept.
pub(crate) enum Via {
    /// On the tracking connection, which the server tracks.
    Tracked(Arc<MultiplexedConnection>),
    /// On the cache's own connection: with a broadcast, what matters is
    /// that the subscription is live.
    Shared,
}

/// What a tracking connection is good for as long as it lasts.
enum Anchor {
    /// The server itself.
    Server,
    /// While this primary is the one in use.
    Primary(PrimaryInUse),
    /// While the cluster's slot map has not moved a slot.
    SlotMap(u64),
}

/// The local tier of one cache, and the tracking connections that keep it
/// right: one (standalone, Sentinel) or one per primary (Cluster).
pub(crate) struct Tracking {
    tier: Arc<LocalTier>,
    kind: Kind,
}

enum Kind {
    One(Arc<Connection>),
    /// On a cluster, the key's primary is read on a tracking connection of
    /// its own; connections opened under an older slot map are replaced.
    Cluster {
        cluster: ClusterBackend,
        nodes: Mutex<HashMap<String, Arc<Connection>>>,
        /// The slot map whose change last dropped every copy.
        flushed_for: AtomicU64,
    },
}

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracking").finish_non_exhaustive()
    }
}

impl Tracking {
    /// A [`Source::Server`] client must speak RESP3 (see `backend::resp3`). With
    /// a `channel`, the connection subscribes to it (a broadcast) instead
    /// of tracking.
    pub(crate) fn new(tier: Arc<LocalTier>, source: Source, channel: Option<String>) -> Self {
        Tracking {
            kind: Kind::One(Arc::new(Connection::new(tier.clone(), source, channel))),
            tier,
        }
    }

    /// The local tier of a cluster, tracked on each primary.
    pub(crate) fn cluster(tier: Arc<LocalTier>, cluster: ClusterBackend) -> Self {
        Tracking {
            tier,
            kind: Kind::Cluster {
                cluster,
                nodes: Mutex::new(HashMap::new()),
                flushed_for: AtomicU64::new(0),
            },
        }
    }

    pub(crate) fn tier(&self) -> &LocalTier {
        &self.tier
    }

    /// The broadcast channel, if the tier is kept right by one.
    pub(crate) fn channel(&self) -> Option<&str> {
        match &self.kind {
            Kind::One(connection) => connection.channel.as_deref(),
            Kind::Cluster { .. } => None,
        }
    }

    /// A handle on the tracking connection of a standalone server or a
    /// Sentinel's primary, if it is open and tracked (not a broadcast's
    /// subscription), with its era: the tier's epoch read *before* the
    /// connection was, so that a token read on it is kept only if no
    /// connection was given up since (see "Tags' tokens" in
    /// `crate::local`: a connection is unpublished, then the epoch
    /// bumped). Cloned from the published connection without touching its
    /// `Arc`, which every tagged hit would share.
    pub(crate) fn tracked(&self) -> Option<(MultiplexedConnection, u64)> {
        let Kind::One(connection) = &self.kind else {
            return None;
        };
        if connection.channel.is_some() {
            return None;
        }
        connection.start();
        let era = self.tier.epoch();
        let conn = connection.live.load().as_deref().cloned()?;
        Some((conn, era))
    }

    /// Where to read `key` so that its copy may be kept, if the tracking
    /// connection (or the broadcast's subscription) is open; the first
    /// call for a connection starts the task that opens and keeps it
    /// (inside a Tokio runtime, as every cached call is).
    pub(crate) fn live(&self, key: &str) -> Option<Via> {
        match &self.kind {
            Kind::One(connection) => {
                let conn = connection.live()?;
                Some(if connection.channel.is_some() {
                    Via::Shared
                } else {
                    Via::Tracked(conn)
                })
            }
            Kind::Cluster {
                cluster,
                nodes,
                flushed_for,
            } => {
                let addr = cluster.node_of(key)?;
                let epoch = cluster.primaries_epoch();
                let connection = {
                    let mut nodes = nodes.lock().unwrap_or_else(PoisonError::into_inner);
                    match nodes.get(&addr) {
                        Some(connection) if connection.epoch() == Some(epoch) => connection.clone(),
                        found => {
                            if found.is_some() && flushed_for.swap(epoch, Ordering::SeqCst) != epoch
                            {
                                // The copies of the old map are never
                                // served again: free their memory now.
                                self.tier.flush();
                            }
                            let client = cluster.node_client(&addr).ok()?;
                            let source = Source::ClusterNode {
                                client: Box::new(client),
                                cluster: cluster.clone(),
                                epoch,
                            };
                            let connection =
                                Arc::new(Connection::new(self.tier.clone(), source, None));
                            nodes.insert(addr, connection.clone());
                            connection
                        }
                    }
                };
                connection.live().map(Via::Tracked)
            }
        }
    }
}

/// One tracking connection, opened on first use and kept by a task.
struct Connection {
    tier: Arc<LocalTier>,
    source: Source,
    /// A broadcast's channel, subscribed to instead of tracking.
    channel: Option<String>,
    live: ArcSwapOption<MultiplexedConnection>,
    started: AtomicBool,
}

impl Connection {
    fn new(tier: Arc<LocalTier>, source: Source, channel: Option<String>) -> Self {
        Connection {
            tier,
            source,
            channel,
            live: ArcSwapOption::empty(),
            started: AtomicBool::new(false),
        }
    }

    /// The slot map a cluster node's connection was opened under.
    fn epoch(&self) -> Option<u64> {
        match &self.source {
            Source::ClusterNode { epoch, .. } => Some(*epoch),
            Source::Server(_) | Source::Sentinel(_) | Source::AnyNode(_) => None,
        }
    }

    /// The connection to read on, if it is open and tracked.
    fn live(self: &Arc<Self>) -> Option<Arc<MultiplexedConnection>> {
        self.start();
        self.live.load_full()
    }

    /// Starts the task that opens and keeps the connection, once.
    fn start(self: &Arc<Self>) {
        if !self.started.load(Ordering::Relaxed) && !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(keep(Arc::downgrade(self)));
        }
    }

    /// Opens a RESP3 connection whose pushes go to the local tier, checks
    /// that it reaches a primary, and turns tracking on.
    async fn open(&self, lost: Arc<Notify>) -> Result<(MultiplexedConnection, Anchor), CacheError> {
        let sink = Sink {
            tier: self.tier.clone(),
            lost,
            channel: self.channel.clone(),
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_push_sender(sink);
        let (client, anchor) = match &self.source {
            Source::Server(client) => (redis::Client::clone(client), Anchor::Server),
            Source::Sentinel(sentinel) => {
                let (client, primary) = sentinel.tracking_client().await?;
                (client, Anchor::Primary(primary))
            }
            Source::ClusterNode { client, epoch, .. } => {
                (redis::Client::clone(client), Anchor::SlotMap(*epoch))
            }
            Source::AnyNode(cluster) => {
                let channel = self.channel.as_deref().unwrap_or_default();
                let addr = cluster.node_of(channel).ok_or(CacheError::CircuitOpen)?;
                (cluster.node_client(&addr)?, Anchor::Server)
            }
        };
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(CacheError::redis)?;
        if let Anchor::Primary(_) = anchor {
            // A replica is never read: Sentinel may name the new primary
            // before it has taken the role.
            let role: Vec<Value> = redis::cmd("ROLE")
                .query_async(&mut conn)
                .await
                .map_err(CacheError::redis)?;
            if !matches!(role.first(), Some(Value::BulkString(r)) if r == b"master") {
                return Err(CacheError::redis(redis::RedisError::from((
                    redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                    "the node Sentinel named as primary says it is not one",
                ))));
            }
        }
        match &self.channel {
            Some(channel) => conn.subscribe(channel).await,
            None => {
                // Only reads that keep what they read are tracked (see
                // `backend::commands::Track`). `CLIENT CACHING YES` is
                // tried here too, spent on the `PING`: a server or an ACL
                // that refuses it refuses the connection, and the local
                // tier is off (logged), instead of every read failing.
                redis::pipe()
                    .cmd("CLIENT")
                    .arg("TRACKING")
                    .arg("ON")
                    .arg("OPTIN")
                    .ignore()
                    .cmd("CLIENT")
                    .arg("CACHING")
                    .arg("YES")
                    .ignore()
                    .cmd("PING")
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        }
        .map_err(CacheError::redis)?;
        Ok((conn, anchor))
    }

    /// Whether a connection opened for `anchor` may still be used.
    fn holds(&self, anchor: &Anchor) -> bool {
        match (&self.source, anchor) {
            (Source::Sentinel(sentinel), Anchor::Primary(primary)) => sentinel.is_in_use(primary),
            (Source::ClusterNode { cluster, .. }, Anchor::SlotMap(epoch)) => {
                cluster.primaries_epoch() == *epoch
            }
            _ => true,
        }
    }
}

/// Opens the tracking connection, publishes it, watches it, and when it is
/// lost drops every local copy and opens another; until the cache is gone
/// (or, for a cluster node, the slot map it was opened under).
async fn keep(tracking: Weak<Connection>) {
    let mut pause = FIRST_RETRY;
    let mut warned = false;
    loop {
        let lost = Arc::new(Notify::new());
        let opened = {
            let Some(this) = tracking.upgrade() else {
                return;
            };
            let opened = this.open(lost.clone()).await;
            match opened {
                Ok((conn, anchor)) => {
                    this.live.store(Some(Arc::new(conn.clone())));
                    tracing::debug!("local tier: tracking connection open");
                    Some((conn, anchor))
                }
                Err(error) => {
                    if !warned {
                        warned = true;
                        if error.is_unavailable() {
                            tracing::warn!(%error, "no tracking connection yet: local copies and tags' tokens are not kept until there is one (tagged reads read their tokens each time)");
                        } else {
                            tracing::warn!(%error, "the server refused client-side caching (it needs Redis 6 or later, RESP3 and CLIENT TRACKING): local copies and tags' tokens are not kept (tagged reads read their tokens each time)");
                        }
                    }
                    None
                }
            }
        };
        let Some((conn, anchor)) = opened else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_RETRY);
            continue;
        };
        pause = FIRST_RETRY;
        warned = false;
        let dead = watch(&tracking, conn, &anchor, &lost).await;
        let Some(this) = tracking.upgrade() else {
            return;
        };
        // No longer handed out before the copies go: a fill read on it
        // after the flush would be kept.
        this.live.store(None);
        // A lost connection was flushed by its push already, as it was read.
        if dead {
            this.tier.flush();
        }
        if let Source::ClusterNode { .. } = this.source
            && !this.holds(&anchor)
        {
            // Replaced by a connection for the new slot map on next use.
            return;
        }
        tracing::debug!("local tier: tracking connection lost; every local copy dropped");
    }
}

/// Waits until the connection is lost (`false`: its loss was pushed),
/// stops answering its heartbeat, or its anchor gives way (a Sentinel
/// failover): `true`. Ends when the cache is gone.
async fn watch(
    tracking: &Weak<Connection>,
    mut conn: MultiplexedConnection,
    anchor: &Anchor,
    lost: &Notify,
) -> bool {
    let mut since_ping = Duration::ZERO;
    loop {
        tokio::select! {
            () = lost.notified() => return false,
            () = tokio::time::sleep(ANCHOR_CHECK) => {}
        }
        match tracking.upgrade() {
            Some(this) if this.holds(anchor) => {}
            _ => return true,
        }
        since_ping += ANCHOR_CHECK;
        if since_ping < HEARTBEAT {
            continue;
        }
        since_ping = Duration::ZERO;
        #[cfg(feature = "metrics")]
        if let Some(this) = tracking.upgrade() {
            crate::stats::export_local(&this.tier.stats());
        }
        let ping = redis::cmd("PING");
        match tokio::time::timeout(HEARTBEAT, ping.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            _ => return true,
        }
    }
}

/// Where the connection's push messages go, as they are read: in order
/// with the replies, so an invalidation is handled before any reply read
/// after it is handed out.
struct Sink {
    tier: Arc<LocalTier>,
    lost: Arc<Notify>,
    /// A broadcast's channel: its messages name keys that changed.
    channel: Option<String>,
}

impl redis::aio::AsyncPushSender for Sink {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match info.kind {
            PushKind::Invalidate => match info.data.first() {
                Some(Value::Array(keys)) => {
                    for key in keys {
                        if let Value::BulkString(key) = key {
                            self.tier.invalidate(key);
                        }
                    }
                }
                // After FLUSHDB / FLUSHALL the server names no key.
                Some(Value::Nil) => self.tier.flush(),
                _ => {}
            },
            PushKind::Message => {
                if let [Value::BulkString(channel), Value::BulkString(keys)] = &info.data[..]
                    && self.channel.as_deref().map(str::as_bytes) == Some(&channel[..])
                {
                    for key in keys.split(|&b| b == BROADCAST_SEPARATOR) {
                        self.tier.invalidate(key);
                    }
                }
            }
            PushKind::Disconnection => {
                self.tier.flush();
                self.lost.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}
