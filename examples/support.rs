//! Where the examples run: `REDIS_URL` if set; otherwise a private
//! `redis-server` on a free loopback port, if one is installed; otherwise
//! the in-process cache. Not part of what an example shows: a service
//! connects to its own Redis with `Cache::connect(url)`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_runtime::{Cache, CacheError};

/// The cache an example runs on, and what keeps it running.
pub struct ExampleBackend {
    /// The cache to install.
    pub cache: Cache,
    /// One line for the example's output.
    pub description: String,
    /// The Redis URL, when there is a Redis.
    pub url: Option<String>,
    /// The private server, stopped when this is dropped.
    _server: Option<PrivateServer>,
}

/// Chooses and connects the [`ExampleBackend`].
pub async fn example_backend() -> Result<ExampleBackend, CacheError> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok(ExampleBackend {
            cache: Cache::connect(&url).await?,
            description: format!("Redis at {url} (REDIS_URL)"),
            url: Some(url),
            _server: None,
        });
    }
    if let Some(server) = PrivateServer::start() {
        let url = format!("redis://127.0.0.1:{}/", server.port);
        return Ok(ExampleBackend {
            cache: Cache::connect(&url).await?,
            description: format!("private redis-server at {url}"),
            url: Some(url),
            _server: Some(server),
        });
    }
    println!(
        "redis-server is not installed and REDIS_URL is unset: using the in-process cache \
         (Cache::memory()); `apt-get install redis-server` to run on Redis"
    );
    Ok(ExampleBackend {
        cache: Cache::memory(),
        description: "in-process memory".to_owned(),
        url: None,
        _server: None,
    })
}

/// A `redis-server` without persistence on a free loopback port.
struct PrivateServer {
    port: u16,
    child: Child,
}

impl PrivateServer {
    /// `None` when `redis-server` is not installed or does not start.
    fn start() -> Option<PrivateServer> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut server = PrivateServer { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            if matches!(server.child.try_wait(), Ok(Some(_))) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = server.child.kill();
        None
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
