//! The contention harness shared by the contention benches: tasks that loop on one lock
//! (wait, hold 1 ms, release, 1 ms outside), an in-process FIFO baseline that sends the
//! same Redis commands, and the table both print.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};

/// The task counts and the time per row: 8, 32 and 128 tasks for
/// `DISTLOCK_CONTENTION_SECS` seconds (5) under `cargo bench`, a short smoke run of 8 tasks
/// for 300 ms under `cargo test`.
#[allow(dead_code)] // not used by the peer comparison
pub fn rows_and_run() -> (&'static [usize], Duration) {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let secs: u64 = std::env::var("DISTLOCK_CONTENTION_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|s| *s > 0)
        .unwrap_or(5);
    if bench_mode {
        (&[8, 32, 128], Duration::from_secs(secs))
    } else {
        (&[8], Duration::from_millis(300))
    }
}

pub const HOLD: Duration = Duration::from_millis(1);
pub const OUTSIDE: Duration = Duration::from_millis(1);

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
pub struct Samples {
    waits: Vec<u64>,
    handoffs: Vec<u64>,
    pub acquisitions: u64,
}

impl Samples {
    /// Samples recorded elsewhere (another process): waiting times and handoff latencies
    /// in ns, and the number of acquisitions.
    #[allow(dead_code)] // used by the multi-process bench only
    pub fn from_parts(waits: Vec<u64>, handoffs: Vec<u64>, acquisitions: u64) -> Samples {
        Samples {
            waits,
            handoffs,
            acquisitions,
        }
    }

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

/// One row of the table.
pub struct Row {
    pub variant: String,
    pub tasks: usize,
    pub per_sec: f64,
    pub handoff: [f64; 3],
    pub wait: [f64; 3],
    /// Extra columns a bench adds (e.g. split votes).
    pub extra: String,
}

pub fn summarize(variant: &str, tasks: usize, run: Duration, mut s: Samples) -> Row {
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
        extra: String::new(),
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

/// distlock's row: `tasks` tasks over `managers` (task `t` waits in manager `t % n`).
#[allow(dead_code)] // not used by the multi-process bench
pub async fn run_distlock(
    managers: &[LockManager],
    key: &str,
    tasks: usize,
    run: Duration,
    fair: bool,
) -> Samples {
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(5))
        .with_wait(Duration::from_secs(60))
        .with_fair(fair)
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(50)),
        );
    let (managers, key) = (Arc::new(managers.to_vec()), Arc::new(key.to_owned()));
    run_peer(
        tasks,
        run,
        move |t| {
            let (locks, key) = (managers[t % managers.len()].clone(), Arc::clone(&key));
            async move { locks.lock_with(&*key, opts).await.expect("lock") }
        },
        |guard: distlock::LockGuard| async move { guard.release().await.expect("release") },
    )
    .await
}

/// `tasks` tasks looping on a lock (distlock's, the baseline's, another library's), with
/// one loop, clock and samples for every row: `acquire(task)` waits for the lock and
/// returns it, `release` gives it back.
pub async fn run_peer<L, A, AF, R, RF>(
    tasks: usize,
    run: Duration,
    acquire: A,
    release: R,
) -> Samples
where
    L: Send + 'static,
    A: Fn(usize) -> AF + Clone + Send + Sync + 'static,
    AF: std::future::Future<Output = L> + Send,
    R: Fn(L) -> RF + Clone + Send + Sync + 'static,
    RF: std::future::Future<Output = ()> + Send,
{
    let clock = Arc::new(Clock {
        base: Instant::now(),
        last_release: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (clock, stop, acquire, release) = (
            Arc::clone(&clock),
            Arc::clone(&stop),
            acquire.clone(),
            release.clone(),
        );
        handles.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            while !stop.load(Ordering::Relaxed) {
                let asked = clock.now();
                let lock = acquire(t).await;
                acquired(&clock, &mut samples, asked);
                tokio::time::sleep(HOLD).await;
                clock.last_release.store(clock.now(), Ordering::Release);
                release(lock).await;
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

/// The ideal row: an in-process FIFO mutex (tokio's) decides, and the holder sends the
/// commands distlock sends (its published protocol), by hand: `SET NX PX GET`, then the
/// release script.
pub async fn run_baseline(
    conn: redis::aio::MultiplexedConnection,
    key: &str,
    tasks: usize,
    run: Duration,
) -> Samples {
    let mutex = Arc::new(tokio::sync::Mutex::new(()));
    let release = Arc::new(redis::Script::new(distlock::protocol::RELEASE));
    let lease = Arc::new(format!("distlock:{{{key}}}"));
    let channel = Arc::new(format!("{lease}:released"));
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..tasks)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect(),
    );
    let acquire = {
        let (lease, tokens, conn) = (Arc::clone(&lease), Arc::clone(&tokens), conn.clone());
        move |t: usize| {
            let (mutex, lease, tokens, mut conn) = (
                Arc::clone(&mutex),
                Arc::clone(&lease),
                Arc::clone(&tokens),
                conn.clone(),
            );
            async move {
                let held = mutex.lock_owned().await;
                let previous: Option<String> = redis::cmd("SET")
                    .arg(&*lease)
                    .arg(&tokens[t])
                    .arg("NX")
                    .arg("PX")
                    .arg(5000)
                    .arg("GET")
                    .query_async(&mut conn)
                    .await
                    .expect("acquire");
                assert_eq!(previous, None, "the mutex hands over a free key");
                (held, t)
            }
        }
    };
    let release = move |(held, t): (tokio::sync::OwnedMutexGuard<()>, usize)| {
        let (release, lease, channel, tokens, mut conn) = (
            Arc::clone(&release),
            Arc::clone(&lease),
            Arc::clone(&channel),
            Arc::clone(&tokens),
            conn.clone(),
        );
        async move {
            let _: i64 = release
                .key(&*lease)
                .arg(&tokens[t])
                .arg(&*channel)
                .invoke_async(&mut conn)
                .await
                .expect("release");
            drop(held);
        }
    };
    run_peer(tasks, run, acquire, release).await
}

/// Prints `rows` as a table under `title`; each row's ratios are to the last baseline row
/// before it (a row whose variant names the baseline). `extra` names the extra column.
pub fn print_rows(title: &str, extra: Option<&str>, rows: &[Row]) {
    println!();
    println!("{title}");
    let extra_head = extra.map_or(String::new(), |e| format!(" {e} |"));
    let extra_rule = extra.map_or("", |_| "---|");
    println!(
        "| variant | tasks | handoffs/s | ratio to baseline | handoff p50 / p99 / max (ms) | wait p50 / p99 / max (ms) | max wait vs baseline |{extra_head}"
    );
    println!("|---|---|---|---|---|---|---|{extra_rule}");
    let mut baseline: Option<(f64, f64)> = None;
    for r in rows {
        if r.variant.contains("baseline") {
            baseline = Some((r.per_sec, r.wait[2]));
        }
        let (b_rate, b_max) = baseline.unwrap_or((r.per_sec, r.wait[2]));
        let extra_cell = extra.map_or(String::new(), |_| format!(" {} |", r.extra));
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} / {:.2} / {:.2} | {:.1} / {:.1} / {:.1} | {:.2}x |{extra_cell}",
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
