//! ZooKeeper against Redis on the same machine, same client code (`LockManager`), same
//! loop: the latency of a lock cycle and of a handoff.
//!
//! ```sh
//! DISTLOCK_TEST_BACKEND=process cargo bench --features zookeeper --bench zookeeper
//! ```
//!
//! - **cycle**: `try_lock` + `release` on a free lock, one task, one after the other. Redis:
//!   `SET NX PX GET` + the release script (2 round trips). ZooKeeper: create the ephemeral
//!   sequential node, list the children, delete (3 round trips, 2 of them writes through
//!   the ensemble's log).
//! - **handoff**: manager A holds the lock, manager B waits in `lock()`; the time from A's
//!   `release()` call until B holds the lock. Redis: the release is published and B's
//!   subscription wakes it (release notifications, the default). ZooKeeper: the delete
//!   fires B's watch on its predecessor, B lists the children and finds itself first.
//!
//! Rounds alternate between the two servers so drift in machine load hits both alike. Under
//! `cargo test` it runs a few of each as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/support/zk.rs"]
mod zk;

use std::time::{Duration, Instant};

use distlock::{LockManager, LockOptions};

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn cycles(locks: &LockManager, n: usize, out: &mut Vec<Duration>) {
    for _ in 0..n {
        let start = Instant::now();
        let guard = locks.try_lock("bench:cycle").await.expect("free lock");
        guard.release().await.expect("release");
        out.push(start.elapsed());
    }
}

async fn handoffs(a: &LockManager, b: &LockManager, n: usize, out: &mut Vec<Duration>) {
    for _ in 0..n {
        let held = a.lock("bench:handoff").await.expect("holder");
        let waiter = b.clone();
        let waiting = tokio::spawn(async move {
            let guard = waiter.lock("bench:handoff").await.expect("waiter");
            let at = Instant::now();
            (guard, at)
        });
        // Let the waiter queue (ZooKeeper) or subscribe (Redis) first.
        tokio::time::sleep(Duration::from_millis(15)).await;
        let released = Instant::now();
        held.release().await.expect("release");
        let (guard, at) = waiting.await.expect("waiter task");
        out.push(at.saturating_duration_since(released));
        guard.release().await.expect("release");
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    if !zk::available() {
        println!("zookeeper: skipped (no java or ZooKeeper jars)");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let server = zk::ZkServer::start();
    let options = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_wait(Duration::from_secs(10));
    let connect = |url: String| async move {
        LockManager::builder()
            .with_default_options(options)
            .connect(&url)
            .await
            .expect("connect")
    };
    let (rounds, per_round, handoffs_per_round) = if bench_mode { (5, 400, 40) } else { (1, 5, 2) };
    rt.block_on(async {
        let backends = [
            ("Redis", connect(node.url()).await, connect(node.url()).await),
            (
                "ZooKeeper",
                connect(server.url("/bench")).await,
                connect(server.url("/bench")).await,
            ),
        ];
        let mut cycle = [Vec::new(), Vec::new()];
        let mut handoff = [Vec::new(), Vec::new()];
        // Warm up: sessions, scripts, subscriptions, the lock's container node.
        for (_, a, b) in &backends {
            cycles(a, 20, &mut Vec::new()).await;
            handoffs(a, b, 2, &mut Vec::new()).await;
        }
        for _ in 0..rounds {
            for (k, (_, a, b)) in backends.iter().enumerate() {
                cycles(a, per_round, &mut cycle[k]).await;
                handoffs(a, b, handoffs_per_round, &mut handoff[k]).await;
            }
        }
        if !bench_mode {
            println!("zookeeper: smoke run passed");
            return;
        }
        println!();
        println!(
            "lock cycle (try_lock + release, {} per server) and handoff ({} per server), \
             one machine, Redis backend {:?}, ZooKeeper standalone process",
            rounds * per_round,
            rounds * handoffs_per_round,
            support::backend()
        );
        println!("| server | cycle p50 (ms) | cycle p99 (ms) | cycles/s | handoff p50 (ms) | handoff p99 (ms) |");
        println!("|---|---|---|---|---|---|");
        for (k, (name, _, _)) in backends.iter().enumerate() {
            let total: Duration = cycle[k].iter().sum();
            println!(
                "| {name} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
                ms(percentile(cycle[k].clone(), 0.5)),
                ms(percentile(cycle[k].clone(), 0.99)),
                cycle[k].len() as f64 / total.as_secs_f64(),
                ms(percentile(handoff[k].clone(), 0.5)),
                ms(percentile(handoff[k].clone(), 0.99)),
            );
        }
    });
}
