//! Redis Cluster on the `redis` crate's async cluster connection, which
//! discovers the topology from the seed nodes, follows `MOVED` and `ASK`,
//! and reconnects by itself.
//!
//! What this module adds is a map of slots to primaries of its own, so that
//! the cache keeps one circuit breaker per primary: a dead or stalled shard
//! opens its own breaker, and calls for keys of the other shards go on
//! hitting. The map is read from `CLUSTER SLOTS` at start, by every breaker
//! probe (a failed-over shard's slots then point at the promoted replica,
//! whose breaker is closed), and again every few seconds while calls come.
//! A stale map only misattributes failures to a breaker; where commands go
//! is the cluster connection's business.
//!
//! Every command touches one slot. Multi-key operations (`MGET` of a batch,
//! `DEL` of an invalidation) are split by slot here and sent concurrently;
//! the cache splits them by primary first (see [`ClusterBackend::by_node`]),
//! so that each primary's part runs under that primary's breaker and fails
//! alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use redis::Value;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};

use super::Fetched;
use super::commands::{self, DurablePool, ReplicaCount, Wanted};
use crate::breaker::Breaker;
use crate::error::CacheError;
use crate::slot::{SLOTS, slot_of};

const NO_NODE: u16 = u16::MAX;
/// How old the slot map may get while calls come before it is read again.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
const NEVER: u64 = u64::MAX;

/// Distinct primaries whose breakers one cache keeps (over its lifetime);
/// keys of any more share the breaker of unknown primaries.
const MAX_NODES: usize = 1024;

/// Who serves which slot.
struct Topology {
    /// Index into [`Shared::breakers`] of each slot's primary; [`NO_NODE`]
    /// if unknown.
    slots: Box<[u16]>,
    /// The primaries now, as indices into [`Shared::breakers`].
    nodes: Vec<u16>,
    /// The primaries' node ids, with their indices.
    ids: HashMap<String, u16>,
}

struct Shared {
    conn: ClusterConnection,
    topology: ArcSwap<Topology>,
    /// One breaker per primary address ever seen, never moved or dropped
    /// while the cache lives: a call borrows its breaker instead of
    /// cloning an `Arc` that every core's calls would contend on.
    breakers: Box<[OnceLock<Arc<Breaker>>]>,
    /// Where each address's breaker is in `breakers`.
    breaker_index: std::sync::Mutex<HashMap<String, u16>>,
    /// The breaker of keys whose primary is not known (no map yet).
    unknown: Arc<Breaker>,
    breaker_config: (u32, Duration),
    /// Counts the slot maps that moved a slot to another primary.
    epoch: AtomicU64,
    /// How many replicas each primary has (by index), from `CLUSTER
    /// NODES`, read after each slot map; a primary missing here has an
    /// unknown number.
    replicas: ArcSwap<HashMap<u16, u32>>,
    /// What each primary (by index) last said of its replicas, for writes
    /// that wait for them (empty otherwise).
    roles: Box<[ReplicaCount]>,
    refreshing: AtomicBool,
    /// When the map was last read, in ms since [`epoch_millis`]'s epoch.
    refreshed_at: AtomicU64,
    op_timeout: Duration,
    /// Unless writes are acknowledged by the primary only: a cluster connection of their own for the
    /// writes that `WAIT` for replicas, since `WAIT` blocks the node
    /// connection it is sent on (and every hit queued behind it).
    durable: Option<DurablePool<ClusterConnection>>,
    /// The first seed (credentials, TLS mode), for connections of the
    /// local tier to one node; and the builder's certificates.
    node_template: redis::ConnectionInfo,
    tls: Option<super::Tls>,
    /// The seed nodes' addresses (`host:port`), where the slot map is read
    /// before there is one.
    seeds: Vec<String>,
    /// A connection of our own to each node we send control commands to
    /// (`CLUSTER SLOTS`, `CLUSTER NODES`, the breakers' `PING`, `SCAN`),
    /// made on first use and dropped when a command on it fails. Never
    /// the cluster connection: see [`ClusterBackend::control`].
    control: std::sync::Mutex<HashMap<String, redis::aio::MultiplexedConnection>>,
    /// Where the next slot map read starts among the candidates.
    next_reader: AtomicU64,
}

/// A Redis Cluster, through seed nodes.
#[derive(Clone)]
pub(crate) struct ClusterBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ClusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackend").finish_non_exhaustive()
    }
}

