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

#[path = "harness/contention.rs"]
mod harness;

use distlock::LockManager;
use harness::{HOLD, OUTSIDE, print_rows, run_baseline, run_distlock, summarize};

fn main() {
    let (counts, run) = harness::rows_and_run();
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
            // Fair mode in one manager: what the queue's scripts cost, apart from what
            // spreading the waiters over 8 managers (connections) costs.
            let fair_one = run_distlock(
                std::slice::from_ref(&notify),
                &format!("bench:fair1:{tasks}"),
                tasks,
                run,
                true,
            )
            .await;
            rows.push(summarize("distlock fair, 1 manager", tasks, run, fair_one));
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
    print_rows(
        &format!(
            "contention on one lock: hold {HOLD:?}, {OUTSIDE:?} outside, {run:?} per row, backend {:?}",
            support::backend()
        ),
        None,
        &rows,
    );
}
