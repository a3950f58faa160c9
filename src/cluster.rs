//! A local Redis Cluster of real `redis-server` processes: 3 primaries and
//! 3 replicas on free loopback ports, joined with
//! `redis-cli --cluster create ... --cluster-replicas 1`.
//!
//! Each node runs under the watchdog of [`crate::node`], so a cluster kept
//! in a `static` for the whole test binary ([`RedisCluster::shared`]) is
//! torn down at exit, even after a panic or an abort.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::install_hint;
use crate::node::{Node, fastrand_port};
use crate::tls::TlsFiles;

/// How long a primary may be unreachable before the cluster fails it over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// A running local cluster. Dropping it stops every node.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    tls: bool,
}

/// A cluster node's `redis-server` arguments.
fn node_config(
    port: u16,
    dir: &std::path::Path,
    tls: Option<&TlsFiles>,
    extra: &[String],
) -> Vec<String> {
    let mut args = vec![
        "--bind 127.0.0.1".to_owned(),
        "--save ''".to_owned(),
        "--appendonly no".to_owned(),
        "--protected-mode no".to_owned(),
        "--cluster-enabled yes".to_owned(),
        "--cluster-config-file nodes.conf".to_owned(),
        format!("--cluster-node-timeout {NODE_TIMEOUT_MS}"),
        // Promote a replica however long it was cut off: tests kill
        // primaries in quick succession.
        "--cluster-replica-validity-factor 0".to_owned(),
        // Replicas sync at once (Redis waits 5 s by default for more
        // replicas to share one transfer): a write that waits for a replica
        // must not find it still syncing when the test starts.
        "--repl-diskless-sync-delay 0".to_owned(),
        format!("--dir {}", dir.display()),
    ];
    match tls {
        // TLS only, the cluster bus included.
        Some(tls) => {
            args.push(format!(
                "--port 0 --tls-port {port} --tls-cluster yes --tls-replication yes"
            ));
            args.extend(tls.server_args());
        }
        None => args.push(format!("--port {port}")),
    }
    args.extend(extra.iter().cloned());
    args
}

impl RedisCluster {
    /// Starts 3 primaries and 3 replicas and waits until every node sees
    /// all slots served. Panics with an install hint when `redis-server` or
    /// `redis-cli` is missing.
    pub fn start() -> RedisCluster {
        Self::start_with(&[])
    }

    /// Like [`RedisCluster::start`], with extra `redis-server` arguments for
    /// every node.
    pub fn start_with(extra_args: &[&str]) -> RedisCluster {
        Self::launch(extra_args, None)
    }

    /// Like [`RedisCluster::start`], with TLS only (clients, replication
    /// and the cluster bus), with certificates from `tls`: clients must
    /// present one signed by its CA.
    pub fn start_tls(tls: &TlsFiles) -> RedisCluster {
        Self::launch(&[], Some(tls))
    }

    fn launch(extra_args: &[&str], tls: Option<&TlsFiles>) -> RedisCluster {
        assert!(crate::redis_server_available(), "{}", install_hint());
        let dir = std::env::temp_dir().join(format!(
            "cache-harness-cluster-{}-{}",
            std::process::id(),
            fastrand_port()
        ));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let cli_tls = tls.map(TlsFiles::cli_args).unwrap_or_default();
        let nodes: Vec<Node> = (0..6)
            .map(|_| {
                Node::start(
                    &dir,
                    |port, dir| node_config(port, dir, tls, &extra),
                    cli_tls.clone(),
                )
            })
            .collect();
        let cluster = RedisCluster {
            nodes,
            dir,
            tls: tls.is_some(),
        };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new(crate::Server::chosen().cli())
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .args(&cli_tls)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli (Debian package redis-tools, installed with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_stable(Duration::from_secs(30));
        cluster
    }

    /// One cluster for the whole test binary, started on first use and
    /// torn down when the process exits.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(RedisCluster::start)
    }