fn epoch_millis() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A cluster client for `seeds`: TCP and TLS settings, timeouts bounded by
/// the op timeout, and `retries` (`MOVED`/`ASK` followed at once, a refusal
/// after a short wait).
fn cluster_client(
    seeds: &[redis::ConnectionInfo],
    tcp: &redis::io::tcp::TcpSettings,
    tls: Option<&super::Tls>,
    op_timeout: Duration,
    retries: u32,
) -> Result<redis::cluster::ClusterClient, CacheError> {
    let retry_wait = u64::try_from(op_timeout.as_millis() / 4)
        .unwrap_or(u64::MAX)
        .clamp(20, 200);
    super::cluster_certificates(ClusterClientBuilder::new(seeds.to_vec()), tls)
        .tcp_settings(tcp.clone())
        .connection_timeout(Duration::from_secs(1))
        // A node that stopped answering (SIGSTOP, a hung host) must not
        // hold the connection's slot refresh for long; the cache's op
        // timeout bounds each call anyway.
        .response_timeout(op_timeout.max(Duration::from_millis(250)))
        .overall_response_timeout(None)
        // Retries follow MOVED/ASK at once. Those of a refusal
        // (`CLUSTERDOWN`, `TRYAGAIN`) wait first, at most a quarter of the
        // op timeout: a longer wait turned the refusal into the op timeout,
        // which counts toward the breaker, and a healthy primary's breaker
        // opened because another primary was being replaced.
        .retries(retries)
        .min_retry_wait(10)
        .max_retry_wait(retry_wait)
        .build()
        .map_err(CacheError::invalid_url)
}

/// A connection of `client` that connects on first use.
fn pending_connection(
    client: &redis::cluster::ClusterClient,
    op_timeout: Duration,
) -> ClusterConnection {
    client.get_pending_async_connection_with_config(
        redis::cluster::ClusterConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(op_timeout.max(Duration::from_millis(250))),
    )
}

impl ClusterBackend {
    /// Parses the seed URLs and prepares the connection without waiting for
    /// it: a cluster that is down does not stop the service from starting.
    /// Must be called inside a Tokio runtime.
    pub(crate) fn new(
        seeds: &[String],
        options: &super::ConnectOptions<'_>,
    ) -> Result<Self, CacheError> {
        let super::ConnectOptions {
            nodelay,
            durability,
            tls,
            op_timeout,
            breaker: breaker_config,
        } = *options;
        let mut infos = Vec::with_capacity(seeds.len());
        for seed in seeds {
            infos.push(super::connection_info(seed)?);
        }
        let Some(first) = infos.first() else {
            return Err(CacheError::NoBackend);
        };
        let tcp = first.tcp_settings().clone().set_nodelay(nodelay);
        let client = |retries| cluster_client(&infos, &tcp, tls, op_timeout, retries);
        let connect =
            |client: &redis::cluster::ClusterClient| pending_connection(client, op_timeout);
        let conn = connect(&client(1)?);
        let durable = match durability {
            // Their writes are retried by the janitor, which goes through
            // its connections in turn: each must follow a failover's MOVED
            // (after trying the dead primary) by itself, or every retry
            // meets another connection that has not yet.
            Some(durability) => {
                let client = client(3)?;
                let conns = (0..commands::DURABLE_CONNECTIONS).map(|_| connect(&client));
                Some(DurablePool::new(durability, conns.collect()))
            }
            None => None,
        };
        let breaker = |node: Option<String>| Arc::new(Breaker::for_node(breaker_config, node));
        Ok(ClusterBackend {
            shared: Arc::new(Shared {
                conn,
                topology: ArcSwap::from_pointee(Topology {
                    slots: vec![NO_NODE; SLOTS].into_boxed_slice(),
                    nodes: Vec::new(),
                    ids: HashMap::new(),
                }),
                breakers: (0..MAX_NODES).map(|_| OnceLock::new()).collect(),
                roles: if durable.is_some() {
                    (0..MAX_NODES).map(|_| ReplicaCount::default()).collect()
                } else {
                    Box::default()
                },
                breaker_index: std::sync::Mutex::new(HashMap::new()),
                unknown: breaker(None),
                breaker_config,
                epoch: AtomicU64::new(0),
                replicas: ArcSwap::from_pointee(HashMap::new()),
                refreshing: AtomicBool::new(false),
                // Never: the first call reads the map if `build` could not.
                refreshed_at: AtomicU64::new(NEVER),
                op_timeout,
                durable,
                node_template: first.clone().set_tcp_settings(tcp),
                tls: tls.cloned(),
                seeds: infos
                    .iter()
                    .filter_map(|info| address_of(info.addr()))
                    .collect(),
                control: std::sync::Mutex::new(HashMap::new()),
                next_reader: AtomicU64::new(0),
            }),
        })
    }

