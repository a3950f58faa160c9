//! A TCP fault proxy between the cache and `redis-server` (toxiproxy's
//! idea): bytes pass through unchanged until a test sets a [`Fault`], which
//! applies at once to every connection, open or new.
//!
//! It makes "timed out on the client, applied on the server" reproducible
//! rather than a timing accident: [`Fault::HoldReplies`] lets commands
//! reach Redis and holds their replies, so the client's op timeout fires on
//! a command that did land.
//!
//! ```no_run
//! use cache_harness::{Fault, FaultProxy, RedisServer};
//! let server = RedisServer::start();
//! let proxy = FaultProxy::start(server.port());
//! // connect the cache to proxy.url(), then:
//! proxy.set(Fault::HoldReplies);
//! proxy.set(Fault::None); // the held replies arrive, in order
//! ```
//!
//! The proxy runs on a thread of its own, with its own Tokio runtime, so a
//! test's runtime (even a single-threaded one) cannot starve it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// What the proxy does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes pass.
    None,
    /// Every chunk, in both directions, arrives this much later than it
    /// was sent (order kept).
    Latency(Duration),
    /// Commands reach Redis and are applied; replies are held until the
    /// fault changes, then delivered in order.
    HoldReplies,
    /// Nothing passes either way until the fault changes; then what was
    /// held is delivered, in order.
    Stall,
    /// Nothing passes, as in a network partition; when the fault changes,
    /// the connections that had bytes held are reset and those bytes are
    /// lost.
    Blackhole,
}

/// Which way a chunk travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// What happens to a chunk under a fault.
enum Treatment {
    Pass,
    Delay(Duration),
    Hold,
}

impl Fault {
    fn treatment(self, direction: Direction) -> Treatment {
        match (self, direction) {
            (Fault::None, _) | (Fault::HoldReplies, Direction::ToServer) => Treatment::Pass,
            (Fault::Latency(delay), _) => Treatment::Delay(delay),
            (Fault::HoldReplies | Fault::Stall | Fault::Blackhole, _) => Treatment::Hold,
        }
    }
}

/// A running proxy; stopped, and its connections closed, when dropped.
pub struct FaultProxy {
    port: u16,
    fault: watch::Sender<Fault>,
    resets: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port that forwards to
    /// `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let (fault, faults) = watch::channel(Fault::None);
        let (resets, reset_signal) = watch::channel(0);
        let accepted = Arc::new(AtomicU64::new(0));
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let counter = accepted.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the proxy's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        () = accept(listener, upstream, faults, reset_signal, counter) => {}
                        _ = stop => {}
                    }
                });
                // Dropping the runtime drops every connection task.
            })
            .expect("spawn the proxy thread");
        FaultProxy {
            port,
            fault,
            resets,
            accepted,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `redis://127.0.0.1:<proxy port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Applies `fault` to every connection, open and new, from now on.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Closes every open connection abruptly (RST), as a crashed peer or a
    /// load balancer would; bytes in flight are lost.
    pub fn reset_connections(&self) {
        self.resets.send_modify(|generation| *generation += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: u16,
    faults: watch::Receiver<Fault>,
    resets: watch::Receiver<u64>,
    accepted: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let (faults, resets) = (faults.clone(), resets.clone());
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await {
                carry(client, server, faults, resets).await;
            }
        });
    }
}

/// How one direction of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Its source closed and everything read was delivered.
    Closed,
    /// To be reset: a blackhole that held its bytes ended, or the sink
    /// failed.
    Reset,
}

/// Carries one connection both ways until both sides close, a reset is
/// asked for, or a blackhole that held its bytes ends.
async fn carry(
    mut client: TcpStream,
    mut server: TcpStream,
    faults: watch::Receiver<Fault>,
    mut resets: watch::Receiver<u64>,
) {
    resets.borrow_and_update();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ended = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let lost = AtomicBool::new(false);
        let to_server = pump(
            client_read,
            server_write,
            Direction::ToServer,
            faults.clone(),
            &lost,
        );
        let to_client = pump(
            server_read,
            client_write,
            Direction::ToClient,
            faults,
            &lost,
        );
        let both = async {
            tokio::pin!(to_server, to_client);
            tokio::select! {
                ended = &mut to_server => if ended == Ended::Reset { ended } else { to_client.await },
                ended = &mut to_client => if ended == Ended::Reset { ended } else { to_server.await },
            }
        };
        tokio::select! {
            ended = both => ended,
            _ = resets.changed() => Ended::Reset,
        }
    };
    if ended == Ended::Reset {
        // Closed with RST, not FIN: the peers see the connection broken.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies one direction, chunk by chunk, under the fault in force.
async fn pump(
    mut source: ReadHalf<'_>,
    mut sink: WriteHalf<'_>,
    direction: Direction,
    mut faults: watch::Receiver<Fault>,
    lost: &AtomicBool,
) -> Ended {
    let (chunks, mut queued) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let read = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = source.read(&mut buffer).await {
            if chunks.send((Instant::now(), buffer[..n].to_vec())).is_err() {
                break;
            }
        }
        // The source closed: the writer delivers what is queued, then ends.
        drop(chunks);
        std::future::pending::<()>().await;
    };
    let write = async move {
        while let Some((read_at, chunk)) = queued.recv().await {
            loop {
                let fault = *faults.borrow_and_update();
                match fault.treatment(direction) {
                    Treatment::Pass => break,
                    Treatment::Delay(delay) => {
                        tokio::time::sleep_until((read_at + delay).into()).await;
                        break;
                    }
                    Treatment::Hold => {
                        if fault == Fault::Blackhole {
                            lost.store(true, Ordering::SeqCst);
                        }
                        if faults.changed().await.is_err() {
                            return Ended::Reset;
                        }
                        if lost.load(Ordering::SeqCst) && *faults.borrow() != Fault::Blackhole {
                            return Ended::Reset;
                        }
                    }
                }
            }
            if sink.write_all(&chunk).await.is_err() {
                return Ended::Reset;
            }
        }
        let _ = sink.shutdown().await;
        Ended::Closed
    };
    tokio::select! {
        ended = write => ended,
        () = read => unreachable!("reading never ends by itself"),
    }
}
