//! Many tasks on one lock: handoffs per second, handoff latency and waiting times, with
//! release notifications on and off, against an in-process FIFO baseline.
//!
//! ```sh
//! cargo bench --bench contention                                # Redis from the test support
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench contention  # a local redis-server
//! ```
//!
//! Each task loops: wait for the lock, hold it 1 ms, release, spend 1 ms outside. The
//! baseline does the handing over with a `tokio::sync::Mutex` (FIFO, in-process) and still
//! issues the same Redis commands inside it: the best any distributed lock can do.
//! Handoff latency is the time from the start of a release to the next acquisition by
//! anyone. Under `cargo test` it runs a short smoke version.
//!
//! The last two rows of each size spread the tasks over 8 managers (8 connections and
//! subscriptions, as 8 processes would have): the default mode, and fair mode
//! (`LockOptions::with_fair`). `DISTLOCK_CONTENTION_SECS` sets the seconds per row (5).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};

const HOLD: Duration = Duration::from_millis(1);
const OUTSIDE: Duration = Duration::from_millis(1);

/// Timestamps shared by all tasks of one run, in ns since `base`.
struct Clock {
    base: Instant,
    last_release: AtomicU64,
}

impl Clock {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

#[derive(Default)]
struct Samples {
    waits: Vec<u64>,
    handoffs: Vec<u64>,
    acquisitions: u64,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.waits.extend(other.waits);
        self.handoffs.extend(other.handoffs);
        self.acquisitions += other.acquisitions;
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e6
}

struct Row {
    variant: String,
    tasks: usize,
    per_sec: f64,
    handoff: [f64; 3],
    wait: [f64; 3],
}

fn summarize(variant: &str, tasks: usize, run: Duration, mut s: Samples) -> Row {
    s.waits.sort_unstable();
    s.handoffs.sort_unstable();
    let tri = |v: &[u64]| {
        [
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().map_or(f64::NAN, |m| *m as f64 / 1e6),
        ]
    };
    Row {
        variant: variant.to_owned(),
        tasks,
        per_sec: s.acquisitions as f64 / run.as_secs_f64(),
        handoff: tri(&s.handoffs),
        wait: tri(&s.waits),
    }
}

/// Records one acquisition: its wait, and the handoff since the last release started.
fn acquired(clock: &Clock, samples: &mut Samples, asked_at: u64) {
    let now = clock.now();
    samples.waits.push(now - asked_at);
    let released = clock.last_release.swap(0, Ordering::AcqRel);
    if released != 0 && now >= released {
        samples.handoffs.push(now - released);
    }
    samples.acquisitions += 1;
}

async fn run_distlock(
    managers: &[LockManager],
    key: &str,
    tasks: usize,
    run: Duration,
    fair: bool,
) -> Samples {
    let clock = Arc::new(Clock {
        base: Instant::now(),
        last_release: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(5))
        .with_wait(Duration::from_secs(60))
        .with_fair(fair)
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(50)),
        );
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (locks, key, clock, stop) = (
            managers[t % managers.len()].clone(),
            key.to_owned(),
            Arc::clone(&clock),
            Arc::clone(&stop),
        );
        handles.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while !stop.load(Ordering::Relaxed) {
                let asked = clock.now();
                let guard = locks.lock_with(&key, opts).await.expect("lock");
                acquired(&clock, &mut samples, asked);
                tokio::time::sleep(HOLD).await;
                clock.last_release.store(clock.now(), Ordering::Release);
                guard.release().await.expect("release");
                tokio::time::sleep(OUTSIDE).await;
            }
            samples
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::default();
    for h in handles {
        all.merge(h.await.expect("task"));
    }
    all
}