    /// The addresses (`host:port`) of the primaries now, for a `SCAN` of
    /// each.
    pub(crate) fn primaries(&self) -> Vec<String> {
        let topology = self.shared.topology.load();
        topology
            .nodes
            .iter()
            .filter_map(|&at| self.breaker_at(at).node().map(str::to_owned))
            .collect()
    }

    /// One `SCAN` step on the primary at `addr`.
    pub(crate) async fn scan_node(
        &self,
        addr: &str,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), CacheError> {
        let reply = self
            .control(addr, &commands::scan_cmd(cursor, pattern, count))
            .await?;
        redis::FromRedisValue::from_redis_value(reply)
            .map_err(|e| CacheError::redis(redis::RedisError::from(e)))
    }

    /// `INFO` of the node at `addr`.
    pub(crate) async fn info_node(&self, addr: &str) -> Result<String, CacheError> {
        let reply = self.control(addr, &redis::cmd("INFO")).await?;
        redis::FromRedisValue::from_redis_value(reply)
            .map_err(|e| CacheError::redis(redis::RedisError::from(e)))
    }

    /// `UNLINK` of keys in any slots: one per slot, sent together.
    pub(crate) async fn unlink(&self, keys: &[String]) -> Result<u64, CacheError> {
        remove_by_slot(
            &self.shared.conn,
            commands::Removal::Unlink,
            keys,
            &by_slot(keys),
        )
        .await
    }

    /// The address (`host:port`) of the primary that serves `key`, if the
    /// slot map is known.
    pub(crate) fn node_of(&self, key: &str) -> Option<String> {
        self.breaker_of(key).node().map(str::to_owned)
    }

    /// A RESP3 client of the node at `addr` (`host:port`), with the seed nodes'
    /// credentials and TLS, for the local tier's tracking connection to it.
    pub(crate) fn node_client(&self, addr: &str) -> Result<redis::Client, CacheError> {
        let info = super::resp3(self.node_info(addr)?);
        super::client(info, self.shared.tls.as_ref())
    }

