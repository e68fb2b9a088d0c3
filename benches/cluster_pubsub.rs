//! What announcing releases costs a Redis Cluster (3 primaries, 3 replicas, processes or
//! containers on this machine): sharded pub/sub (`SPUBLISH`, what `connect_cluster` uses)
//! against classic pub/sub (`PUBLISH`, a manager built `with_notify_via`), which a cluster
//! copies to every node over its bus.
//!
//! ```sh
//! DISTLOCK_TEST_BACKEND=process cargo bench --features cluster --bench cluster_pubsub
//! ```
//!
//! Uncontended `try_lock` + `release` cycles, 16 tasks on distinct keys spread over the
//! slots, in alternating rounds (classic, sharded, classic, ...) in this one process so
//! that load drifts hit both sides of the ratio alike. Per cycle: the wall time, and the
//! CPU time all six servers spent (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`).
//!
//! Under `cargo test` it runs a few cycles of each, as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use distlock::LockManager;
use support::cluster::Cluster;

const TASKS: usize = 16;

/// CPU seconds the six servers have used so far.
async fn server_cpu(cluster: &Cluster) -> f64 {
    let mut total = 0.0;
    for port in cluster.ports() {
        let mut conn = cluster.node_conn(port).await;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut conn)
            .await
            .expect("INFO cpu");
        total += info
            .lines()
            .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// `cycles` try_lock + release cycles on each of [`TASKS`] tasks, distinct keys: (wall
/// seconds, server CPU seconds).
async fn round(cluster: &Cluster, locks: &LockManager, cycles: u32, tag: &str) -> (f64, f64) {
    let cpu = server_cpu(cluster).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (locks, name) = (locks.clone(), format!("bench:pubsub:{tag}:{t}"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..cycles {
                let guard = locks.try_lock(&name).await.expect("free key");
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let wall = started.elapsed().as_secs_f64();
    (wall, server_cpu(cluster).await - cpu)
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (rounds, cycles) = if bench_mode { (6, 1_000) } else { (2, 20) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (classic, sharded) = runtime.block_on(async {
        let cluster = Cluster::start().await;
        let urls = cluster.urls();
        let sharded = LockManager::builder()
            .connect_cluster(&urls)
            .await
            .expect("connect");
        let first = redis::Client::open(urls[0].as_str()).expect("client");
        let classic = LockManager::builder()
            .with_notify_via(first)
            .connect_cluster(&urls)
            .await
            .expect("connect");
        let (mut c, mut s) = ((0.0, 0.0), (0.0, 0.0));
        for r in 0..rounds {
            let one = round(&cluster, &classic, cycles, &format!("c{r}")).await;
            let two = round(&cluster, &sharded, cycles, &format!("s{r}")).await;
            (c.0, c.1) = (c.0 + one.0, c.1 + one.1);
            (s.0, s.1) = (s.0 + two.0, s.1 + two.1);
        }
        (c, s)
    });
    let per_cycle = |(wall, cpu): (f64, f64)| {
        let n = f64::from(rounds * cycles) * TASKS as f64;
        (wall / n * 1e6 * TASKS as f64, cpu / n * 1e6)
    };
    let (c, s) = (per_cycle(classic), per_cycle(sharded));
    println!();
    println!(
        "release announcements on a 3+3 cluster: {TASKS} tasks, {rounds} alternating rounds \
         of {cycles} try_lock + release cycles per task, backend {:?}",
        support::backend()
    );
    println!("| announcements | µs per cycle (one task's view) | servers' CPU µs per cycle |");
    println!("|---|---|---|");
    println!("| classic `PUBLISH` (baseline) | {:.1} | {:.1} |", c.0, c.1);
    println!("| sharded `SPUBLISH` | {:.1} | {:.1} |", s.0, s.1);
    println!(
        "| ratio sharded / classic | {:.2} | {:.2} |",
        s.0 / c.0,
        s.1 / c.1
    );
}
