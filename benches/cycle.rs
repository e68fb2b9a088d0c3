//! Uncontended acquire + release cycles: distlock against the floor of the same two
//! commands issued directly with redis-rs on the same connection, for one task and for
//! 64 concurrent tasks on distinct keys.
//!
//! ```sh
//! cargo bench --bench cycle                               # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench cycle # a local redis-server, no Docker
//! ```
//!
//! Besides criterion's own report, a bench run ends with a ratio table: floor and distlock
//! measured in alternating rounds in this one process, median of the per-round ratios.

#[path = "../tests/support/mod.rs"]
mod support;

// The very scripts distlock sends, so the baseline sends the same commands by hand.
#[allow(dead_code)]
#[path = "../src/scripts.rs"]
mod scripts;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use distlock::LockManager;
use redis::aio::MultiplexedConnection;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const TTL_MS: u64 = 30_000;
const FENCE_TTL_MS: u64 = 86_400_000;
const TASKS: usize = 64;

/// The Redis keys of one lock, spelled out for the floor.
struct Keys {
    name: String,
    lease: String,
    fence: String,
    channel: String,
}

impl Keys {
    fn new(name: &str) -> Self {
        let lease = format!("distlock:{{{name}}}");
        Keys {
            name: name.to_owned(),
            fence: format!("{lease}:fence"),
            channel: format!("{lease}:released"),
            lease,
        }
    }
}

#[derive(Clone)]
struct Floor {
    conn: MultiplexedConnection,
    acquire: redis::Script,
    release: redis::Script,
}

