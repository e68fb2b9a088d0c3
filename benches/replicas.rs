//! The price of replica-acknowledged leases, on a primary with one replica (processes on
//! this machine), and why their `WAIT` gets connections of its own.
//!
//! ```sh
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench replicas
//! ```
//!
//! 1. Uncontended `try_lock` + `release` cycles with and without
//!    `LockOptions::with_replicas(1, 100 ms)`, on one manager (`LockManager::connect`),
//!    measured in alternating rounds in this one process so that load drifts hit both
//!    sides of the ratio alike; for 1 task and for 64 tasks on distinct keys.
//! 2. Plain cycles while another task keeps a replica-acknowledged acquire waiting in
//!    `WAIT` (the replica frozen with SIGSTOP, so every `WAIT` lasts its 100 ms timeout):
//!    on a manager from `connect` (the `WAIT` on a connection of its own) and on one from
//!    `build` over a shared `ConnectionManager` (the `WAIT` on the connection the plain
//!    cycles use too).
//!
//! Under `cargo test` it runs a few cycles of each, as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use distlock::{LockManager, LockOptions};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use support::replicated::ReplicaPair;

const TASKS: usize = 64;
const WAIT: Duration = Duration::from_millis(100);

fn replicated() -> LockOptions {
    LockOptions::new().with_replicas(1, WAIT)
}

/// Seconds per cycle: `cycles` cycles on each of `tasks` tasks, distinct keys.
async fn run(locks: &LockManager, opts: LockOptions, tasks: usize, cycles: u32, tag: &str) -> f64 {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let locks = locks.clone();
        let name = format!("bench:{tag}:{t}");
        set.spawn(async move {
            for _ in 0..cycles {
                let guard = locks.try_lock_with(&name, opts).await.expect("acquire");
                guard.release().await.expect("release");
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.expect("task");
    }
    started.elapsed().as_secs_f64() / f64::from(cycles * tasks as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Latencies (ms) of `cycles` plain cycles on `plain` while another task keeps
/// replica-acknowledged acquires of `waiting` in `WAIT` (the replica is frozen).
async fn plain_beside_wait(plain: &LockManager, waiting: &LockManager, cycles: usize) -> Vec<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (waiting, stop) = (waiting.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let err = waiting
                    .try_lock_with("bench:waiting", replicated())
                    .await
                    .expect_err("the replica is frozen");
                assert!(err.is_not_replicated(), "{err}");
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut out = Vec::with_capacity(cycles);
    for _ in 0..cycles {
        let started = Instant::now();
        let guard = plain.try_lock("bench:plain").await.expect("acquire");
        guard.release().await.expect("release");
        out.push(started.elapsed().as_secs_f64() * 1e3);
    }
    stop.store(true, Ordering::Relaxed);
    background.await.expect("background task");
    out
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pair = rt.block_on(ReplicaPair::start());
    let locks = rt.block_on(async { LockManager::connect(&pair.primary_url()).await.unwrap() });
    let plain = LockOptions::new();
    rt.block_on(async {
        run(&locks, plain, 4, 20, "warm").await;
        run(&locks, replicated(), 4, 20, "warm").await;
    });
    let shared = rt.block_on(async {
        let client = redis::Client::open(pair.primary_url()).unwrap();
        // The response timeout must outlast WAIT's: 2 s as `connect` uses.
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(distlock::DEFAULT_COMMAND_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .unwrap();
        LockManager::builder()
            .connection_enforces_timeout()
            .build(conn)
            .unwrap()
    });
    let cycles_beside = if bench_mode { 40 } else { 3 };
    if !bench_mode {
        rt.block_on(async {
            pair.pause_replica();
            plain_beside_wait(&locks, &locks, cycles_beside).await;
            pair.resume_replica();
        });
        println!("replicas: smoke run passed");
        return;
    }

    let rounds: usize = std::env::var("DISTLOCK_CYCLE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(21);
    let (cycles_one, cycles_many) = (300, 20);
    let variants = [
        ("plain: try_lock + release", plain),
        ("with_replicas(1, 100 ms)", replicated()),
    ];
    let mut one = vec![Vec::new(); 2];
    let mut many = vec![Vec::new(); 2];
    rt.block_on(async {
        for round in 0..rounds {
            for i in 0..2 {
                let k = (i + round) % 2;
                one[k].push(run(&locks, variants[k].1, 1, cycles_one, "one").await);
                many[k].push(run(&locks, variants[k].1, TASKS, cycles_many, "many").await);
            }
        }
    });
    let ratio = |samples: &Vec<Vec<f64>>| {
        median(
            samples[1]
                .iter()
                .zip(&samples[0])
                .map(|(r, p)| r / p)
                .collect(),
        )
    };
    println!();
    println!(
        "acquire + release on a primary with one replica, {rounds} alternating rounds (1 task: {cycles_one} cycles; {TASKS} tasks: {cycles_many} cycles each)"
    );
    println!("| variant | 1 task: µs/cycle | {TASKS} tasks: cycles/s |");
    println!("|---|---|---|");
    for (k, (label, _)) in variants.iter().enumerate() {
        println!(
            "| {label} | {:.0} | {:.0} |",
            median(one[k].clone()) * 1e6,
            1.0 / median(many[k].clone()),
        );
    }
    println!(
        "replicas / plain, time per cycle: 1 task {:.2}x, {TASKS} tasks {:.2}x",
        ratio(&one),
        ratio(&many)
    );

    let (lane, same) = rt.block_on(async {
        pair.pause_replica();
        let lane = plain_beside_wait(&locks, &locks, cycles_beside).await;
        let same = plain_beside_wait(&shared, &shared, cycles_beside).await;
        pair.resume_replica();
        (lane, same)
    });
    let max = |v: &Vec<f64>| v.iter().copied().fold(0.0, f64::max);
    println!();
    println!(
        "plain cycles while another task's WAIT is pending (replica frozen, WAIT timeout {WAIT:?}), {cycles_beside} cycles"
    );
    println!("| manager | median ms | max ms |");
    println!("|---|---|---|");
    println!(
        "| connect (WAIT on connections of its own) | {:.2} | {:.2} |",
        median(lane.clone()),
        max(&lane)
    );
    println!(
        "| build(shared ConnectionManager) (WAIT on the shared connection) | {:.2} | {:.2} |",
        median(same.clone()),
        max(&same)
    );
}
