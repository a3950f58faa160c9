//! A local Redis Cluster of real `redis-server` processes: 3 primaries and
//! 3 replicas on free loopback ports, joined with
//! `redis-cli --cluster create ... --cluster-replicas 1`.
//!
//! Each node runs under a small shell watchdog that kills it when the test
//! process is gone, so a cluster kept in a `static` for the whole test
//! binary ([`RedisCluster::shared`]) is torn down at exit, even after a
//! panic or an abort.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::INSTALL_HINT;

/// How long a primary may be unreachable before the cluster fails it over.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// One `redis-server --cluster-enabled yes` process.
struct Node {
    port: u16,
    dir: PathBuf,
    /// The watchdog shell; the server is its child.
    watchdog: Option<Child>,
    /// The server's own pid, for signals.
    pid: u32,
}

/// A running local cluster. Dropping it stops every node.
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

/// Two free loopback ports: a node's and its cluster bus's (`port + 10000`).
fn free_node_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + fastrand_port();
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free loopback port pair for a cluster node");
}

fn fastrand_port() -> u16 {
    // The nanoseconds of the clock mixed with a counter: enough spread for
    // ports, without a random-number dependency in the harness library.
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mixed = (nanos ^ (u64::from(std::process::id()) << 16))
        .wrapping_add(COUNTER.fetch_add(7919, Ordering::Relaxed))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    u16::try_from((mixed >> 40) % 25_000).expect("below 25000")
}

impl Node {
    fn start(root: &std::path::Path, extra_args: &[String]) -> Node {
        let port = free_node_port();
        let dir = root.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("create node dir");
        let mut args = vec![
            format!("--port {port}"),
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
            format!("--dir {}", dir.display()),
        ];
        args.extend(extra_args.iter().cloned());
        let parent = std::process::id();
        // The server in the background, its pid on stdout, then a watch on
        // the test process: when it is gone, the server goes too.
        let script = format!(
            "redis-server {} >{}/log 2>&1 & server=$!; echo $server; \
             while kill -0 {parent} 2>/dev/null && kill -0 $server 2>/dev/null; do sleep 0.5; done; \
             kill -CONT $server 2>/dev/null; kill -9 $server 2>/dev/null; \
             if ! kill -0 {parent} 2>/dev/null; then rm -rf {dir}; rmdir {root} 2>/dev/null; fi",
            args.join(" "),
            dir.display(),
            dir = dir.display(),
            root = root.display(),
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start sh for redis-server: {e}"));
        let mut line = String::new();
        BufReader::new(watchdog.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("read the server's pid");
        let pid = line.trim().parse().expect("the watchdog prints the pid");
        let node = Node {
            port,
            dir,
            watchdog: Some(watchdog),
            pid,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "cluster node on port {port} did not start; see {}/log",
                node.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// `redis-cli -p <port> <args>`: its trimmed output, `None` if it failed.
    fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn signal(&self, name: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", self.pid))
            .status()
            .expect("run sh");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    fn stop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("kill -CONT {0}; kill -9 {0}", self.pid))
                .status();
            let _ = watchdog.wait();
        }
    }
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
        assert!(crate::redis_server_available(), "{INSTALL_HINT}");
        let dir = std::env::temp_dir().join(format!(
            "cache-harness-cluster-{}-{}",
            std::process::id(),
            fastrand_port()
        ));
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let extra: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let nodes: Vec<Node> = (0..6).map(|_| Node::start(&dir, &extra)).collect();
        let cluster = RedisCluster { nodes, dir };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
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
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
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
            n.watchdog.as_ref()?;
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
            let live: Vec<&Node> = self.nodes.iter().filter(|n| n.watchdog.is_some()).collect();
            let ok = live.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).is_some_and(|info| {
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
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
