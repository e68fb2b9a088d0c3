//! Fair mode across real processes: the waiters of one lock spread over 8 OS processes,
//! each with its own `LockManager` (connection and subscription), against the in-process
//! FIFO baseline of the contention bench, in one run.
//!
//! ```sh
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench contention_processes
//! ```
//!
//! Each task loops: wait for the lock (fair mode), hold it 1 ms, release, 1 ms outside.
//! The children time every acquisition and release on `CLOCK_MONOTONIC`, which all
//! processes of the machine share, and print them; this process merges them: waiting
//! times, handoff latency (a release's start to the next acquisition, whoever's), and
//! handoffs per second. `DISTLOCK_CONTENTION_SECS` sets the seconds per row (5). Under
//! `cargo test` it runs a short smoke version (8 tasks, 300 ms).

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/contention.rs"]
mod harness;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use distlock::{LockManager, LockOptions};
use harness::{HOLD, OUTSIDE, Samples, print_rows, run_baseline, summarize};
use support::child::monotonic_ns;

/// The processes the waiters are spread over.
const PROCESSES: usize = 8;

/// Set in a child: its part of one row.
const CHILD_VAR: &str = "DISTLOCK_CONTENTION_CHILD";

/// One acquisition as a child recorded it, in `CLOCK_MONOTONIC` ns.
#[derive(Debug, Clone, Copy)]
struct Record {
    asked: u64,
    acquired: u64,
    released: u64,
}

fn main() {
    if std::env::var_os(CHILD_VAR).is_some() {
        return child();
    }
    let (counts, run) = harness::rows_and_run();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt.block_on(support::RedisNode::start());
    let mut rows = Vec::new();
    for &tasks in counts {
        let base = rt.block_on(async {
            run_baseline(
                node.conn().await,
                &format!("bench:pbase:{tasks}"),
                tasks,
                run,
            )
            .await
        });
        rows.push(summarize(
            "tokio Mutex + same Redis commands (baseline)",
            tasks,
            run,
            base,
        ));
        let records =
            spread_over_processes(&node.url(), &format!("bench:pfair:{tasks}"), tasks, run);
        rows.push(summarize(
            &format!("distlock fair, {PROCESSES} processes"),
            tasks,
            run,
            samples(records),
        ));
        // Nothing left behind: no lease, no queue or its entries (a fencing counter may
        // stay, with its own expiry).
        let left: Vec<String> = rt.block_on(async {
            let mut conn = node.conn().await;
            redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut conn)
                .await
                .expect("KEYS")
        });
        assert!(
            left.iter().all(|k| k.ends_with(":fence")),
            "left behind after {tasks} tasks: {left:?}"
        );
    }
    print_rows(
        &format!(
            "fair mode across {PROCESSES} processes: hold {HOLD:?}, {OUTSIDE:?} outside, {run:?} per row, backend {:?}",
            support::backend()
        ),
        None,
        &rows,
    );
}

/// Runs `tasks` waiters spread over [`PROCESSES`] children for `run`, all starting at
/// the same instant; their records.
fn spread_over_processes(url: &str, key: &str, tasks: usize, run: Duration) -> Vec<Record> {
    let exe = std::env::current_exe().expect("path of this bench binary");
    // Time for every child to start and connect before the first attempt.
    let start = monotonic_ns() + 1_500_000_000;
    let end = start + u64::try_from(run.as_nanos()).expect("run fits in u64");
    let children: Vec<_> = (0..PROCESSES)
        .map(|p| {
            let mine = tasks / PROCESSES + usize::from(p < tasks % PROCESSES);
            Command::new(&exe)
                .env(CHILD_VAR, "1")
                .env("DISTLOCK_CHILD_URL", url)
                .env("DISTLOCK_CHILD_KEY", key)
                .env("DISTLOCK_CHILD_TASKS", mine.to_string())
                .env("DISTLOCK_CHILD_START", start.to_string())
                .env("DISTLOCK_CHILD_END", end.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn a child")
        })
        .collect();
    let mut records = Vec::new();
    for mut child in children {
        let out = child.stdout.take().expect("piped stdout");
        for line in BufReader::new(out).lines() {
            let line = line.expect("a child's line");
            let mut fields = line.split(' ').map(|f| f.parse::<u64>().expect("a number"));
            let mut next = || fields.next().expect("three fields");
            records.push(Record {
                asked: next(),
                acquired: next(),
                released: next(),
            });
        }
        let status = child.wait().expect("wait for a child");
        assert!(status.success(), "a child failed: {status}");
    }
    records
}

/// Waiting times, handoffs (a release's start to the next acquisition) and the count.
fn samples(mut records: Vec<Record>) -> Samples {
    records.sort_by_key(|r| r.acquired);
    let waits = records.iter().map(|r| r.acquired - r.asked).collect();
    let handoffs = records
        .windows(2)
        .filter(|w| w[1].acquired >= w[0].released)
        .map(|w| w[1].acquired - w[0].released)
        .collect();
    for w in records.windows(2) {
        assert!(
            w[0].released <= w[1].acquired,
            "two holders at once: {:?} and {:?}",
            w[0],
            w[1]
        );
    }
    Samples::from_parts(waits, handoffs, records.len() as u64)
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is missing"))
}

/// A child: its tasks, each with the manager of this process, from the start instant to
/// the end instant; one line per acquisition on stdout.
fn child() {
    let url = env("DISTLOCK_CHILD_URL");
    let key = env("DISTLOCK_CHILD_KEY");
    let tasks: usize = env("DISTLOCK_CHILD_TASKS").parse().expect("tasks");
    let start: u64 = env("DISTLOCK_CHILD_START").parse().expect("start");
    let end: u64 = env("DISTLOCK_CHILD_END").parse().expect("end");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let records = rt.block_on(async {
        let locks = LockManager::connect(&url).await.expect("connect");
        let opts = LockOptions::new()
            .with_fair(true)
            .with_ttl(Duration::from_secs(5))
            .with_wait(Duration::from_secs(60));
        let now = monotonic_ns();
        if start > now {
            tokio::time::sleep(Duration::from_nanos(start - now)).await;
        }
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let (locks, key) = (locks.clone(), key.clone());
            handles.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                while monotonic_ns() < end {
                    let asked = monotonic_ns();
                    let guard = locks.lock_with(&key, opts).await.expect("lock");
                    let acquired = monotonic_ns();
                    tokio::time::sleep(HOLD).await;
                    let released = monotonic_ns();
                    guard.release().await.expect("release");
                    mine.push(Record {
                        asked,
                        acquired,
                        released,
                    });
                    tokio::time::sleep(OUTSIDE).await;
                }
                mine
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("task"));
        }
        all
    });
    let mut out = std::io::stdout().lock();
    for r in records {
        writeln!(out, "{} {} {}", r.asked, r.acquired, r.released).expect("stdout");
    }
}