    /// How to reach the node at `addr` (`host:port`) on a connection of its
    /// own, with the seed nodes' credentials and TLS.
    fn node_info(&self, addr: &str) -> Result<redis::ConnectionInfo, CacheError> {
        let shared = &*self.shared;
        let malformed = || {
            CacheError::invalid_url(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a node address in the slot map is not host:port",
            )))
        };
        let (host, port) = addr.rsplit_once(':').ok_or_else(malformed)?;
        let port: u16 = port.parse().map_err(|_| malformed())?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let address = match shared.node_template.addr() {
            redis::ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        Ok(shared.node_template.clone().set_addr(address))
    }

    /// See [`super::Backend::primaries_epoch`].
    pub(crate) fn primaries_epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn conn(&self) -> ClusterConnection {
        self.shared.conn.clone()
    }

    /// The breaker of the primary that serves `key`. Reads the slot map
    /// again in the background when it is old.
    pub(crate) fn breaker_of(&self, key: &str) -> &Arc<Breaker> {
        let shared = &*self.shared;
        self.refresh_if_old();
        let node = shared.topology.load().slots[usize::from(slot_of(key.as_bytes()))];
        self.breaker_at(node)
    }

    /// Reads the slot map again in the background when it is old.
    fn refresh_if_old(&self) {
        let refreshed_at = self.shared.refreshed_at.load(Ordering::Relaxed);
        if refreshed_at == NEVER
            || epoch_millis().saturating_sub(refreshed_at) > REFRESH_EVERY.as_millis() as u64
        {
            self.refresh_in_background();
        }
    }

    /// The breaker at `index` in the pool, or that of unknown primaries.
    fn breaker_at(&self, index: u16) -> &Arc<Breaker> {
        let shared = &*self.shared;
        shared
            .breakers
            .get(usize::from(index))
            .and_then(OnceLock::get)
            .unwrap_or(&shared.unknown)
    }

    /// The pool index of the breaker of the primary at `addr`, made on
    /// first sight; [`NO_NODE`] once the pool is full.
    fn breaker_index(&self, addr: String) -> u16 {
        let shared = &*self.shared;
        let mut index = shared
            .breaker_index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = index.len();
        let Ok(at) = u16::try_from(next) else {
            return NO_NODE;
        };
        if next >= MAX_NODES && !index.contains_key(&addr) {
            return NO_NODE;
        }
        let at = *index.entry(addr.clone()).or_insert(at);
        shared.breakers[usize::from(at)]
            .get_or_init(|| Arc::new(Breaker::for_node(shared.breaker_config, Some(addr))));
        at
    }

    /// Indices of `keys` grouped by the primary that serves them, each
    /// group with that primary's breaker.
    pub(crate) fn by_node(&self, keys: &[String]) -> Vec<(&Arc<Breaker>, Vec<usize>)> {
        self.refresh_if_old();
        let topology = self.shared.topology.load();
        let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
        for (at, key) in keys.iter().enumerate() {
            let node = topology.slots[usize::from(slot_of(key.as_bytes()))];
            groups.entry(node).or_default().push(at);
        }
        groups
            .into_iter()
            .map(|(node, indices)| (self.breaker_at(node), indices))
            .collect()
    }

    fn refresh_in_background(&self) {
        let shared = &*self.shared;
        if shared
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            shared.refreshing.store(false, Ordering::Release);
            return;
        };
        let backend = self.clone();
        runtime.spawn(async move {
            // The flag goes back however the task ends.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _done = Done(&backend.shared.refreshing);
            let timeout = backend.shared.op_timeout.max(Duration::from_millis(500));
            if let Ok(Err(error)) = tokio::time::timeout(timeout, backend.refresh()).await {
                tracing::debug!(%error, "reading the cluster's slot map failed");
            }
        });
    }

    /// Reads `CLUSTER SLOTS` and replaces the map, keeping the breakers of
    /// primaries that are still primaries.
    pub(crate) async fn refresh(&self) -> Result<(), CacheError> {
        let shared = &*self.shared;
        let mut last_error = None;
        // One node may be the dead one: a few tries, each on another.
        for addr in self.map_readers(2) {
            let reply = self
                .control(&addr, redis::cmd("CLUSTER").arg("SLOTS"))
                .await;
            match reply {
                Ok(value) => {
                    let ranges = parse_cluster_slots(&value)?;
                    let mut nodes: Vec<u16> = Vec::new();
                    let mut ids = HashMap::new();
                    let mut slots = vec![NO_NODE; SLOTS].into_boxed_slice();
                    for range in ranges {
                        let at = self.breaker_index(range.primary);
                        if !nodes.contains(&at) {
                            nodes.push(at);
                        }
                        if let Some(id) = range.id {
                            ids.insert(id, at);
                        }
                        for slot in &mut slots[usize::from(range.start)..=usize::from(range.end)] {
                            *slot = at;
                        }
                    }
                    let previous = shared
                        .topology
                        .swap(Arc::new(Topology { slots, nodes, ids }));
                    let topology = shared.topology.load();
                    if previous.slots != topology.slots {
                        shared.epoch.fetch_add(1, Ordering::SeqCst);
                        let unmapped = topology.slots.iter().filter(|&&n| n == NO_NODE).count();
                        tracing::debug!(
                            primaries = topology.nodes.len(),
                            unmapped,
                            "the cluster's slot map changed"
                        );
                    }
                    shared.refreshed_at.store(epoch_millis(), Ordering::Relaxed);
                    if shared.durable.is_some() {
                        self.count_replicas_in_background();
                    }
                    return Ok(());
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            CacheError::redis(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no cluster node answered",
            )))
        }))
    }

    /// Nodes to read the slot map from, in order: up to `n` primaries of
    /// the map in use, those with a closed breaker first and a different
    /// first one each time, then the seed nodes that are not among them (all
    /// there is before the first map, and a way back should every known
    /// primary be gone).
    fn map_readers(&self, n: usize) -> Vec<String> {
        let shared = &*self.shared;
        let topology = shared.topology.load();
        let mut primaries: Vec<(bool, String)> = topology
            .nodes
            .iter()
            .filter_map(|&at| {
                let breaker = self.breaker_at(at);
                Some((breaker.is_open(), breaker.node()?.to_owned()))
            })
            .collect();
        let turn = shared.next_reader.fetch_add(1, Ordering::Relaxed);
        if !primaries.is_empty() {
            let len = primaries.len() as u64;
            primaries.rotate_left(usize::try_from(turn % len).unwrap_or(0));
        }
        // A stable sort: the rotation holds among the healthy and the rest.
        primaries.sort_by_key(|(open, _)| *open);
        let mut readers: Vec<String> = primaries
            .into_iter()
            .map(|(_, addr)| addr)
            .take(n)
            .collect();
        for seed in &shared.seeds {
            if !readers.contains(seed) {
                readers.push(seed.clone());
            }
        }
        readers
    }

    /// Sends a control command to the node at `addr` on a connection of
    /// our own (made on first use, dropped when a command on it fails).
    ///
    /// Not through the cluster connection, routed by address or to a
    /// random node: when that connection has no link to the chosen node
    /// (it died, or its link is being repaired), the command fails with
    /// `ClusterConnectionNotFound`, on which the `redis` crate reconnects
    /// to the seed nodes and replaces every connection, the healthy
    /// primaries' too. Their commands in flight then fail, and while a
    /// stalled seed holds that reconnection, every shard waits. A breaker's
    /// probe of a dead primary did that once a second, and opened the
    /// breakers of the healthy ones.
    async fn control(&self, addr: &str, cmd: &redis::Cmd) -> Result<Value, CacheError> {
        let shared = &*self.shared;
        let held = shared
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(addr)
            .cloned();
        let mut conn = match held {
            Some(conn) => conn,
            None => {
                let client = super::client(self.node_info(addr)?, shared.tls.as_ref())?;
                let timeout = Some(shared.op_timeout.max(Duration::from_millis(250)));
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(CacheError::redis)?;
                shared
                    .control
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(addr.to_owned(), conn.clone());
                conn
            }
        };
        // Dropped mid-command (a caller's timeout), the connection is
        // forgotten too: its reply may still be on the way.
        let forget = ForgetOnDrop {
            control: &shared.control,
            addr,
            armed: true,
        };
        let reply = cmd.query_async::<Value>(&mut conn).await;
        // An error reply leaves the connection fine; a broken one goes.
        let broken = reply
            .as_ref()
            .is_err_and(|e| e.is_unrecoverable_error() || e.is_io_error() || e.is_timeout());
        if !broken {
            forget.disarm();
        }
        reply.map_err(CacheError::redis)
    }

    /// Reads how many replicas each primary has, in a task of its own (the
    /// breaker probe that read the slot map does not wait for it). Until it
    /// lands, a primary that the last count does not know is waited on for
    /// every replica asked for.
    fn count_replicas_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = self.clone();
        runtime.spawn(async move {
            let limit = backend.shared.op_timeout.max(Duration::from_millis(500));
            let Ok(Some(counts)) = tokio::time::timeout(limit, backend.replica_counts()).await
            else {
                return;
            };
            let topology = backend.shared.topology.load();
            let replicas = topology
                .ids
                .iter()
                .map(|(id, &at)| (at, counts.get(id).copied().unwrap_or(0)))
                .collect();
            backend.shared.replicas.store(Arc::new(replicas));
        });
    }

    /// How many replicas each primary has (by node id), as `CLUSTER NODES`
    /// of a random node lists them; `None` if no node answered.
    ///
    /// Not `CLUSTER SLOTS`, which leaves out a replica whose replication
    /// offset its peers have not heard of yet (0 in a new cluster), nor
    /// only the replicas in good health: a replica that was marked failed
    /// can come back and be promoted, so it counts until it is forgotten.
    async fn replica_counts(&self) -> Option<HashMap<String, u32>> {
        let mut reply = None;
        for addr in self.map_readers(2) {
            if let Ok(value) = self
                .control(&addr, redis::cmd("CLUSTER").arg("NODES"))
                .await
            {
                reply = Some(value);
                break;
            }
        }
        let reply = reply?;
        let text = match reply {
            Value::BulkString(bytes) => String::from_utf8(bytes).ok()?,
            Value::VerbatimString { text, .. } => text,
            Value::SimpleString(text) => text,
            _ => return None,
        };
        Some(parse_replica_counts(&text))
    }

    /// Makes the cluster connection's links to the primaries (TCP, TLS
    /// handshake, `AUTH`), and those of the durable connections: a `PING`
    /// to all primaries through each (the `redis` crate sends it to the
    /// primaries of its slot map). `build` waits for it, so that the first
    /// calls do not pay for connecting within their op timeout (a debug
    /// build's TLS handshakes with six nodes took longer than that).
    pub(crate) async fn warm_up(&self) -> Result<(), CacheError> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
        let every_primary = || {
            RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllMasters,
                Some(ResponsePolicy::AllSucceeded),
            ))
        };
        let mut conns = vec![self.shared.conn.clone()];
        if let Some(pool) = &self.shared.durable {
            conns.extend(pool.all().iter().cloned());
        }
        let pings = conns.into_iter().map(|mut conn| async move {
            conn.route_command(redis::cmd("PING"), every_primary())
                .await
                .map(drop)
                .map_err(CacheError::redis)
        });
        futures_util::future::try_join_all(pings).await.map(drop)
    }

    /// The breaker probe of one primary (`node`), or of the keys whose
    /// primary is unknown (`None`): reads the slot map again, then pings
    /// the primary if it still serves slots.
    pub(crate) async fn check(&self, node: Option<&str>) -> Result<(), CacheError> {
        let refreshed = self.refresh().await;
        let Some(node) = node else {
            return refreshed;
        };
        let topology = self.shared.topology.load();
        if !topology
            .nodes
            .iter()
            .any(|&at| self.breaker_at(at).node() == Some(node))
        {
            // Failed over or resharded away: no key routes there any more.
            return Ok(());
        }
        // On a connection of our own: see `control`.
        self.control(node, &redis::cmd("PING")).await.map(drop)
    }

    /// One pipeline of `GETRANGE`s per slot (a cluster pipeline stays in
    /// one slot), sent together; the values back in the keys' order.
    pub(crate) async fn get_many(
        &self,
        keys: &[String],
        limit: usize,
    ) -> Result<Vec<Fetched<Vec<u8>>>, CacheError> {
        let groups = by_slot(keys);
        if groups.len() == 1 {
            return commands::get_many(&mut self.conn(), keys, limit).await;
        }
        let reads = join_all(groups.into_iter().map(|indices| async move {
            let part: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
            let read = commands::get_many(&mut self.conn(), &part, limit).await;
            (indices, read)
        }))
        .await;
        let mut values = vec![Fetched::Absent; keys.len()];
        for (indices, read) in reads {
            for (at, value) in indices.into_iter().zip(read?) {
                values[at] = value;
            }
        }
        Ok(values)
    }

    /// One `DEL` per slot, concurrently; how many keys existed.
    pub(crate) async fn delete(&self, keys: &[String]) -> Result<u64, CacheError> {
        self.delete_with(&self.shared.conn, keys, None).await
    }

    /// [`ClusterBackend::delete`], each `DEL` followed by a `WAIT` on its
    /// primary if configured.
    pub(crate) async fn delete_durably(&self, keys: &[String]) -> Result<u64, CacheError> {
        match &self.shared.durable {
            Some(pool) => self.delete_with(&pool.pick(), keys, Some(pool)).await,
            None => self.delete(keys).await,
        }
    }

    /// [`commands::set`], then a `WAIT` on the key's primary if
    /// configured.
    pub(crate) async fn set_durably(
        &self,
        key: &str,
        value: &[u8],
        px: u64,
    ) -> Result<(), CacheError> {
        let Some(pool) = &self.shared.durable else {
            return commands::set(&mut self.conn(), key, value, px).await;
        };
        let conn = pool.pick();
        commands::set(&mut conn.clone(), key, value, px).await?;
        self.wait_replicated(&conn, key, pool).await
    }

    /// A write of its own on `key`'s primary (write-behind's), then
    /// `WAIT` for its replicas if configured.
    pub(crate) async fn run_durably(
        &self,
        key: &str,
        cmd: &redis::Cmd,
    ) -> Result<redis::Value, CacheError> {
        let Some(pool) = &self.shared.durable else {
            return commands::query(&mut self.conn(), cmd).await;
        };
        let conn = pool.pick_for(key);
        let value = commands::query(&mut conn.clone(), cmd).await?;
        self.wait_replicated(&conn, key, pool).await?;
        Ok(value)
    }

    /// `WAIT` on the primary of `key` (where the write before it went: one
    /// connection per node, so the same client).
    async fn wait_replicated(
        &self,
        conn: &ClusterConnection,
        key: &str,
        pool: &DurablePool<ClusterConnection>,
    ) -> Result<(), CacheError> {
        // How many replicas to wait for is the cluster's view (`CLUSTER
        // NODES`, see `replica_counts`), not the primary's own: a primary
        // whose replica was just promoted away from it lists no replica
        // itself. The primary's word lowers it only after a short `WAIT`
        // with `Wanted::All` (a replica that died is not waited for). The
        // hole left: the map already names the new primary while the
        // `redis` crate's own map still sends the write to the old one, in
        // the milliseconds before the old one hears of it.
        self.refresh_if_old();
        let shared = &*self.shared;
        let topology = shared.topology.load();
        let node = topology.slots[usize::from(slot_of(key.as_bytes()))];
        // A primary not in the map yet is asked on every write.
        let unmapped = ReplicaCount::default();
        let replicas = match shared.roles.get(usize::from(node)) {
            Some(replicas) => replicas,
            None if shared.roles.is_empty() => return Ok(()), // writes do not wait
            None => &unmapped,
        };
        let asked = commands::Asked {
            durability: pool.durability,
            replicas,
            listed: shared.replicas.load().get(&node).copied(),
            trust_role: pool.durability.wanted == Wanted::All,
        };
        let mut on_primary = OnPrimaryOf {
            conn: conn.clone(),
            key,
        };
        commands::wait_replicated(&mut on_primary, asked).await
    }

    /// One `DEL` per slot, concurrently; then, if configured, one `WAIT`
    /// on each primary they went to, which covers every write before it on
    /// that node's connection.
    async fn delete_with(
        &self,
        conn: &ClusterConnection,
        keys: &[String],
        durable: Option<&DurablePool<ClusterConnection>>,
    ) -> Result<u64, CacheError> {
        let groups = by_slot(keys);
        let existed = remove_by_slot(conn, commands::Removal::Del, keys, &groups).await?;
        if let Some(pool) = durable {
            let topology = self.shared.topology.load();
            let mut primaries: HashMap<u16, &String> = HashMap::new();
            for indices in &groups {
                let key = &keys[indices[0]];
                primaries
                    .entry(topology.slots[usize::from(slot_of(key.as_bytes()))])
                    .or_insert(key);
            }
            let waits = join_all(
                primaries
                    .into_values()
                    .map(|key| self.wait_replicated(conn, key, pool)),
            )
            .await;
            for waited in waits {
                waited?;
            }
        }
        Ok(existed)
    }
}

