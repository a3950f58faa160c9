//! One `redis-server` process of a multi-node deployment (a cluster node, a
//! Sentinel primary, replica or sentinel), under a small shell watchdog
//! that kills it when the test process is gone: a deployment kept in a
//! `static` for the whole test binary is torn down at exit, even after a
//! panic or an abort.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub(crate) struct Node {
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
    /// The watchdog shell; the server is its child. `None` once stopped.
    watchdog: Option<Child>,
    /// The server's own pid, for signals.
    pid: u32,
    /// `redis-cli` arguments for a TLS node (`--tls --cacert ...`).
    cli_tls: Vec<String>,
    /// Its `redis-server` arguments and the cluster's directory, to start
    /// it again ([`Node::restart`]).
    args: Vec<String>,
    root: PathBuf,
}

/// Two free loopback ports: a node's and its cluster bus's (`port + 10000`).
pub(crate) fn free_node_port() -> u16 {
    for _ in 0..1000 {
        // Below Linux's ephemeral range (32768 and up), bus port included.
        let port = 10_000 + fastrand_port() % 12_000;
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free loopback port pair for a node");
}

/// A number below 25,000 that differs between calls and processes.
pub(crate) fn fastrand_port() -> u16 {
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
    /// Starts `redis-server <config(port, dir)>` on a free port, in a
    /// directory of its own under `root`, and waits for its `PING`. A port
    /// taken between the check and the bind (by an outgoing connection's
    /// ephemeral port, say) costs one more try on another port.
    pub(crate) fn start(
        root: &Path,
        config: impl Fn(u16, &Path) -> Vec<String>,
        cli_tls: Vec<String>,
    ) -> Node {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(root, &config, cli_tls.clone()) {
                Ok(node) => return node,
                Err(why) => last = why,
            }
        }
        panic!("{last}");
    }

    fn try_start(
        root: &Path,
        config: &impl Fn(u16, &Path) -> Vec<String>,
        cli_tls: Vec<String>,
    ) -> Result<Node, String> {
        let port = free_node_port();
        let dir = root.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("create node dir");
        let args = config(port, &dir);
        Self::spawn(root, port, dir, args, cli_tls)
    }

    /// Starts the node again on its port and directory, with its
    /// arguments (a node with persistence comes back with its data, and a
    /// cluster node with its `nodes.conf`), after [`Node::stop`].
    pub(crate) fn restart(&mut self) {
        assert!(!self.is_running(), "stop the node first");
        let node = Self::spawn(
            &self.root.clone(),
            self.port,
            self.dir.clone(),
            self.args.clone(),
            self.cli_tls.clone(),
        )
        .unwrap_or_else(|why| panic!("{why}"));
        *self = node;
    }

    fn spawn(
        root: &Path,
        port: u16,
        dir: PathBuf,
        args: Vec<String>,
        cli_tls: Vec<String>,
    ) -> Result<Node, String> {
        let parent = std::process::id();
        // The server in the background, its pid on stdout, then a watch on
        // the test process: when it is gone, the server goes too.
        let script = format!(
            "{} {} >{}/log 2>&1 & server=$!; echo $server; \
             while kill -0 {parent} 2>/dev/null && kill -0 $server 2>/dev/null; do sleep 0.5; done; \
             kill -CONT $server 2>/dev/null; kill -9 $server 2>/dev/null; \
             if ! kill -0 {parent} 2>/dev/null; then rm -rf {dir}; rmdir {root} 2>/dev/null; fi",
            crate::Server::chosen().binary(),
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
        let mut node = Node {
            port,
            dir,
            watchdog: Some(watchdog),
            pid,
            cli_tls,
            args,
            root: root.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.cli(&["PING"]).as_deref() != Some("PONG") {
            let log = std::fs::read_to_string(node.dir.join("log")).unwrap_or_default();
            if log.contains("Address already in use") || Instant::now() > deadline {
                node.stop();
                let _ = std::fs::remove_dir_all(&node.dir);
                return Err(format!(
                    "redis-server on port {port} did not start: {}",
                    log.lines().last().unwrap_or("no log")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    /// Whether the node was not stopped.
    pub(crate) fn is_running(&self) -> bool {
        self.watchdog.is_some()
    }

    /// `redis-cli -p <port> <args>`: its trimmed output, `None` if it failed.
    pub(crate) fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(crate::Server::chosen().cli())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli_tls)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Sends a signal (`STOP`, `CONT`, ...) to the server.
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", self.pid))
            .status()
            .expect("run sh");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub(crate) fn stop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("kill -CONT {0}; kill -9 {0}", self.pid))
                .status();
            let _ = watchdog.wait();
        }
    }
}