    /// Seed URLs for `Cache::builder().cluster(...)`: every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| {
                let scheme = if self.tls { "rediss" } else { "redis" };
                format!("{scheme}://127.0.0.1:{}/", n.port)
            })
            .collect()
    }

    /// The ports of every node.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// `redis-cli` against one node, e.g. `cli(port, &["CLUSTER", "INFO"])`.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        self.node(port).cli(args)
    }

    /// The ports of the nodes that are primaries serving slots now, as the
    /// first answering node sees it.
    pub fn primaries(&self) -> Vec<u16> {
        let mut primaries = Vec::new();
        for line in self.cluster_nodes().lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 8
                && fields[2].contains("master")
                && !fields[2].contains("fail")
                && let Some(port) = port_of(fields[1])
            {
                primaries.push(port);
            }
        }
        primaries
    }

    /// The primary that serves `key` now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = self
            .any_cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.parse().ok())
            .expect("CLUSTER KEYSLOT");
        self.primary_of_slot(slot)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}"))
    }

    /// The primary that serves `slot`, as the first answering node sees it.
    pub fn primary_of_slot(&self, slot: u16) -> Option<u16> {
        for line in self.cluster_nodes().lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() <= 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let mut bounds = range.split('-');
                let first = bounds.next().and_then(|s| s.parse::<u16>().ok());
                let last = bounds.next().and_then(|s| s.parse::<u16>().ok()).or(first);
                matches!((first, last), (Some(a), Some(b)) if a <= slot && slot <= b)
            });
            if serves {
                return port_of(fields[1]);
            }
        }
        None
    }

    /// The replica of `primary`.
    pub fn replica_of(&self, primary: u16) -> Option<u16> {
        let id = self.cli(primary, &["CLUSTER", "MYID"])?;
        self.cluster_nodes().lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 3 && fields[3] == id && fields[2].contains("slave"))
                .then(|| port_of(fields[1]))
                .flatten()
        })
    }

    /// `CLUSTER NODES` from the first node that answers (a killed one does not).
    fn cluster_nodes(&self) -> String {
        self.any_cli(&["CLUSTER", "NODES"]).unwrap_or_default()
    }

    fn any_cli(&self, args: &[&str]) -> Option<String> {
        self.nodes.iter().find_map(|n| {
            if !n.is_running() {
                return None;
            }
            n.cli(args)
        })
    }

    /// Kills a node (SIGKILL), as a crash would.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node");
        node.stop();
    }

    /// Starts a killed node again on its port, with its data directory:
    /// with persistence (`--appendonly yes` in [`RedisCluster::start_with`])
    /// it comes back with what it had, and rejoins with its `nodes.conf`.
    pub fn restart(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node");
        node.restart();
    }

    /// Stops a node (SIGSTOP): it keeps its sockets and answers nothing.
    pub fn freeze(&self, port: u16) {
        self.node(port).signal("STOP");
    }

    /// Resumes a frozen node (SIGCONT).
    pub fn thaw(&self, port: u16) {
        self.node(port).signal("CONT");
    }

    /// Waits until every live node reports `cluster_state:ok` and all 16384
    /// slots assigned to primaries that are up, for at most `limit`; how
    /// long that took.
    pub fn wait_until_stable(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let live: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
            let ok = live.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                }) && n.cli(&["INFO", "replication"]).is_some_and(|info| {
                    // A replica is in sync; a primary has no replica still syncing.
                    !info.contains("master_link_status:down")
                        && !info.contains("state=wait_bgsave")
                        && !info.contains("state=send_bulk")
                })
            });
            if ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "the cluster did not become stable within {limit:?}: {}",
                self.cluster_nodes()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `127.0.0.1:7000@17000` → 7000.
fn port_of(address: &str) -> Option<u16> {
    let host_port = address.split('@').next()?;
    host_port.rsplit(':').next()?.parse().ok()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
