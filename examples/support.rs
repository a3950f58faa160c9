//! Where the examples run: `REDIS_URL` if set; otherwise a private
//! `redis-server` on a free loopback port, if one is installed; otherwise
//! the in-process cache. Not part of what an example shows: a service
//! connects to its own Redis with `Cache::connect(url)`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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
    match PrivateServer::start().await {
        Ok(server) => {
            let url = format!("redis://127.0.0.1:{}/", server.port);
            return Ok(ExampleBackend {
                cache: Cache::connect(&url).await?,
                description: format!("private redis-server at {url}"),
                url: Some(url),
                _server: Some(server),
            });
        }
        Err(why) => println!("{why}: using the in-process cache (Cache::memory())"),
    }
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
    /// Starts one and waits until it answers `PING`; why not, otherwise.
    async fn start() -> Result<PrivateServer, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port ({e})"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "redis-server is not installed and REDIS_URL is unset \
                     (`apt-get install redis-server` to run on Redis)"
                        .to_owned()
                }
                _ => format!("redis-server did not start ({e})"),
            })?;
        let mut server = PrivateServer { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Exited first (the port was taken meanwhile, say): whatever
            // answers on the port is not ours.
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("redis-server exited at start ({status})"));
            }
            if server.answers_ping() {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err("redis-server did not answer within 10 s".to_owned())
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
