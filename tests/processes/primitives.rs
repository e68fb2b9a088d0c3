//! The semaphore and the read-write lock across real OS processes: child processes of this
//! binary contend through their own managers and connections; every holder records its
//! section on `CLOCK_MONOTONIC` and counts itself in and out with atomic server-side
//! counters, so exclusion is checked both from the sections' times and from the counters.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use distlock::{Backoff, LockManager, LockOptions};
use redis::AsyncCommands;
use support::child::{self, monotonic_ns};
use support::{RedisNode, unique_key};

const PROCESSES: usize = 4;
const TASKS_PER_PROCESS: usize = 6;
const CYCLES_PER_TASK: usize = 10;
const PERMITS: usize = 3;

fn contended() -> LockOptions {
    LockOptions::new()
        .with_ttl(Duration::from_secs(30))
        .with_wait(Duration::from_secs(120))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(20)),
        )
}

/// Runs `PROCESSES` children of `test` in `role` and waits for all of them.
fn run_children(test: &str, role: &str, node: &RedisNode, prefix: &str) {
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            child::spawn(
                test,
                role,
                &[("URL", node.url()), ("PREFIX", prefix.to_owned())],
            )
        })
        .collect();
    for child in children {
        let id = child.id();
        let (status, _) = child.finish(Duration::from_secs(180));
        assert!(status.success(), "{role} {id} failed: {status}");
    }
}

