//! A local Sentinel deployment of real `redis-server` processes: one
//! primary, one replica and three sentinels (`redis-server sentinel.conf
//! --sentinel`) on free loopback ports, watching the service
//! [`RedisSentinel::SERVICE`] with a quorum of 2.
//!
//! Each process runs under the watchdog of [`crate::node`], so a deployment
//! kept in a `static` ([`RedisSentinel::shared`]) is torn down at exit.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::install_hint;
use crate::node::{Node, fastrand_port};
use crate::tls::TlsFiles;

/// How long the sentinels wait before they call an unanswering primary
/// down (`down-after-milliseconds`).
pub const SENTINEL_DOWN_AFTER_MS: u64 = 1000;

/// TLS everywhere (clients, replication, sentinels) and passwords on the
/// nodes and on the sentinels, for [`RedisSentinel::start_secured`].
#[derive(Clone, Copy)]
pub struct Secured<'a> {
    /// Certificates; clients must present one signed by its CA.
    pub tls: &'a TlsFiles,
    /// `requirepass` (and `masterauth`) of the primary and the replica.
    pub node_password: &'a str,
    /// `requirepass` of the sentinels.
    pub sentinel_password: &'a str,
}

/// A running primary, replica and three sentinels. Dropping it stops them.
pub struct RedisSentinel {
    data: Vec<Node>,
    sentinels: Vec<Node>,
    dir: PathBuf,
    /// `redis` or `rediss` (TLS).
    scheme: &'static str,
}

fn data_config(
    port: u16,
    dir: &Path,
    replica_of: Option<u16>,
    secured: Option<Secured>,
) -> Vec<String> {
    let listen = match secured {
        Some(_) => format!("--port 0 --tls-port {port}"),
        None => format!("--port {port}"),
    };
    let mut args = vec![
        listen,
        "--bind 127.0.0.1".to_owned(),
        "--save ''".to_owned(),
        "--appendonly no".to_owned(),
        "--protected-mode no".to_owned(),
        // Sync a replica at once, not after Redis's default 5 s wait.
        "--repl-diskless-sync-delay 0".to_owned(),
        format!("--dir {}", dir.display()),
    ];
    if let Some(primary) = replica_of {
        args.push(format!("--replicaof 127.0.0.1 {primary}"));
    }
    if let Some(secured) = secured {
        args.extend(secured.tls.server_args());
        args.push("--tls-replication yes".to_owned());
        args.push(format!("--requirepass {}", secured.node_password));
        args.push(format!("--masterauth {}", secured.node_password));
    }
    args
}

fn sentinel_config(port: u16, dir: &Path, primary: u16, secured: Option<Secured>) -> Vec<String> {
    // Sentinel rewrites its configuration file: it must be a file of its own.
    let file = dir.join("sentinel.conf");
    let service = RedisSentinel::SERVICE;
    let mut config = match secured {
        // Sentinels talk to the nodes and to each other over TLS too
        // (`tls-replication`), with the nodes' and their own passwords.
        Some(secured) => {
            let path = |name: &str| secured.tls.dir().join(name).display().to_string();
            format!(
                "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                 tls-ca-cert-file {}\ntls-auth-clients yes\ntls-replication yes\n\
                 requirepass {password}\nsentinel sentinel-pass {password}\n",
                path("server.crt"),
                path("server.key"),
                path("ca.crt"),
                password = secured.sentinel_password,
            )
        }
        None => format!("port {port}\n"),
    };
    config.push_str(&format!(
        "bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
         sentinel monitor {service} 127.0.0.1 {primary} 2\n\
         sentinel down-after-milliseconds {service} {SENTINEL_DOWN_AFTER_MS}\n\
         sentinel failover-timeout {service} 5000\n\
         sentinel parallel-syncs {service} 1\n",
        dir = dir.display(),
    ));
    if let Some(secured) = secured {
        config.push_str(&format!(
            "sentinel auth-pass {service} {}\n",
            secured.node_password
        ));
    }
    std::fs::write(&file, config).expect("write sentinel.conf");
    vec![file.display().to_string(), "--sentinel".to_owned()]
}

impl RedisSentinel {
    /// The service name the sentinels monitor.
    pub const SERVICE: &'static str = "mymaster";

    /// Starts the five processes and waits until the replica is in sync
    /// and every sentinel knows the replica and the two other sentinels
    /// (so that a failover can be agreed).
    pub fn start() -> RedisSentinel {
        Self::launch(None)
    }

    /// Like [`RedisSentinel::start`], with TLS only and passwords
    /// everywhere (see [`Secured`]).
    pub fn start_secured(secured: Secured) -> RedisSentinel {
        Self::launch(Some(secured))
    }