impl Floor {
    /// The protocol by hand: EVALSHA acquire (with fencing), EVALSHA release (announced).
    async fn cycle(&self, keys: &Keys) {
        let mut conn = self.conn.clone();
        let (taken, _fence): (i64, i64) = self
            .acquire
            .key(&keys.lease)
            .key(&keys.fence)
            .arg(TOKEN)
            .arg(TTL_MS)
            .arg(FENCE_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .expect("acquire");
        assert_eq!(taken, 1);
        self.release(&mut conn, keys).await;
    }

    /// Without fencing: SET NX PX, EVALSHA release.
    async fn plain_cycle(&self, keys: &Keys) {
        let mut conn = self.conn.clone();
        let ok: Option<String> = redis::cmd("SET")
            .arg(&keys.lease)
            .arg(TOKEN)
            .arg("NX")
            .arg("PX")
            .arg(TTL_MS)
            .query_async(&mut conn)
            .await
            .expect("set");
        assert!(ok.is_some());
        self.release(&mut conn, keys).await;
    }

    async fn release(&self, conn: &mut MultiplexedConnection, keys: &Keys) {
        let released: i64 = self
            .release
            .key(&keys.lease)
            .arg(TOKEN)
            .arg(&keys.channel)
            .invoke_async(conn)
            .await
            .expect("release");
        assert_eq!(released, 1);
    }
}

async fn distlock_cycle(locks: &LockManager, keys: &Keys) {
    let guard = locks.try_lock(&keys.name).await.expect("acquire");
    black_box(guard.fencing_token());
    guard.release().await.expect("release");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `cycles` cycles on each of `TASKS` concurrent tasks with distinct keys; returns
/// seconds per cycle overall.
async fn concurrent<F, Fut>(cycles: u32, prefix: &str, cycle: F) -> f64
where
    F: Fn(Arc<Keys>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let keys: Vec<Arc<Keys>> = (0..TASKS)
        .map(|i| Arc::new(Keys::new(&format!("{prefix}:{i}"))))
        .collect();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in keys {
        let runs: Vec<Fut> = (0..cycles).map(|_| cycle(Arc::clone(&k))).collect();
        tasks.spawn(async move {
            for run in runs {
                run.await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    started.elapsed().as_secs_f64() / f64::from(cycles * TASKS as u32)
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let one = Keys::new("bench:one");
    let (floor, locks) = rt.block_on(async {
        let conn = node.conn().await;
        let floor = Floor {
            conn: conn.clone(),
            acquire: scripts::ACQUIRE.clone(),
            release: scripts::RELEASE.clone(),
        };
        // Same connection for both sides; it bounds replies itself (500 ms by default).
        let locks = LockManager::builder()
            .connection_enforces_timeout()
            .build(conn)
            .expect("manager");
        // Warm up: load scripts, open sockets.
        for _ in 0..200 {
            floor.cycle(&one).await;
            floor.plain_cycle(&one).await;
            distlock_cycle(&locks, &one).await;
        }
        (floor, locks)
    });

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = c.benchmark_group("acquire_release_cycle");
    group.bench_function("floor_raw_redis_rs", |b| {
        b.to_async(&rt).iter(|| floor.cycle(&one))
    });
    group.bench_function("distlock", |b| {
        b.to_async(&rt).iter(|| distlock_cycle(&locks, &one))
    });
    group.bench_function("raw_set_nx_without_fencing", |b| {
        b.to_async(&rt).iter(|| floor.plain_cycle(&one))
    });
    group.finish();
    c.final_summary();

    if !bench_mode {
        return;
    }
    // Paired, alternating rounds: each round times a batch of floor cycles, then a batch of
    // distlock cycles, so drift in machine load hits both sides of one ratio alike; the
    // reported ratio is the median of the per-round ratios.
    const ROUNDS: usize = 101;
    const CYCLES: u32 = 500;
    let per_cycle = |t: Instant| t.elapsed().as_secs_f64() / f64::from(CYCLES);
    let (mut raw, mut ours, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratio, mut plain_ratio) = (Vec::new(), Vec::new());
    let (mut raw64, mut ours64, mut ratio64) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..ROUNDS {
            let t = Instant::now();
            for _ in 0..CYCLES {
                floor.cycle(&one).await;
            }
            let r = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                distlock_cycle(&locks, &one).await;
            }
            let o = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                floor.plain_cycle(&one).await;
            }
            let p = per_cycle(t);
            raw.push(r);
            ours.push(o);
            plain.push(p);
            ratio.push(o / r);
            plain_ratio.push(p / r);

            // 64 tasks on distinct keys, same connection, a third of the rounds.
            if round % 3 == 0 {
                let f = floor.clone();
                let r = concurrent(20, "bench:floor64", move |k| {
                    let f = f.clone();
                    async move { f.cycle(&k).await }
                })
                .await;
                let l = locks.clone();
                let o = concurrent(20, "bench:ours64", move |k| {
                    let l = l.clone();
                    async move { distlock_cycle(&l, &k).await }
                })
                .await;
                raw64.push(r);
                ours64.push(o);
                ratio64.push(r / o);
            }
        }
    });
    println!();
    println!(
        "uncontended cycles: {ROUNDS} paired rounds x {CYCLES} cycles (64 tasks: {} rounds x 64 x 20 cycles), backend {:?}",
        ratio64.len(),
        support::backend()
    );
    println!("| variant | median µs/cycle | median ratio to the floor |");
    println!("|---|---|---|");
    println!(
        "| floor, 1 task: EVALSHA acquire + EVALSHA release, raw redis-rs | {:.1} | 1.000 |",
        median(raw) * 1e6
    );
    println!(
        "| distlock, 1 task: try_lock + release | {:.1} | {:.3} (time) |",
        median(ours) * 1e6,
        median(ratio)
    );
    println!(
        "| raw SET NX PX + EVALSHA release (no fencing token), 1 task | {:.1} | {:.3} (time) |",
        median(plain) * 1e6,
        median(plain_ratio)
    );
    println!(
        "| floor, 64 tasks on distinct keys | {:.1} ({:.0} cycles/s) | 1.000 |",
        median(raw64.clone()) * 1e6,
        1.0 / median(raw64)
    );
    println!(
        "| distlock, 64 tasks on distinct keys | {:.1} ({:.0} cycles/s) | {:.3} (throughput) |",
        median(ours64.clone()) * 1e6,
        1.0 / median(ours64),
        median(ratio64)
    );
}
