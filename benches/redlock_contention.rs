//! Many tasks on one lock over five independent primaries (Redlock): handoffs per second,
//! handoff latency, waiting times and split votes, against an in-process FIFO baseline that
//! sends the same commands to one node.
//!
//! ```sh
//! cargo bench --bench redlock_contention                                # test support's Redis
//! DISTLOCK_TEST_BACKEND=process cargo bench --bench redlock_contention  # redis-server processes
//! ```
//!
//! Each task loops: wait for the lock, hold it 1 ms, release, spend 1 ms outside (the
//! harness of the `contention` bench). Per size (8, 32, 128 tasks): the baseline; Redlock
//! with one manager; Redlock with the tasks spread over 8 managers (as 8 processes would
//! be), in the default mode and in fair mode; and one and 8 managers with release
//! notifications off (waiters poll). A split vote is
//! an acquire that took some nodes, not a majority, and after which no other holder has a
//! majority either as far as its answers tell (each node's "held" answer names its
//! holder's token). The count comes from distlock's `split_vote` debug event. `DISTLOCK_CONTENTION_SECS` sets the seconds per row
//! (5). Under `cargo test` it runs a short smoke version.
//!
//! `DISTLOCK_BENCH_LATENCY_MS=N` puts every node (the baseline's too) behind a proxy that
//! delivers each chunk N ms late in either direction (a round trip of 2N ms and more, as
//! between hosts): then a handoff costs what its round trips in a row cost, not the CPU
//! that five servers and the client share on one machine. The proxies run on a runtime of
//! their own.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "harness/contention.rs"]
mod harness;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use distlock::LockManager;
use harness::{HOLD, OUTSIDE, Row, print_rows, run_baseline, run_distlock, summarize};

/// Counts distlock's `split_vote` events; nothing else is enabled.
struct SplitVotes;

static SPLIT_VOTES: AtomicU64 = AtomicU64::new(0);

impl tracing::Subscriber for SplitVotes {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && metadata.fields().field("split_vote").is_some()
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {
        SPLIT_VOTES.fetch_add(1, Ordering::Relaxed);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// One row of distlock over `managers`, with its split votes per 1,000 acquisitions.
async fn row(
    variant: &str,
    managers: &[LockManager],
    key: &str,
    tasks: usize,
    run: Duration,
    fair: bool,
) -> Row {
    let before = SPLIT_VOTES.load(Ordering::Relaxed);
    let samples = run_distlock(managers, key, tasks, run, fair).await;
    let splits = SPLIT_VOTES.load(Ordering::Relaxed) - before;
    let acquisitions = samples.acquisitions.max(1);
    let mut row = summarize(variant, tasks, run, samples);
    row.extra = format!(
        "{splits} ({:.1} per 1k)",
        splits as f64 * 1000.0 / acquisitions as f64
    );
    row
}

async fn managers(urls: &[String], count: usize, notify: bool) -> Vec<LockManager> {
    let mut all = Vec::new();
    for _ in 0..count {
        all.push(
            LockManager::builder()
                .with_node_timeout(Duration::from_millis(500))
                .with_notify(notify)
                .connect_redlock(urls)
                .await
                .expect("connect"),
        );
    }
    all
}

fn main() {
    tracing::subscriber::set_global_default(SplitVotes).expect("subscriber");
    // The counter counts: an event like distlock's is seen (so a 0 below means none).
    tracing::debug!(split_vote = true, "self-check");
    assert_eq!(
        SPLIT_VOTES.swap(0, Ordering::Relaxed),
        1,
        "split votes are counted"
    );
    let (counts, run) = harness::rows_and_run();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
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
    let latency_ms: u64 = std::env::var("DISTLOCK_BENCH_LATENCY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The proxies' runtime lives as long as the bench.
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("proxy runtime");
    let proxies: Vec<support::proxy::FaultProxy> = if latency_ms > 0 {
        nodes
            .iter()
            .map(|node| {
                let proxy = proxy_rt.block_on(support::proxy::FaultProxy::start(node.port()));
                proxy.set(support::proxy::Fault::Latency(Duration::from_millis(
                    latency_ms,
                )));
                proxy
            })
            .collect()
    } else {
        Vec::new()
    };
    let urls: Vec<String> = if proxies.is_empty() {
        nodes.iter().map(support::RedisNode::url).collect()
    } else {
        proxies
            .iter()
            .map(support::proxy::FaultProxy::url)
            .collect()
    };
    let rows = rt.block_on(async {
        let one = managers(&urls, 1, true).await;
        let eight = managers(&urls, 8, true).await;
        let one_polling = managers(&urls, 1, false).await;
        let eight_polling = managers(&urls, 8, false).await;
        let mut rows = Vec::new();
        for &tasks in counts {
            let base_conn = redis::Client::open(urls[0].as_str())
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("baseline connection");
            let base = run_baseline(base_conn, &format!("bench:base:{tasks}"), tasks, run).await;
            let mut baseline = summarize(
                "tokio Mutex + same Redis commands, one node (baseline)",
                tasks,
                run,
                base,
            );
            baseline.extra = "-".into();
            rows.push(baseline);
            for (variant, set, name, fair) in [
                ("Redlock (5 nodes), 1 manager", &one, "one", false),
                ("Redlock (5 nodes), 8 managers", &eight, "eight", false),
                ("Redlock (5 nodes), 8 managers, fair", &eight, "fair", true),
                (
                    "Redlock (5 nodes), 1 manager, polling",
                    &one_polling,
                    "one-poll",
                    false,
                ),
                (
                    "Redlock (5 nodes), 8 managers, polling",
                    &eight_polling,
                    "eight-poll",
                    false,
                ),
            ] {
                let key = format!("bench:redlock:{name}:{tasks}");
                rows.push(row(variant, set, &key, tasks, run, fair).await);
            }
        }
        rows
    });
    print_rows(
        &format!(
            "contention on one Redlock lock: hold {HOLD:?}, {OUTSIDE:?} outside, {run:?} per row, backend {:?}, added latency {latency_ms} ms each way",
            support::backend()
        ),
        Some("split votes"),
        &rows,
    );
}
