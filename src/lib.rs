//! Harness shared by the integration tests, the benchmarks and the service: a private
//! `redis-server` on a free loopback port, without persistence, that a test
//! can stop, restart, pause and inspect, a [`FaultProxy`] to put between it
//! and the cache, and a [`history`] checker for read-your-writes.
//!
//! ```no_run
//! let server = cache_harness::RedisServer::start();
//! println!("redis at {}", server.url());
//! // stopped and its files removed when `server` is dropped
//! ```

mod cluster;
pub mod history;
mod node;
mod proxy;
mod sentinel;
mod tls;

pub use cluster::{NODE_TIMEOUT_MS, RedisCluster};
pub use proxy::{Fault, FaultProxy};
pub use sentinel::{RedisSentinel, SENTINEL_DOWN_AFTER_MS, Secured};
pub use tls::{TlsFiles, TlsServer};

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server the tests run against, from the environment:
/// `CACHE_TEST_SERVER=valkey` runs `valkey-server` and `valkey-cli`
/// (standalone, Sentinel, Cluster and TLS alike); anything else, or
/// nothing, `redis-server` and `redis-cli`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Redis,
    Valkey,
}

impl Server {
    /// The server chosen by `CACHE_TEST_SERVER`.
    pub fn chosen() -> Server {
        match std::env::var("CACHE_TEST_SERVER").as_deref() {
            Ok("valkey") => Server::Valkey,
            _ => Server::Redis,
        }
    }

    /// Its server binary.
    pub fn binary(self) -> &'static str {
        match self {
            Server::Redis => "redis-server",
            Server::Valkey => "valkey-server",
        }
    }

    /// Its command-line client.
    pub fn cli(self) -> &'static str {
        match self {
            Server::Redis => "redis-cli",
            Server::Valkey => "valkey-cli",
        }
    }

    /// What to install when the binary is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            Server::Redis => {
                "redis-server is not installed: install the Debian package `redis-server` \
                 (`apt-get install redis-server`), or run `bash scripts/test.sh`, which installs it"
            }
            Server::Valkey => {
                "valkey-server is not installed: on Debian 12, add the `bookworm-backports` suite \
                 and `apt-get install -t bookworm-backports valkey-server`, or run \
                 `CACHE_TEST_SERVER=valkey bash scripts/test.sh`, which does"
            }
        }
    }
}

/// The install hint printed when the chosen server's binary is missing.
pub fn install_hint() -> &'static str {
    Server::chosen().install_hint()
}

/// A `redis-server` child process owned by the test or example.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
}

/// Whether the chosen server's binary can be started.
pub fn redis_server_available() -> bool {
    Command::new(Server::chosen().binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl RedisServer {
    /// Starts a server on a free port. Panics with an install hint when the
    /// binary is missing.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, e.g.
    /// `["--maxmemory", "2mb"]`.
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        // Another process may take the port between probe and bind; retry.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self::unstarted(extra_args);
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// Reserves a free port without starting the server: a cache pointed at
    /// it sees Redis down until [`RedisServer::restart`] starts it.
    pub fn not_started() -> RedisServer {
        Self::unstarted(&[])
    }

    fn unstarted(extra_args: &[&str]) -> RedisServer {
        assert!(redis_server_available(), "{}", install_hint());
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("cache-harness-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create redis dir");
        RedisServer {
            port,
            dir,
            child: None,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = Command::new(Server::chosen().binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{e}; {}", install_hint()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "redis-server exited with {status} on port {}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        Err(format!(
            "redis-server did not answer PING on port {}",
            self.port
        ))
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (`SIGSTOP`) without closing its sockets: clients
    /// connect and send, and get no answer, as with a hung host. Undone by
    /// [`RedisServer::thaw`] (or by dropping the server).
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Resumes a frozen server (`SIGCONT`).
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("the server is running");
        // The shell's built-in `kill`: a minimal Debian has no /bin/kill
        // (package procps).
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -{name} {}", child.id()))
            .status()
            .expect("run sh");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Starts the server (again) on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("restart redis-server");
    }

    /// Sends one inline command and returns the first reply line, e.g.
    /// `command("DBSIZE")` → `":3"`. For test set-up, not for the code under test.
    pub fn command(&self, line: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(line.as_bytes())?;
        stream.write_all(b"\r\n")?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply.trim_end().to_owned())
    }

    /// Whether the server answers, with or without a password set.
    fn ping(&self) -> bool {
        self.command("PING")
            .is_ok_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Defines, for each listed `async fn(Cache)`, one test on a private
/// `redis-server`, one on the test binary's shared local Redis Cluster
/// ([`RedisCluster::shared`], with a key prefix of the test's own), and one
/// on `Cache::memory()`, in modules `redis_backend`, `cluster_backend` and
/// `memory_backend`. Use it at the top level of a test crate.
#[macro_export]
macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod redis_backend {
            $(
                #[tokio::test]
                async fn $test() {
                    let server = $crate::RedisServer::start();
                    let cache = ::cache_runtime::Cache::connect(&server.url()).await.unwrap();
                    super::$test(cache).await;
                }
            )*
        }
        mod cluster_backend {
            $(
                #[tokio::test]
                async fn $test() {
                    let cache = $crate::cluster_cache(stringify!($test)).await;
                    super::$test(cache).await;
                }
            )*
        }
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(::cache_runtime::Cache::memory()).await;
                }
            )*
        }
    };
}