/// `DEL` or `UNLINK` of `keys`, one command per slot group, sent
/// together; how many existed.
async fn remove_by_slot(
    conn: &ClusterConnection,
    how: commands::Removal,
    keys: &[String],
    groups: &[Vec<usize>],
) -> Result<u64, CacheError> {
    let removals = join_all(groups.iter().map(|indices| async move {
        let group: Vec<String> = indices.iter().map(|&at| keys[at].clone()).collect();
        commands::remove(&mut conn.clone(), how, &group).await
    }))
    .await;
    let mut existed = 0;
    for removed in removals {
        existed += removed?;
    }
    Ok(existed)
}

/// Indices of `keys` grouped by slot.
fn by_slot(keys: &[String]) -> Vec<Vec<usize>> {
    let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
    for (at, key) in keys.iter().enumerate() {
        groups.entry(slot_of(key.as_bytes())).or_default().push(at);
    }
    groups.into_values().collect()
}

/// `(first slot, last slot, "host:port" of the primary)` of each range in
/// a `CLUSTER SLOTS` reply. A malformed reply is an error, never a panic.
/// One range of a `CLUSTER SLOTS` reply.
#[derive(Debug, PartialEq, Eq)]
struct SlotRange {
    start: u16,
    end: u16,
    /// `host:port`.
    primary: String,
    /// The primary's node id, if the reply has it.
    id: Option<String>,
}

