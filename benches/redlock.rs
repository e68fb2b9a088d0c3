//! One uncontended acquire + release cycle on five independent primaries (Redlock) against
//! the same cycle on one primary, in one process.
//!
//! ```sh
//! cargo bench --bench redlock                               # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench redlock # local redis-server processes
//! ```
//!
//! Two settings, each with its own table:
//!
//! - **loopback**: the nodes as local servers. A round trip costs little besides CPU, and
//!   client and servers share the machine's cores, so this shows the CPU price of talking
//!   to five nodes. Variants: one primary ([`LockManager::connect`], the usual fenced
//!   lock); Redlock over one node (the fan-out's own overhead); Redlock over five nodes.
//! - **1 ms links**: every node behind a fault proxy that delays each chunk by 1 ms each
//!   way (proxies on their own runtime thread), the way a network spends time. Variants:
//!   one primary; Redlock over five nodes; and, as the reference for "the sum", five
//!   single-primary cycles one after another. Concurrent fan-out keeps Redlock near one
//!   cycle on one link instead of five.
//!
//! Each table comes from alternating rounds in this one process (load drift hits every
//! variant alike): medians and the median ratio of each variant to one primary. Criterion's
//! report covers the same variants. Under `cargo test` it runs once as a smoke test.

#[path = "../tests/support/mod.rs"]
mod support;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use criterion::Criterion;
use distlock::LockManager;
use support::proxy::{Fault, FaultProxy};

async fn cycle(locks: &LockManager, name: &str) {
    let guard = locks.try_lock(name).await.expect("acquire");
    guard.release().await.expect("release");
}

/// One cycle on each manager in turn: what a fan-out that is not concurrent would cost.
async fn cycles_in_turn(each: &[LockManager], name: &str) {
    for locks in each {
        cycle(locks, name).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One cycle of one variant, as a future.
type Run<'a> = dyn Fn() -> Pin<Box<dyn Future<Output = ()> + 'a>> + 'a;

/// Times `rounds` alternating rounds of `cycles` cycles of every variant; returns the
/// median µs per cycle of each, and the median per-round ratio of each to the first.
fn alternate(
    rt: &tokio::runtime::Runtime,
    rounds: usize,
    cycles: u32,
    variants: &[&Run<'_>],
) -> Vec<(f64, f64)> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    rt.block_on(async {
        for _ in 0..rounds {
            let mut round = Vec::new();
            for run in variants {
                let t = Instant::now();
                for _ in 0..cycles {
                    run().await;
                }
                round.push(t.elapsed().as_secs_f64() / f64::from(cycles));
            }
            for (i, per_cycle) in round.iter().enumerate() {
                times[i].push(*per_cycle);
                ratios[i].push(per_cycle / round[0]);
            }
        }
    });
    times
        .into_iter()
        .zip(ratios)
        .map(|(t, r)| (median(t) * 1e6, median(r)))
        .collect()
}

fn print_table(title: &str, names: &[&str], results: &[(f64, f64)]) {
    println!();
    println!("{title}");
    println!("| variant | median µs/cycle | median ratio to one primary |");
    println!("|---|---|---|");
    for (name, (us, ratio)) in names.iter().zip(results) {
        println!("| {name} | {us:.1} | {ratio:.3} |");
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The proxies forward on threads of their own, apart from the client's.
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("proxy runtime");
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
    let proxies: Vec<FaultProxy> = nodes
        .iter()
        .map(|node| proxy_rt.block_on(FaultProxy::start(node.port())))
        .collect();
    let urls: Vec<String> = nodes.iter().map(support::RedisNode::url).collect();
    let slow_urls: Vec<String> = proxies.iter().map(FaultProxy::url).collect();

    // A node timeout far above any round trip here: the bench measures latency, not
    // timeouts.
    let builder = LockManager::builder().with_node_timeout(Duration::from_secs(2));
    let (single, redlock_one, redlock_five, slow_single, slow_five, slow_each) =
        rt.block_on(async {
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
                .clone()
                .connect_redlock(&urls)
                .await
                .expect("redlock, five nodes");
            let mut slow_each = Vec::new();
            for url in &slow_urls {
                slow_each.push(builder.clone().connect(url).await.expect("one primary"));
            }
            let slow_five = builder
                .clone()
                .connect_redlock(&slow_urls)
                .await
                .expect("redlock, five nodes");
            (
                single,
                redlock_one,
                redlock_five,
                slow_each[0].clone(),
                slow_five,
                slow_each,
            )
        });
    for proxy in &proxies {
        proxy.set(Fault::Latency(Duration::from_millis(1)));
    }
    rt.block_on(async {
        // Warm up: load scripts, open sockets.
        for _ in 0..200 {
            cycle(&single, "bench:single").await;
            cycle(&redlock_one, "bench:redlock1").await;
            cycle(&redlock_five, "bench:redlock5").await;
        }
        for _ in 0..10 {
            cycle(&slow_five, "bench:slow5").await;
            cycles_in_turn(&slow_each, "bench:slow-each").await;
        }
    });

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = c.benchmark_group("acquire_release_loopback");
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
    let mut group = c.benchmark_group("acquire_release_1ms_links");
    group.bench_function("one_primary", |b| {
        b.to_async(&rt).iter(|| cycle(&slow_single, "bench:slow1"))
    });
    group.bench_function("redlock_5_nodes", |b| {
        b.to_async(&rt).iter(|| cycle(&slow_five, "bench:slow5"))
    });
    group.bench_function("5_primaries_in_turn", |b| {
        b.to_async(&rt)
            .iter(|| cycles_in_turn(&slow_each, "bench:slow-each"))
    });
    group.finish();
    c.final_summary();

    if !bench_mode {
        return;
    }
    let backend = support::backend();
    let names = [
        "one primary (`connect`)",
        "Redlock, 1 node (`connect_redlock`, N = 1)",
        "Redlock, 5 nodes (`connect_redlock`, N = 5)",
    ];
    let results = alternate(
        &rt,
        51,
        300,
        &[
            &|| Box::pin(cycle(&single, "bench:single")),
            &|| Box::pin(cycle(&redlock_one, "bench:redlock1")),
            &|| Box::pin(cycle(&redlock_five, "bench:redlock5")),
        ],
    );
    print_table(
        &format!(
            "loopback: acquire+release, 51 alternating rounds x 300 cycles, backend {backend:?}"
        ),
        &names,
        &results,
    );
    let names = [
        "one primary (`connect`)",
        "Redlock, 5 nodes (`connect_redlock`, N = 5)",
        "5 primaries one after another (the sum)",
    ];
    let results = alternate(
        &rt,
        21,
        20,
        &[
            &|| Box::pin(cycle(&slow_single, "bench:slow1")),
            &|| Box::pin(cycle(&slow_five, "bench:slow5")),
            &|| Box::pin(cycles_in_turn(&slow_each, "bench:slow-each")),
        ],
    );
    print_table(
        &format!(
            "1 ms links (fault proxy, each way): acquire+release, 21 alternating rounds x 20 cycles, backend {backend:?}"
        ),
        &names,
        &results,
    );
}