    fn launch(secured: Option<Secured>) -> RedisSentinel {
        assert!(crate::redis_server_available(), "{}", install_hint());
        // `redis-cli` arguments for the nodes and for the sentinels.
        let cli = |password: Option<&str>| -> Vec<String> {
            match (secured, password) {
                (Some(secured), Some(password)) => {
                    let mut args = secured.tls.cli_args();
                    args.extend([
                        "--no-auth-warning".to_owned(),
                        "-a".to_owned(),
                        password.to_owned(),
                    ]);
                    args
                }
                _ => Vec::new(),
            }
        };
        let node_cli = cli(secured.map(|s| s.node_password));
        let sentinel_cli = cli(secured.map(|s| s.sentinel_password));
        let dir = std::env::temp_dir().join(format!(
            "cache-harness-sentinel-{}-{}",
            std::process::id(),
            fastrand_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the sentinel dir");
        let primary = Node::start(
            &dir,
            |port, dir| data_config(port, dir, None, secured),
            node_cli.clone(),
        );
        let primary_port = primary.port;
        let replica = Node::start(
            &dir,
            |port, dir| data_config(port, dir, Some(primary_port), secured),
            node_cli,
        );
        let sentinels = (0..3)
            .map(|_| {
                Node::start(
                    &dir,
                    |port, dir| sentinel_config(port, dir, primary_port, secured),
                    sentinel_cli.clone(),
                )
            })
            .collect();
        let deployment = RedisSentinel {
            data: vec![primary, replica],
            sentinels,
            dir,
            scheme: if secured.is_some() { "rediss" } else { "redis" },
        };
        deployment.wait_until_ready(Duration::from_secs(30));
        deployment
    }

    /// One deployment for the whole test binary, started on first use and
    /// torn down when the process exits.
    pub fn shared() -> &'static RedisSentinel {
        static SHARED: OnceLock<RedisSentinel> = OnceLock::new();
        SHARED.get_or_init(RedisSentinel::start)
    }

    /// Sentinel URLs for `Cache::builder().sentinel(SERVICE, ...)`
    /// (`rediss://` for a deployment started with TLS).
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|n| format!("{}://127.0.0.1:{}/", self.scheme, n.port))
            .collect()
    }

    /// The port of the primary, as the first answering sentinel names it.
    pub fn primary_port(&self) -> Option<u16> {
        let reply = self.sentinel_cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::SERVICE])?;
        reply.lines().nth(1)?.trim().parse().ok()
    }

    /// The ports of the primary and the replica.
    pub fn data_ports(&self) -> Vec<u16> {
        self.data.iter().map(|n| n.port).collect()
    }

    /// `redis-cli` against the data node on `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> Option<String> {
        self.data.iter().find(|n| n.port == port)?.cli(args)
    }

    fn sentinel_cli(&self, args: &[&str]) -> Option<String> {
        self.sentinels
            .iter()
            .filter(|n| n.is_running())
            .find_map(|n| n.cli(args))
    }

    /// `SENTINEL FAILOVER`: promotes the replica without waiting for the
    /// primary to fail. Returns once the sentinels name a new primary that
    /// says it is one, and the old one says it is a replica; how long that
    /// took.
    pub fn failover(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        let old = self.primary_port().expect("a primary");
        let reply = self.sentinel_cli(&["SENTINEL", "FAILOVER", Self::SERVICE]);
        assert_eq!(reply.as_deref(), Some("OK"), "SENTINEL FAILOVER");
        loop {
            let new = self.primary_port();
            let switched = new.is_some_and(|new| {
                new != old
                    && self.role(new).as_deref() == Some("master")
                    && self.role(old).as_deref() == Some("slave")
            });
            if switched {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "no failover within {limit:?}: primary {new:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn role(&self, port: u16) -> Option<String> {
        self.cli(port, &["ROLE"])?.lines().next().map(str::to_owned)
    }

    fn wait_until_ready(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            let replica_synced = self.data[1]
                .cli(&["INFO", "replication"])
                .is_some_and(|info| info.contains("master_link_status:up"));
            let sentinels_agree = self.sentinels.iter().all(|s| {
                let knows = |what: &str| {
                    s.cli(&["SENTINEL", what, Self::SERVICE])
                        .map_or(0, |reply| reply.matches("127.0.0.1").count())
                };
                knows("REPLICAS") >= 1 && knows("SENTINELS") >= 2
            });
            if replica_synced && sentinels_agree {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "the Sentinel deployment was not ready within {limit:?}; see {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for node in self.sentinels.iter_mut().chain(&mut self.data) {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
