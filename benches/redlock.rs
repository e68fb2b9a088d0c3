//! One uncontended acquire + release cycle on five independent primaries (Redlock) against
//! the same cycle on one primary, in one process.
//!
//! ```sh
//! cargo bench --bench redlock                               # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench redlock # local redis-server processes
//! ```
//!
//! Variants:
//! - one primary: [`LockManager::connect`] (fenced acquire script, the usual lock);
//! - Redlock over one node: the Redlock store with N = 1, to separate the cost of the
//!   fan-out from the cost of the number of nodes;
//! - Redlock over five nodes: every acquire and release goes to all five at once.
//!
//! A cycle on five nodes sends five times the commands; if the fan-out is concurrent its
//! latency stays near one cycle on the slowest node instead of five cycles in a row. Besides
//! criterion's report, a bench run ends with a table from alternating rounds in this one
//! process (so drift in machine load hits every variant alike): medians and the ratio of
//! each variant to the one-primary lock. Under `cargo test` it runs once as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::Criterion;
use distlock::LockManager;

async fn cycle(locks: &LockManager, name: &str) {
    let guard = locks.try_lock(name).await.expect("acquire");
    guard.release().await.expect("release");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let nodes = rt.block_on(async {
        let (a, b, c, d, e) = tokio::join!(
            support::RedisNode::start(),
            support::RedisNode::start(),
            support::RedisNode::start(),
            support::RedisNode::start(),
            support::RedisNode::start()
        );
        vec![a, b, c, d, e]
    });
    let urls: Vec<String> = nodes.iter().map(support::RedisNode::url).collect();
    let (single, redlock_one, redlock_five) = rt.block_on(async {
        // A node timeout far above any loopback round trip: the bench measures latency,
        // not timeouts.
        let builder = LockManager::builder().node_timeout(Duration::from_secs(2));
        let single = builder
            .clone()
            .connect(&urls[0])
            .await
            .expect("one primary");
        let redlock_one = builder
            .clone()
            .connect_redlock(&urls[..1])
            .await
            .expect("redlock, one node");
        let redlock_five = builder
            .connect_redlock(&urls)
            .await
            .expect("redlock, five nodes");
        // Warm up: load scripts, open sockets.
        for _ in 0..200 {
            cycle(&single, "bench:single").await;
            cycle(&redlock_one, "bench:redlock1").await;
            cycle(&redlock_five, "bench:redlock5").await;
        }
        (single, redlock_one, redlock_five)
    });

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = c.benchmark_group("acquire_release_cycle");
    group.bench_function("one_primary", |b| {
        b.to_async(&rt).iter(|| cycle(&single, "bench:single"))
    });
    group.bench_function("redlock_1_node", |b| {
        b.to_async(&rt)
            .iter(|| cycle(&redlock_one, "bench:redlock1"))
    });
    group.bench_function("redlock_5_nodes", |b| {
        b.to_async(&rt)
            .iter(|| cycle(&redlock_five, "bench:redlock5"))
    });
    group.finish();
    c.final_summary();

    if !bench_mode {
        return;
    }
    const ROUNDS: usize = 51;
    const CYCLES: u32 = 300;
    let per_cycle = |t: Instant| t.elapsed().as_secs_f64() / f64::from(CYCLES);
    let (mut one, mut rl1, mut rl5) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rl1_ratio, mut rl5_ratio) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for _ in 0..CYCLES {
                cycle(&single, "bench:single").await;
            }
            let s = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                cycle(&redlock_one, "bench:redlock1").await;
            }
            let r1 = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                cycle(&redlock_five, "bench:redlock5").await;
            }
            let r5 = per_cycle(t);
            one.push(s);
            rl1.push(r1);
            rl5.push(r5);
            rl1_ratio.push(r1 / s);
            rl5_ratio.push(r5 / s);
        }
    });
    println!();
    println!(
        "uncontended acquire+release cycle: {ROUNDS} alternating rounds x {CYCLES} cycles, backend {:?}",
        support::backend()
    );
    println!("| variant | median µs/cycle | median ratio to one primary |");
    println!("|---|---|---|");
    println!(
        "| one primary (`connect`) | {:.1} | 1.000 |",
        median(one) * 1e6
    );
    println!(
        "| Redlock, 1 node (`connect_redlock`, N = 1) | {:.1} | {:.3} |",
        median(rl1) * 1e6,
        median(rl1_ratio)
    );
    println!(
        "| Redlock, 5 nodes (`connect_redlock`, N = 5) | {:.1} | {:.3} |",
        median(rl5) * 1e6,
        median(rl5_ratio)
    );
}
