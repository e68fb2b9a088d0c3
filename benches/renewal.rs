//! The cost of keeping many leases alive: the batched auto-extension task against an auto-extension per
//! lease (a timer and a round trip each), measured in one process.
//!
//! ```sh
//! cargo bench --bench auto-extension                                # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench auto-extension  # a local redis-server
//! ```
//!
//! For each variant: hold the same number of leases for the same time, then report the
//! commands the server executed for auto-extensions (from `INFO commandstats`), and the CPU time
//! this process spent (from `/proc/thread-self/schedstat`; the runtime is single-threaded,
//! so that is everything the client did). An idle hold (no auto-extension at all) is the baseline
//! the CPU figures are taken against. Under `cargo test` it runs a short smoke version.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use distlock::{LockGuard, LockManager, LockOptions};
use redis::aio::MultiplexedConnection;

/// CPU time this thread has used, in nanoseconds (Linux).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (calls, µs of server time) the server has counted for `command`.
async fn server_stats(raw: &mut MultiplexedConnection, command: &str) -> (u64, u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:");
    let line = info.lines().find(|l| l.starts_with(&prefix)).unwrap_or("");
    let field = |name: &str| -> u64 {
        line.split(name)
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("calls="), field("usec="))
}

struct Measured {
    calls: u64,
    server: Duration,
    cpu: Duration,
}

async fn acquire_all(
    locks: &LockManager,
    prefix: &str,
    n: usize,
    opts: LockOptions,
) -> Vec<LockGuard> {
    let mut guards = Vec::with_capacity(n);
    for i in 0..n {
        guards.push(
            locks
                .try_lock_with(format!("{prefix}:{i}"), opts)
                .await
                .expect("acquire"),
        );
    }
    guards
}

/// Holds `guards` for `hold` while `renew` runs, and measures the server calls of
/// `command` and this thread's CPU time over the hold.
async fn measure<F: std::future::Future<Output = ()>>(
    raw: &mut MultiplexedConnection,
    command: &str,
    hold: Duration,
    renew: F,
) -> Measured {
    let (calls_before, usec_before) = server_stats(raw, command).await;
    let cpu_before = thread_cpu_ns();
    let _ = tokio::time::timeout(hold, renew).await;
    let cpu = Duration::from_nanos(thread_cpu_ns().saturating_sub(cpu_before));
    let (calls, usec) = server_stats(raw, command).await;
    Measured {
        calls: calls - calls_before,
        server: Duration::from_micros(usec - usec_before),
        cpu,
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let (leases, hold) = if bench_mode {
        (1000usize, Duration::from_secs(9))
    } else {
        (100usize, Duration::from_millis(600))
    };
    let ttl = Duration::from_millis(1500);
    let ticks = hold.as_secs_f64() / (ttl / 3).as_secs_f64();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    rt.block_on(async {
        let mut raw = node.conn().await;
        let locks = LockManager::new(node.conn().await).expect("manager");
        let plain = LockOptions::new().with_ttl(Duration::from_secs(60));

        // Baseline: leases held, nothing extending them.
        let guards = acquire_all(&locks, "bench:idle", leases, plain).await;
        let idle = measure(&mut raw, "evalsha", hold, std::future::pending::<()>()).await;
        for g in guards {
            g.release().await.expect("release");
        }

        // The auto-extension task: one batch per tick.
        let auto = LockOptions::new().with_ttl(ttl).with_auto_extend(true);
        let guards = acquire_all(&locks, "bench:auto", leases, auto).await;
        let started = Instant::now();
        let batched = measure(&mut raw, "evalsha", hold, std::future::pending::<()>()).await;
        assert!(guards.iter().all(|g| g.is_held()), "a lease was lost after {:?}", started.elapsed());
        for g in guards {
            g.release().await.expect("release");
        }

        // An auto-extension per lease: every lease extends itself every ttl/3.
        let guards = acquire_all(&locks, "bench:each", leases, plain.with_ttl(ttl)).await;
        let each = measure(&mut raw, "evalsha", hold, async {
            let mut tasks = tokio::task::JoinSet::new();
            for g in guards {
                tasks.spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        g.extend(ttl).await.expect("extend");
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        })
        .await;

        let per_tick = |m: &Measured| m.calls as f64 / ticks;
        let cpu_pct = |m: &Measured| (m.cpu.as_secs_f64() - idle.cpu.as_secs_f64()).max(0.0) / hold.as_secs_f64() * 100.0;
        println!();
        println!(
            "keeping {leases} leases alive for {hold:?} (TTL {ttl:?}, {ticks:.0} auto-extension periods), backend {:?}",
            support::backend()
        );
        println!("| variant | server calls | calls per period | server time | client CPU above idle |");
        println!("|---|---|---|---|---|");
        for (name, m) in [
            ("idle (no auto-extension)", &idle),
            ("distlock auto-extension task (batched)", &batched),
            ("one extend per lease per period", &each),
        ] {
            println!(
                "| {name} | {} | {:.1} | {:?} | {:.2} % |",
                m.calls,
                per_tick(m),
                m.server,
                cpu_pct(m)
            );
        }
        println!("(idle client CPU over the hold: {:?})", idle.cpu);
    });
}