/// The replicas of each primary (by node id) in a `CLUSTER NODES` reply:
/// the lines whose fourth field (the primary's id) is not `-`.
fn parse_replica_counts(text: &str) -> HashMap<String, u32> {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if let Some(primary) = fields.nth(3)
            && primary != "-"
        {
            *counts.entry(primary.to_owned()).or_default() += 1;
        }
    }
    counts
}

/// Forgets a control connection unless disarmed: see
/// [`ClusterBackend::control`].
struct ForgetOnDrop<'a> {
    control: &'a std::sync::Mutex<HashMap<String, redis::aio::MultiplexedConnection>>,
    addr: &'a str,
    armed: bool,
}

impl ForgetOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.control
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(self.addr);
        }
    }
}

/// `host:port` of a TCP address (brackets kept off IPv6 hosts, as in
/// `CLUSTER SLOTS`); `None` for a Unix socket.
fn address_of(addr: &redis::ConnectionAddr) -> Option<String> {
    match addr {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(format!("{host}:{port}")),
        _ => None,
    }
}

fn parse_cluster_slots(value: &Value) -> Result<Vec<SlotRange>, CacheError> {
    let malformed = || {
        CacheError::redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "malformed CLUSTER SLOTS reply",
        )))
    };
    let Value::Array(ranges) = value else {
        return Err(malformed());
    };
    let mut parsed = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return Err(malformed());
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return Err(malformed());
        };
        let host = match primary.first() {
            Some(Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(Value::SimpleString(text)) => text.clone(),
            _ => return Err(malformed()),
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return Err(malformed());
        };
        let slot = |n: i64| u16::try_from(n).ok().filter(|&s| usize::from(s) < SLOTS);
        let (Some(start), Some(end)) = (slot(*start), slot(*end)) else {
            return Err(malformed());
        };
        if start > end {
            return Err(malformed());
        }
        let id = match primary.get(2) {
            Some(Value::BulkString(bytes)) => String::from_utf8(bytes.clone()).ok(),
            Some(Value::SimpleString(text)) => Some(text.clone()),
            _ => None,
        };
        parsed.push(SlotRange {
            start,
            end,
            primary: format!("{host}:{port}"),
            id,
        });
    }
    Ok(parsed)
}