/// Asserts that an invalidation landed: `Ok`, or applied by the primary
/// and not yet acknowledged by a replica (`NotReplicated`, which a loaded
/// test machine sees on a cluster; the cache retries it in the background
/// and the primary serves the change meanwhile).
#[track_caller]
pub fn landed<T>(result: Result<T, cache_runtime::CacheError>) {
    if let Err(error) = result
        && !error.is_not_replicated()
    {
        panic!("the invalidation failed: {error}");
    }
}

/// A cache on the shared cluster whose keys start with `name` and a number
/// of this process, so that tests in parallel (and earlier runs) never see
/// each other's keys.
///
/// Its op timeout (1 s) and replica wait (500 ms) are longer than the
/// defaults (100 ms, 50 ms): the suites that use it check what a call or a
/// write does, on two cores shared by a dozen tests in parallel, where a
/// replica's acknowledgement sometimes takes longer than 50 ms. A write
/// that is not acknowledged in time is retried in the background and its
/// key read uncached until then (correct, but not what these suites
/// count); `cluster_faults.rs` tests that on the defaults.
pub async fn cluster_cache(name: &str) -> cache_runtime::Cache {
    let cluster = RedisCluster::shared();
    cache_runtime::Cache::builder()
        .cluster(cluster.seeds())
        .op_timeout(Duration::from_secs(1))
        .replica_wait(Duration::from_millis(500))
        .prefix(format!("{name}-{}", std::process::id()))
        .build()
        .await
        .expect("the cluster's seed URLs parse")
}

/// Calls `done` every `every` until it returns true, for at most `limit`;
/// how long that took, or `None` if it never did.
pub async fn wait_for(
    limit: Duration,
    every: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if done().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(every).await;
    }
    None
}

/// Where a test's cache lives: a standalone server's URL, or a cluster's
/// seed URLs. It has a text form, so that worker processes can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `redis://...` of one server.
    Standalone(String),
    /// Seed URLs of a Redis Cluster.
    Cluster(Vec<String>),
}

impl Target {
    /// The target of a standalone server.
    pub fn server(server: &RedisServer) -> Target {
        Target::Standalone(server.url())
    }

    /// The target of a cluster.
    pub fn cluster(cluster: &RedisCluster) -> Target {
        Target::Cluster(cluster.seeds())
    }

    /// A cache builder pointed at the target, to configure further.
    pub fn builder(&self) -> cache_runtime::CacheBuilder {
        match self {
            Target::Standalone(url) => cache_runtime::Cache::builder().url(url),
            Target::Cluster(seeds) => cache_runtime::Cache::builder().cluster(seeds.clone()),
        }
    }

