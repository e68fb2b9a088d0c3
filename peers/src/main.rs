//! distlock against a peer crate under contention, in one run: five `redis-server`
//! processes on loopback, tasks that loop on one lock (wait, hold 1 ms, release, 1 ms
//! outside), the in-process FIFO baseline of the contention benches, and per size (8, 32,
//! 128 tasks):
//!
//! - distlock's Redlock with one manager, with 8 managers, and with 8 managers in fair mode;
//! - rslock (`acquire_no_guard` / `unlock`, its default retry settings) with one lock
//!   manager and with 8, as 8 processes would have.
//!
//! ```sh
//! cargo run --release --manifest-path peers/Cargo.toml
//! ```
//!
//! `DISTLOCK_CONTENTION_SECS` sets the seconds per row (5). `REDIS_SERVER` names the
//! server binary (`redis-server`).

#[path = "../../benches/harness/contention.rs"]
mod harness;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use distlock::LockManager;
use harness::{HOLD, OUTSIDE, print_rows, run_baseline, run_distlock, run_peer, summarize};

/// A `redis-server` process on a free loopback port, killed on drop.
struct Server {
    port: u16,
    child: Child,
}

impl Server {
    fn start() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        Server { port, child }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url()).expect("url");
        let started = Instant::now();
        loop {
            match client.get_multiplexed_async_connection().await {
                Ok(conn) => return conn,
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    panic!("{}: {e}", self.url())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn distlock_managers(urls: &[String], count: usize) -> Vec<LockManager> {
    let mut all = Vec::new();
    for _ in 0..count {
        all.push(
            LockManager::builder()
                .with_node_timeout(Duration::from_millis(500))
                .connect_redlock(urls)
                .await
                .expect("connect"),
        );
    }
    all
}

/// One rslock row: `managers` lock managers over the five nodes, the tasks spread over them.
async fn rslock_row(
    urls: &[String],
    managers: usize,
    key: String,
    tasks: usize,
    run: Duration,
) -> harness::Samples {
    let all: Vec<rslock::LockManager> = (0..managers)
        .map(|_| rslock::LockManager::new(urls.to_vec()))
        .collect();
    let ttl = Duration::from_secs(5);
    let (for_acquire, for_release) = (all.clone(), all);
    run_peer(
        tasks,
        run,
        move |t| {
            let (locks, key) = (for_acquire[t % for_acquire.len()].clone(), key.clone());
            async move {
                let lock = locks
                    .acquire_no_guard(key.as_bytes(), ttl)
                    .await
                    .expect("rslock acquire");
                (t, lock)
            }
        },
        move |(t, lock): (usize, rslock::Lock)| {
            let locks = for_release[t % for_release.len()].clone();
            async move { locks.unlock(&lock).await }
        },
    )
    .await
}

fn main() {
    let secs: u64 = std::env::var("DISTLOCK_CONTENTION_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(5);
    let run = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let servers: Vec<Server> = (0..5).map(|_| Server::start()).collect();
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let rows = rt.block_on(async {
        for server in &servers {
            drop(server.conn().await);
        }
        let one = distlock_managers(&urls, 1).await;
        let eight = distlock_managers(&urls, 8).await;
        let mut rows = Vec::new();
        for tasks in [8, 32, 128] {
            let base = run_baseline(
                servers[0].conn().await,
                &format!("peers:base:{tasks}"),
                tasks,
                run,
            )
            .await;
            rows.push(summarize(
                "tokio Mutex + distlock's commands, one node (baseline)",
                tasks,
                run,
                base,
            ));
            for (variant, set, fair) in [
                ("distlock Redlock, 1 manager", &one, false),
                ("distlock Redlock, 8 managers", &eight, false),
                ("distlock Redlock, 8 managers, fair", &eight, true),
            ] {
                let key = format!("peers:{variant}:{tasks}");
                let samples = run_distlock(set, &key, tasks, run, fair).await;
                rows.push(summarize(variant, tasks, run, samples));
            }
            for (variant, managers) in [
                ("rslock 0.10 (5 nodes), 1 manager", 1),
                ("rslock 0.10 (5 nodes), 8 managers", 8),
            ] {
                let key = format!("peers:rslock:{managers}:{tasks}");
                let samples = rslock_row(&urls, managers, key, tasks, run).await;
                rows.push(summarize(variant, tasks, run, samples));
            }
        }
        rows
    });
    print_rows(
        &format!(
            "one lock over five redis-server processes: hold {HOLD:?}, {OUTSIDE:?} outside, {run:?} per row"
        ),
        None,
        &rows,
    );
}
