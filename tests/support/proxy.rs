//! A TCP fault proxy for tests: clients connect to the proxy, the proxy forwards to a
//! Redis server, and the test decides at any moment what the link does.
//!
//! ```ignore
//! let proxy = FaultProxy::start(node.port()).await;
//! let locks = LockManager::connect(&proxy.url()).await?;
//! proxy.set(Fault::Blackhole);        // from now on nothing gets through either way
//! proxy.set(Fault::Pass);             // held bytes flow again, in order
//! proxy.reset_connections();          // every open connection gets an RST now
//! ```
//!
//! The fault applies to open connections and to new ones alike, and can be switched at
//! any time from any thread:
//!
//! | fault | open connections | new connections |
//! |---|---|---|
//! | [`Fault::Pass`] | bytes forwarded as they come | accepted and forwarded |
//! | [`Fault::Latency`] | every chunk, either way, delivered that much later | same |
//! | [`Fault::Blackhole`] | nothing forwarded either way, nothing answered; bytes wait | accepted, never answered |
//! | [`Fault::HoldReplies`] | requests reach the server, replies wait | same |
//! | [`Fault::Reset`] ("cut") | reset (RST) at once | accepted and reset at once |
//!
//! Held bytes are not lost: like a partition that heals before TCP gives up, they are
//! delivered in order once the fault allows it again (unless the connection is reset
//! first). That makes a late, duplicated request reach the server after the client gave
//! up on it, which is exactly what a lock must survive.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link between clients and the server does right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Forward everything, each chunk delivered this much later in either direction
    /// (a round trip gets twice this on top).
    Latency(Duration),
    /// Forward nothing either way and answer nothing; new connections are accepted and
    /// left silent. A paused or partitioned server, as a client sees it.
    Blackhole,
    /// Forward client-to-server bytes, hold server-to-client bytes: the server acts on
    /// requests, the client sees no reply.
    HoldReplies,
    /// Reset every open connection at once and every new one as soon as it is accepted:
    /// the link is cut. [`FaultProxy::set`] back to [`Fault::Pass`] restores it.
    Reset,
}

/// Counters of what the proxy did, for assertions and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connections ended with an RST by [`Fault::Reset`] or
    /// [`FaultProxy::reset_connections`].
    pub resets: u64,
    /// Bytes delivered to the server.
    pub bytes_to_server: u64,
    /// Bytes delivered to clients.
    pub bytes_to_client: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    resets: AtomicU64,
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
}

/// The proxy's control state, shared with every connection task.
struct Control {
    fault: watch::Sender<Fault>,
    /// Bumped by every reset; a connection accepted under generation `g` is reset when
    /// the generation moves past `g`.
    reset_generation: watch::Sender<u64>,
    counters: Counters,
}

/// A TCP proxy on a free loopback port, forwarding to `127.0.0.1:<upstream port>`.
///
/// Dropping it stops accepting and closes every connection it carries.
pub struct FaultProxy {
    addr: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy in [`Fault::Pass`] mode in front of `127.0.0.1:upstream_port`.
    /// The server need not be up yet: each client connection dials it when accepted.
    pub async fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let upstream: SocketAddr = ([127, 0, 0, 1], upstream_port).into();
        let control = Arc::new(Control {
            fault: watch::channel(Fault::Pass).0,
            reset_generation: watch::channel(0).0,
            counters: Counters::default(),
        });
        let tasks = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::clone(&control),
            Arc::clone(&tasks),
        ));
        FaultProxy {
            addr,
            control,
            tasks,
            accept_task,
        }
    }

    /// `redis://127.0.0.1:<proxy port>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The loopback port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Switches the fault for open and new connections alike, at once.
    pub fn set(&self, fault: Fault) {
        if fault == Fault::Reset {
            // Cut before announcing the mode, so no connection slips through in between.
            self.control.fault.send_replace(fault);
            self.reset_connections();
        } else {
            self.control.fault.send_replace(fault);
        }
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.control.fault.borrow()
    }

    /// Resets (RST) every connection open right now, whatever the fault; connections
    /// accepted afterwards follow the fault in force. Bytes held for a reset connection
    /// are discarded.
    pub fn reset_connections(&self) {
        self.control.reset_generation.send_modify(|g| *g += 1);
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.control.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            bytes_to_server: c.bytes_to_server.load(Ordering::Relaxed),
            bytes_to_client: c.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.abort_all();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: Arc<Control>,
    tasks: Arc<Mutex<tokio::task::JoinSet<()>>>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        control.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let generation = *control.reset_generation.borrow();
        let control = Arc::clone(&control);
        let mut tasks = tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Reap finished connections so the set does not grow with the test.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(carry(client, upstream, control, generation));
    }
}