async fn run_baseline(
    conn: redis::aio::MultiplexedConnection,
    key: &str,
    tasks: usize,
    run: Duration,
) -> Samples {
    let clock = Arc::new(Clock {
        base: Instant::now(),
        last_release: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mutex = Arc::new(tokio::sync::Mutex::new(()));
    // The commands distlock sends (its published protocol), by hand.
    let release = Arc::new(redis::Script::new(distlock::protocol::RELEASE));
    let lease = format!("distlock:{{{key}}}");
    let channel = format!("{lease}:released");
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (clock, stop, mutex, release) = (
            Arc::clone(&clock),
            Arc::clone(&stop),
            Arc::clone(&mutex),
            Arc::clone(&release),
        );
        let (lease, channel, mut conn) = (lease.clone(), channel.clone(), conn.clone());
        handles.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let token = uuid::Uuid::new_v4().simple().to_string();
            while !stop.load(Ordering::Relaxed) {
                let asked = clock.now();
                let held = mutex.lock().await;
                let previous: Option<String> = redis::cmd("SET")
                    .arg(&lease)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(5000)
                    .arg("GET")
                    .query_async(&mut conn)
                    .await
                    .expect("acquire");
                assert_eq!(previous, None, "the mutex hands over a free key");
                acquired(&clock, &mut samples, asked);
                tokio::time::sleep(HOLD).await;
                clock.last_release.store(clock.now(), Ordering::Release);
                let _: i64 = release
                    .key(&lease)
                    .arg(&token)
                    .arg(&channel)
                    .invoke_async(&mut conn)
                    .await
                    .expect("release");
                drop(held);
                tokio::time::sleep(OUTSIDE).await;
            }
            samples
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Samples::default();
    for h in handles {
        all.merge(h.await.expect("task"));
    }
    all
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("DISTLOCK_CONTENTION_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(5);
    let (counts, run): (&[usize], Duration) = if bench_mode {
        (&[8, 32, 128], Duration::from_secs(secs))
    } else {
        (&[8], Duration::from_millis(300))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let rows = rt.block_on(async {
        let notify = LockManager::connect(&node.url()).await.expect("connect");
        let polling = LockManager::builder()
            .with_notify(false)
            .connect(&node.url())
            .await
            .expect("connect");
        let mut spread = Vec::new();
        for _ in 0..8 {
            spread.push(LockManager::connect(&node.url()).await.expect("connect"));
        }
        let mut rows = Vec::new();
        for &tasks in counts {
            let base = run_baseline(
                node.conn().await,
                &format!("bench:base:{tasks}"),
                tasks,
                run,
            )
            .await;
            rows.push(summarize(
                "tokio Mutex + same Redis commands (baseline)",
                tasks,
                run,
                base,
            ));
            let on = run_distlock(
                std::slice::from_ref(&notify),
                &format!("bench:notify:{tasks}"),
                tasks,
                run,
                false,
            )
            .await;
            rows.push(summarize("distlock, notifications on", tasks, run, on));
            let off = run_distlock(
                std::slice::from_ref(&polling),
                &format!("bench:poll:{tasks}"),
                tasks,
                run,
                false,
            )
            .await;
            rows.push(summarize(
                "distlock, notifications off (polling)",
                tasks,
                run,
                off,
            ));
            let default =
                run_distlock(&spread, &format!("bench:spread:{tasks}"), tasks, run, false).await;
            rows.push(summarize(
                "distlock default, 8 managers",
                tasks,
                run,
                default,
            ));
            let fair =
                run_distlock(&spread, &format!("bench:fair:{tasks}"), tasks, run, true).await;
            rows.push(summarize("distlock fair, 8 managers", tasks, run, fair));
        }
        rows
    });
    println!();
    println!(
        "contention on one lock: hold {HOLD:?}, {OUTSIDE:?} outside, {run:?} per row, backend {:?}",
        support::backend()
    );
    println!(
        "| variant | tasks | handoffs/s | ratio to baseline | handoff p50 / p99 / max (ms) | wait p50 / p99 / max (ms) | max wait vs baseline |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut baseline: Option<(f64, f64)> = None;
    for r in &rows {
        if r.variant.contains("baseline") {
            baseline = Some((r.per_sec, r.wait[2]));
        }
        let (b_rate, b_max) = baseline.unwrap_or((r.per_sec, r.wait[2]));
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} / {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | {:.2}x |",
            r.variant,
            r.tasks,
            r.per_sec,
            r.per_sec / b_rate,
            r.handoff[0],
            r.handoff[1],
            r.handoff[2],
            r.wait[0],
            r.wait[1],
            r.wait[2],
            r.wait[2] / b_max
        );
    }
}