/// `(start, end, kind, pid)` of every section recorded under `list`.
async fn sections(
    raw: &mut redis::aio::MultiplexedConnection,
    list: &str,
) -> Vec<(u64, u64, String, u32)> {
    let lines: Vec<String> = raw.lrange(list, 0, -1).await.unwrap();
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].to_owned(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

/// The most sections open at once, `[others, writers]` (kind `w` is a writer's), swept
/// over their start and end times; panics as soon as `forbidden` says the open sections
/// may not be open together.
fn most_at_once(
    sections: &[(u64, u64, String, u32)],
    forbidden: impl Fn(&[usize; 2]) -> bool,
) -> [usize; 2] {
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (start, end, kind, _) in sections {
        let k = usize::from(kind == "w");
        events.push((*start, true, k));
        events.push((*end, false, k));
    }
    // An end sorts before a start at the same instant (a section ends before its lease is
    // given back, the next begins after its grant: they cannot share an instant).
    events.sort();
    let (mut open, mut most) = ([0usize; 2], [0usize; 2]);
    for (_, starts, k) in events {
        if starts {
            open[k] += 1;
            most[k] = most[k].max(open[k]);
            assert!(
                !forbidden(&open),
                "sections overlap: {} others and {} writers open at once",
                open[0],
                open[1]
            );
        } else {
            open[k] -= 1;
        }
    }
    most
}

/// Every distlock key (fence counters aside) under `prefix` is gone within a few seconds.
async fn nothing_left(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let pattern = format!("{}*{prefix}*", distlock::DEFAULT_PREFIX);
    let mut left = Vec::new();
    for _ in 0..100 {
        left = raw.keys::<_, Vec<String>>(&pattern).await.unwrap();
        left.retain(|k| !k.ends_with(":fence"));
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_never_has_more_than_n_holders_across_processes() {
    if let Some(role) = child::role() {
        assert_eq!(role, "permit-holder");
        return hold_permits().await;
    }
    let node = RedisNode::start().await;
    let prefix = unique_key("procs-sem");
    run_children(
        "primitives::semaphore_never_has_more_than_n_holders_across_processes",
        "permit-holder",
        &node,
        &prefix,
    );
    let mut raw = node.conn().await;
    let total = PROCESSES * TASKS_PER_PROCESS * CYCLES_PER_TASK;
    let all = sections(&mut raw, &format!("{prefix}:sections")).await;
    assert_eq!(all.len(), total, "every section ran once");
    let count: usize = raw.get(format!("{prefix}:total")).await.unwrap();
    assert_eq!(count, total, "the counter of grants is exact");
    let inside: i64 = raw.get(format!("{prefix}:in")).await.unwrap();
    assert_eq!(inside, 0, "every holder counted itself out");
    let most = most_at_once(&all, |open| open[0] > PERMITS)[0];
    assert_eq!(
        most, PERMITS,
        "{PROCESSES} processes filled all {PERMITS} permits at some point"
    );
    let pids: std::collections::BTreeSet<u32> = all.iter().map(|s| s.3).collect();
    assert_eq!(pids.len(), PROCESSES, "every process held permits");
    nothing_left(&mut raw, &prefix).await;
    eprintln!("semaphore across processes: {total} sections, at most {most} of {PERMITS} at once");
}

/// A child's part: tasks taking a permit in turn; each holder counts itself in (the count
/// it sees must be at most N), records its section, and counts itself out.
async fn hold_permits() {
    let url = child::param("URL");
    let prefix = Arc::new(child::param("PREFIX"));
    let locks = LockManager::connect(&url).await.expect("connect");
    let sem = locks
        .semaphore(format!("{prefix}:sem"), PERMITS as u32)
        .expect("semaphore");
    let client = redis::Client::open(url.as_str()).expect("client");
    let pid = std::process::id();
    let mut tasks = Vec::new();
    for _ in 0..TASKS_PER_PROCESS {
        let (sem, prefix) = (sem.clone(), Arc::clone(&prefix));
        let mut raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("raw");
        tasks.push(tokio::spawn(async move {
            for _ in 0..CYCLES_PER_TASK {
                let permit = sem
                    .acquire_with(contended())
                    .await
                    .expect("a permit in time");
                let start = monotonic_ns();
                let inside: usize = raw.incr(format!("{prefix}:in"), 1).await.expect("INCR");
                assert!(
                    inside <= PERMITS,
                    "{inside} holders counted with {PERMITS} permits"
                );
                let _: () = raw.incr(format!("{prefix}:total"), 1).await.expect("INCR");
                tokio::time::sleep(Duration::from_micros(500)).await;
                let _: () = raw.decr(format!("{prefix}:in"), 1).await.expect("DECR");
                let end = monotonic_ns();
                assert!(permit.is_held(), "the section ended within the lease");
                let line = format!("{start} {end} p {pid}");
                let _: () = raw
                    .rpush(format!("{prefix}:sections"), line)
                    .await
                    .expect("RPUSH");
                permit.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("permit task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rwlock_never_has_a_writer_with_a_reader_or_another_writer_across_processes() {
    if let Some(role) = child::role() {
        assert_eq!(role, "reader-writer");
        return read_and_write().await;
    }
    let node = RedisNode::start().await;
    let prefix = unique_key("procs-rw");
    run_children(
        "primitives::rwlock_never_has_a_writer_with_a_reader_or_another_writer_across_processes",
        "reader-writer",
        &node,
        &prefix,
    );
    let mut raw = node.conn().await;
    let total = PROCESSES * TASKS_PER_PROCESS * CYCLES_PER_TASK;
    let all = sections(&mut raw, &format!("{prefix}:sections")).await;
    assert_eq!(all.len(), total, "every section ran once");
    let writes = all.iter().filter(|s| s.2 == "w").count();
    let counter: usize = raw.get(format!("{prefix}:counter")).await.unwrap();
    assert_eq!(
        counter, writes,
        "the non-atomic counter the writers bump is exact"
    );
    for key in ["readers-in", "writers-in"] {
        let inside: i64 = raw.get(format!("{prefix}:{key}")).await.unwrap();
        assert_eq!(inside, 0, "{key}: every holder counted itself out");
    }
    // A writer's section never overlaps another section of either kind.
    let most = most_at_once(&all, |open| open[1] > 1 || (open[1] == 1 && open[0] > 0));
    assert!(
        most[0] >= 2,
        "readers did share the lock: at most {} at once",
        most[0]
    );
    nothing_left(&mut raw, &prefix).await;
    eprintln!(
        "read-write lock across processes: {total} sections ({writes} writes), up to {} readers at once",
        most[0]
    );
}

/// A child's part: each task writes every third cycle and reads otherwise. A writer
/// checks it is alone (the counts), then bumps the counter non-atomically; a reader checks
/// no writer is in and that the counter does not change while it reads.
async fn read_and_write() {
    let url = child::param("URL");
    let prefix = Arc::new(child::param("PREFIX"));
    let locks = LockManager::connect(&url).await.expect("connect");
    let rw = locks.rw_lock(format!("{prefix}:rw")).expect("rw_lock");
    let client = redis::Client::open(url.as_str()).expect("client");
    let pid = std::process::id();
    let mut tasks = Vec::new();
    for t in 0..TASKS_PER_PROCESS {
        let (rw, prefix) = (rw.clone(), Arc::clone(&prefix));
        let mut raw = client
            .get_multiplexed_async_connection()
            .await
            .expect("raw");
        tasks.push(tokio::spawn(async move {
            let (readers, writers) = (
                format!("{prefix}:readers-in"),
                format!("{prefix}:writers-in"),
            );
            let counter = format!("{prefix}:counter");
            for c in 0..CYCLES_PER_TASK {
                let write = (t + c) % 3 == 0;
                let guard = match write {
                    true => rw.write_with(contended()).await.expect("write in time"),
                    false => rw.read_with(contended()).await.expect("read in time"),
                };
                let start = monotonic_ns();
                if write {
                    let alone: i64 = raw.incr(&writers, 1).await.expect("INCR");
                    assert_eq!(alone, 1, "two writers in at once");
                    let readers_in: Option<i64> = raw.get(&readers).await.expect("GET");
                    assert_eq!(readers_in.unwrap_or(0), 0, "a writer in with readers");
                    let value: Option<u64> = raw.get(&counter).await.expect("GET");
                    tokio::time::sleep(Duration::from_micros(300)).await;
                    let _: () = raw
                        .set(&counter, value.unwrap_or(0) + 1)
                        .await
                        .expect("SET");
                    let _: () = raw.decr(&writers, 1).await.expect("DECR");
                } else {
                    let _: () = raw.incr(&readers, 1).await.expect("INCR");
                    let writers_in: Option<i64> = raw.get(&writers).await.expect("GET");
                    assert_eq!(writers_in.unwrap_or(0), 0, "a reader in with a writer");
                    let before: Option<u64> = raw.get(&counter).await.expect("GET");
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    let after: Option<u64> = raw.get(&counter).await.expect("GET");
                    assert_eq!(before, after, "the counter changed under a reader");
                    let _: () = raw.decr(&readers, 1).await.expect("DECR");
                }
                let end = monotonic_ns();
                assert!(guard.is_held(), "the section ended within the lease");
                let kind = if write { "w" } else { "r" };
                let line = format!("{start} {end} {kind} {pid}");
                let _: () = raw
                    .rpush(format!("{prefix}:sections"), line)
                    .await
                    .expect("RPUSH");
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("reader-writer task");
    }
}