/// Carries one client connection until either side closes or a reset ends it.
async fn carry(
    mut client: TcpStream,
    upstream: SocketAddr,
    control: Arc<Control>,
    generation: u64,
) {
    let _ = client.set_nodelay(true);
    let mut resets = control.reset_generation.subscribe();
    let reset_now = async move {
        let _ = resets.wait_for(|g| *g > generation).await;
    };
    if *control.fault.borrow() == Fault::Reset {
        return reset(&client, None, &control);
    }
    // Dial the server only once the fault lets bytes through: under a blackhole the
    // client must see a connection that is accepted and silent, whether or not the
    // server is up.
    let mut faults = control.fault.subscribe();
    let dial = async {
        let _ = faults
            .wait_for(|f| !matches!(f, Fault::Blackhole | Fault::Reset))
            .await;
        if *faults.borrow() == Fault::Reset {
            return None;
        }
        TcpStream::connect(upstream).await.ok()
    };
    let mut server = tokio::select! {
        server = dial => match server {
            Some(server) => server,
            None => return reset(&client, None, &control),
        },
        () = reset_now => return reset(&client, None, &control),
    };
    let _ = server.set_nodelay(true);

    let mut resets = control.reset_generation.subscribe();
    let reset_now = async move {
        let _ = resets.wait_for(|g| *g > generation).await;
    };
    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(
            client_read,
            server_write,
            Direction::ToServer,
            &control,
            generation,
        );
        let down = pump(
            server_read,
            client_write,
            Direction::ToClient,
            &control,
            generation,
        );
        tokio::select! {
            biased;
            _ = async { tokio::join!(up, down) } => Ended::Closed,
            () = reset_now => Ended::Reset,
            ended = wait_for_cut(&control) => ended,
        }
    };
    if outcome == Ended::Reset {
        reset(&client, Some(&server), &control);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Closed,
    Reset,
}

async fn wait_for_cut(control: &Control) -> Ended {
    let mut faults = control.fault.subscribe();
    let _ = faults.wait_for(|f| *f == Fault::Reset).await;
    Ended::Reset
}

/// Ends a connection with an RST instead of a FIN: zero linger, then close.
fn reset(client: &TcpStream, server: Option<&TcpStream>, control: &Control) {
    let _ = client.set_zero_linger();
    if let Some(server) = server {
        let _ = server.set_zero_linger();
    }
    control.counters.resets.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

impl Direction {
    fn open_under(self, fault: Fault) -> bool {
        match fault {
            Fault::Pass | Fault::Latency(_) => true,
            Fault::Blackhole | Fault::Reset => false,
            Fault::HoldReplies => self == Direction::ToServer,
        }
    }
}

/// Moves bytes one way. A chunk that was read is held until the fault lets this direction
/// through, and meanwhile nothing more is read: the rest waits in the kernel's buffers, as
/// it would behind a real partition. Under [`Fault::Latency`] the link is a pipe, not a
/// queue: each chunk is delivered that long after it was read, while the chunks behind
/// it are already being read (a chunk does not wait for the delay of the one before).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    direction: Direction,
    control: &Control,
    generation: u64,
) {
    // Chunks in flight under latency; a bounded pipe, so a stalled writer stops the reader.
    let (in_flight, mut arriving) =
        tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let read = async move {
        let mut faults = control.fault.subscribe();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if faults.wait_for(|f| direction.open_under(*f)).await.is_err() {
                break;
            }
            let read_at = tokio::time::Instant::now();
            if in_flight.send((read_at, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async {
        let mut faults = control.fault.subscribe();
        while let Some((read_at, chunk)) = arriving.recv().await {
            let fault = match faults.wait_for(|f| direction.open_under(*f)).await {
                Ok(fault) => *fault,
                Err(_) => break,
            };
            if let Fault::Latency(delay) = fault {
                tokio::time::sleep_until(read_at + delay).await;
            }
            // A reset wins over a fault lifted right after it: bytes held for a connection
            // that was reset are never delivered.
            if *control.reset_generation.borrow() > generation {
                break;
            }
            if to.write_all(&chunk).await.is_err() {
                break;
            }
            let counter = match direction {
                Direction::ToServer => &control.counters.bytes_to_server,
                Direction::ToClient => &control.counters.bytes_to_client,
            };
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        // Pass the end of the stream on, so a closed client closes its server connection.
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}