/// A cluster connection that sends every command to the primary of one
/// key, so that the commands shared with the single-server backends
/// (`WAIT`, then `ROLE`) run there unchanged.
struct OnPrimaryOf<'a> {
    conn: ClusterConnection,
    key: &'a str,
}

impl OnPrimaryOf<'_> {
    fn node(&self) -> SingleNodeRoutingInfo {
        let route = Route::with_key(self.key.as_bytes(), SlotAddr::Master);
        SingleNodeRoutingInfo::SpecificNode(route)
    }
}

impl redis::aio::ConnectionLike for OnPrimaryOf<'_> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        let routing = RoutingInfo::SingleNode(self.node());
        Box::pin(self.conn.route_command(cmd.clone(), routing))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        let node = self.node();
        Box::pin(
            self.conn
                .route_pipeline(pipeline.clone(), offset, count, node),
        )
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_counted_by_primary_whatever_their_health() {
        let nodes = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7003@17003 slave a1 0 0 1 connected
d4 127.0.0.1:7004@17004 slave,fail a1 0 0 1 disconnected
e5 127.0.0.1:7002@17002 master,fail - 0 0 3 disconnected
";
        let counts = parse_replica_counts(nodes);
        assert_eq!(counts.get("a1"), Some(&2), "a failed replica counts");
        assert_eq!(counts.get("b2"), None, "no replica");
        assert_eq!(counts.len(), 1);
        assert!(parse_replica_counts("").is_empty());
        assert!(parse_replica_counts("garbage\n\n x y").is_empty());
    }

    #[test]
    fn malformed_slot_replies_are_errors() {
        let int = Value::Int;
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let node = |port: i64| {
            Value::Array(vec![
                bulk("127.0.0.1"),
                int(port),
                bulk(&format!("id{port}")),
            ])
        };
        let good = Value::Array(vec![
            Value::Array(vec![int(0), int(5460), node(7000), node(7003)]),
            Value::Array(vec![int(5461), int(10922), node(7001)]),
        ]);
        assert_eq!(
            parse_cluster_slots(&good).unwrap(),
            vec![
                SlotRange {
                    start: 0,
                    end: 5460,
                    primary: "127.0.0.1:7000".to_owned(),
                    id: Some("id7000".to_owned()),
                },
                SlotRange {
                    start: 5461,
                    end: 10922,
                    primary: "127.0.0.1:7001".to_owned(),
                    id: Some("id7001".to_owned()),
                }
            ]
        );
        for bad in [
            Value::Nil,
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![Value::Array(vec![int(0), int(99999), Value::Nil])]),
            Value::Array(vec![Value::Array(vec![
                int(10),
                int(5),
                Value::Array(vec![bulk("h"), int(1)]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                int(-1),
                int(5),
                Value::Array(vec![bulk("h"), int(1)]),
            ])]),
        ] {
            assert!(parse_cluster_slots(&bad).is_err(), "{bad:?}");
        }
    }
}