    /// A cache on the target, with the defaults and `prefix` if given.
    pub async fn cache(&self, prefix: Option<&str>) -> cache_runtime::Cache {
        let builder = self.builder();
        let builder = match prefix {
            Some(prefix) => builder.prefix(prefix),
            None => builder,
        };
        builder.build().await.expect("the harness's URLs parse")
    }

    /// A plain connection to the target, bypassing the code under test.
    pub async fn raw(&self) -> RawConnection {
        match self {
            Target::Standalone(url) => RawConnection::Standalone(
                redis::Client::open(url.as_str())
                    .expect("the harness's URL parses")
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to the harness's redis-server"),
            ),
            Target::Cluster(seeds) => RawConnection::Cluster(
                redis::cluster::ClusterClient::new(seeds.clone())
                    .expect("the harness's URLs parse")
                    .get_async_connection()
                    .await
                    .expect("connect to the harness's cluster"),
            ),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Standalone(url) => f.write_str(url),
            Target::Cluster(seeds) => write!(f, "cluster:{}", seeds.join(",")),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Target, Self::Err> {
        Ok(match s.strip_prefix("cluster:") {
            Some(seeds) => Target::Cluster(seeds.split(',').map(str::to_owned).collect()),
            None => Target::Standalone(s.to_owned()),
        })
    }
}

/// A plain connection to a standalone server or a cluster; commands on it
/// are routed by key on a cluster.
#[derive(Clone)]
pub enum RawConnection {
    /// To one server.
    Standalone(redis::aio::MultiplexedConnection),
    /// To a cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for RawConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RawConnection::Standalone(c) => c.req_packed_command(cmd),
            RawConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RawConnection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            RawConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RawConnection::Standalone(c) => c.get_db(),
            RawConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// A plain connection to the server, bypassing the code under test.
pub async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("the harness's URL parses")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the harness's redis-server")
}

/// One raw command with binary arguments, e.g. to plant garbage under a key.
/// Panics on an error reply: a test's own set-up must not fail silently.
pub async fn raw<T: redis::FromRedisValue>(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    args: &[&[u8]],
) -> T {
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command names are UTF-8"));
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("raw {:?}: {e}", String::from_utf8_lossy(args[0])))
}

/// The Redis a benchmark runs on: `REDIS_URL` if set, otherwise a private
/// `redis-server`, kept running as long as the returned handle lives.
pub fn benchmark_redis() -> Result<(String, Option<RedisServer>), &'static str> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok((url, None));
    }
    if !redis_server_available() {
        return Err(install_hint());
    }
    let server = RedisServer::start();
    Ok((server.url(), Some(server)))
}

/// What waiting for replicas costs a write: `Cache::invalidate` of
/// `key(round % 20)`, 400 times on each cache (one with
/// `WriteDurability::PrimaryOnly`, one with the defaults), interleaved;
/// prints p50 and p99 of each and their ratio for `deployment`. A write
/// whose replica answered late is an error, retried in the background:
/// counted, not a failure.
pub async fn print_write_cost<V>(
    deployment: &str,
    primary_only: &cache_runtime::Cache,
    default: &cache_runtime::Cache,
    key: impl Fn(u64) -> cache_runtime::CacheKey<V>,
) {
    let arms = [primary_only, default];
    let mut samples = [Vec::new(), Vec::new()];
    let mut errors = [0, 0];
    for round in 0..400usize {
        for arm in [round % 2, 1 - round % 2] {
            let key = key(round as u64 % 20);
            let started = Instant::now();
            errors[arm] += usize::from(arms[arm].invalidate(&key).await.is_err());
            samples[arm].push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let [plain, durable] = samples.map(|mut s| {
        s.sort_by(f64::total_cmp);
        (s[s.len() / 2], s[s.len() * 99 / 100])
    });
    println!(
        "write cost on {deployment} (Cache::invalidate, 400 each, interleaved): PrimaryOnly p50 \
         {:.0} µs, p99 {:.0} µs; the default (AllReplicas, 1 replica): p50 {:.0} µs ({:.2}×), \
         p99 {:.0} µs; errors {errors:?}",
        plain.0,
        plain.1,
        durable.0,
        durable.0 / plain.0,
        durable.1
    );
}
