//! One uncontended acquire + release cycle: distlock against the floor of the same two
//! commands issued directly with redis-rs on the same connection.
//!
//! ```sh
//! cargo bench --bench cycle                               # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench cycle # a local redis-server, no Docker
//! ```
//!
//! Besides criterion's own report, a bench run ends with a ratio table: floor and distlock
//! measured in alternating rounds in this one process, ratio of the medians.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use distlock::LockManager;
use redis::Script;
use redis::aio::MultiplexedConnection;

// The same scripts distlock sends (see src/scripts.rs); the floor sends them by hand.
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local now = redis.call('TIME')
  local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
  local fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
  return {1, fence}
end
return {0, redis.call('PTTL', KEYS[1])}
"#;
const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
elseif v then
  return -1
end
return 0
"#;
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const TTL_MS: u64 = 30_000;
const FENCE_TTL_MS: u64 = 86_400_000;

struct Floor {
    conn: MultiplexedConnection,
    acquire: Script,
    release: Script,
}

impl Floor {
    /// The fenced protocol by hand: EVALSHA acquire, EVALSHA release.
    async fn cycle(&self) {
        let mut conn = self.conn.clone();
        let (taken, _fence): (i64, i64) = self
            .acquire
            .key("distlock:{bench:floor}")
            .key("distlock:{bench:floor}:fence")
            .arg(TOKEN)
            .arg(TTL_MS)
            .arg(FENCE_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .expect("acquire");
        assert_eq!(taken, 1);
        let released: i64 = self
            .release
            .key("distlock:{bench:floor}")
            .arg(TOKEN)
            .invoke_async(&mut conn)
            .await
            .expect("release");
        assert_eq!(released, 1);
    }

    /// The unfenced protocol by hand: SET NX PX, EVALSHA release.
    async fn plain_cycle(&self) {
        let mut conn = self.conn.clone();
        let ok: Option<String> = redis::cmd("SET")
            .arg("distlock:{bench:plain}")
            .arg(TOKEN)
            .arg("NX")
            .arg("PX")
            .arg(TTL_MS)
            .query_async(&mut conn)
            .await
            .expect("set");
        assert!(ok.is_some());
        let released: i64 = self
            .release
            .key("distlock:{bench:plain}")
            .arg(TOKEN)
            .invoke_async(&mut conn)
            .await
            .expect("release");
        assert_eq!(released, 1);
    }
}

async fn distlock_cycle(locks: &LockManager) {
    let guard = locks.try_lock("bench:distlock").await.expect("acquire");
    black_box(guard.fencing_token());
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
    let node = rt.block_on(support::RedisNode::start());
    let (floor, locks) = rt.block_on(async {
        let conn = node.conn().await;
        let floor = Floor {
            conn: conn.clone(),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
        };
        // Same connection for both sides.
        let locks = LockManager::new(conn).expect("manager");
        // Warm up: load scripts, open sockets.
        for _ in 0..200 {
            floor.cycle().await;
            floor.plain_cycle().await;
            distlock_cycle(&locks).await;
        }
        (floor, locks)
    });

    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut group = c.benchmark_group("acquire_release_cycle");
    group.bench_function("floor_fenced_raw", |b| {
        b.to_async(&rt).iter(|| floor.cycle())
    });
    group.bench_function("distlock", |b| {
        b.to_async(&rt).iter(|| distlock_cycle(&locks))
    });
    group.bench_function("floor_plain_set_nx", |b| {
        b.to_async(&rt).iter(|| floor.plain_cycle())
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
    rt.block_on(async {
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for _ in 0..CYCLES {
                floor.cycle().await;
            }
            let r = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                distlock_cycle(&locks).await;
            }
            let o = per_cycle(t);
            let t = Instant::now();
            for _ in 0..CYCLES {
                floor.plain_cycle().await;
            }
            let p = per_cycle(t);
            raw.push(r);
            ours.push(o);
            plain.push(p);
            ratio.push(o / r);
            plain_ratio.push(p / r);
        }
    });
    println!();
    println!(
        "uncontended acquire+release cycle: {ROUNDS} paired rounds x {CYCLES} cycles, backend {:?}",
        support::backend()
    );
    println!("| variant | median µs/cycle | median ratio to the floor |");
    println!("|---|---|---|");
    println!(
        "| floor: EVALSHA acquire + EVALSHA release, raw redis-rs | {:.1} | 1.000 |",
        median(raw) * 1e6
    );
    println!(
        "| distlock: try_lock + release | {:.1} | {:.3} |",
        median(ours) * 1e6,
        median(ratio)
    );
    println!(
        "| raw SET NX PX + EVALSHA release (no fencing token) | {:.1} | {:.3} |",
        median(plain) * 1e6,
        median(plain_ratio)
    );
}
