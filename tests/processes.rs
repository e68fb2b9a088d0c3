//! Mutual exclusion and crash recovery across real OS processes.
//!
//! Each test re-runs this test binary as child processes (see `support::child`): the
//! children contend through their own `LockManager`s and connections, exactly as separate
//! services would, and time their critical sections on `CLOCK_MONOTONIC`, the one clock
//! every process on the machine shares.

mod support;

#[path = "processes/primitives.rs"]
mod primitives;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use distlock::{Backoff, Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::child::{self, monotonic_ns};
use support::{RedisNode, unique_key};

const PROCESSES: usize = 4;
const TASKS_PER_PROCESS: usize = 16;
const CYCLES_PER_TASK: usize = 16;
const KEYS: usize = 3;

/// One critical section as its holder recorded it.
#[derive(Debug, Clone, Copy)]
struct Section {
    fence: u64,
    /// `CLOCK_MONOTONIC` ns, read just after the lock call returned.
    start: u64,
    /// `CLOCK_MONOTONIC` ns, read just before the release was sent.
    end: u64,
    pid: u32,
}

impl Section {
    fn parse(line: &str) -> Section {
        let mut fields = line.split(' ').map(|f| f.parse::<u64>().expect("a number"));
        let mut next = || fields.next().expect("four fields");
        Section {
            fence: next(),
            start: next(),
            end: next(),
            pid: u32::try_from(next()).expect("a pid"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_holds_across_processes() {
    if let Some(role) = child::role() {
        assert_eq!(role, "contender");
        return contend_on_one_primary(false).await;
    }
    let node = RedisNode::start().await;
    let raw = node.conn().await;
    contenders_exclude_each_other(
        "mutual_exclusion_holds_across_processes",
        &[("URL", node.url())],
        raw,
        "one primary",
    )
    .await;
}

/// The same in fair mode: every waiter of the four processes queues in Redis beside the
/// lock, and is served in its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_holds_across_processes_in_fair_mode() {
    if let Some(role) = child::role() {
        assert_eq!(role, "contender");
        return contend_on_one_primary(true).await;
    }
    let node = RedisNode::start().await;
    let raw = node.conn().await;
    contenders_exclude_each_other(
        "mutual_exclusion_holds_across_processes_in_fair_mode",
        &[("URL", node.url())],
        raw,
        "one primary, fair mode",
    )
    .await;
    let mut raw = node.conn().await;
    let left: Vec<String> = raw.keys("distlock:*").await.unwrap();
    assert!(
        left.iter().all(|k| k.ends_with(":fence")),
        "only fencing counters are left: {left:?}"
    );
}

/// The same on a Redis Cluster (feature `cluster`): the locks and the counters live on
/// whichever primaries own their slots.
#[cfg(feature = "cluster")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_holds_across_processes_on_a_cluster() {
    if let Some(role) = child::role() {
        assert_eq!(role, "contender");
        let urls: Vec<String> = child::param("CLUSTER")
            .split(',')
            .map(str::to_owned)
            .collect();
        let locks = LockManager::builder()
            .connect_cluster(&urls)
            .await
            .expect("connect");
        let client = redis::cluster::ClusterClient::new(urls).expect("cluster client");
        let mut raws = Vec::new();
        for _ in 0..TASKS_PER_PROCESS {
            raws.push(client.get_async_connection().await.expect("raw connection"));
        }
        return contend(locks, raws, false).await;
    }
    let cluster = support::cluster::Cluster::start().await;
    let raw = redis::cluster::ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("raw connection");
    contenders_exclude_each_other(
        "mutual_exclusion_holds_across_processes_on_a_cluster",
        &[("CLUSTER", cluster.urls().join(","))],
        raw,
        "a 3+3 cluster",
    )
    .await;
}

/// A child's part on one primary (`URL`): its own manager, and a raw connection per task
/// for the counters.
async fn contend_on_one_primary(fair: bool) {
    let url = child::param("URL");
    let locks = LockManager::connect(&url).await.expect("connect");
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut raws = Vec::new();
    for _ in 0..TASKS_PER_PROCESS {
        raws.push(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("raw connection"),
        );
    }
    contend(locks, raws, fair).await
}

/// Runs [`PROCESSES`] children of `test_name` as contenders with `params`, then checks
/// their record through `raw`: no two sections of one key overlap, fencing tokens increase
/// with time, the non-atomic counters are exact, every process held a lock.
async fn contenders_exclude_each_other<C>(
    test_name: &str,
    params: &[(&str, String)],
    mut raw: C,
    deployment: &str,
) where
    C: redis::aio::ConnectionLike + Send + Sync,
{
    let prefix = unique_key("procs");
    let mut params = params.to_vec();
    params.push(("PREFIX", prefix.clone()));
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| child::spawn(test_name, "contender", &params))
        .collect();
    for child in children {
        let id = child.id();
        // Generous: 1024 sections on a loaded 2-core machine take a few seconds.
        let (status, _) = child.finish(Duration::from_secs(180));
        assert!(status.success(), "contender {id} failed: {status}");
    }
    let mut pids = BTreeSet::new();
    let mut total = 0;
    for k in 0..KEYS {
        let lines: Vec<String> = raw
            .lrange(format!("{prefix}:history:{k}"), 0, -1)
            .await
            .unwrap();
        let mut sections: Vec<Section> = lines.iter().map(|l| Section::parse(l)).collect();
        let counter: u64 = raw.get(format!("{prefix}:counter:{k}")).await.unwrap();
        assert_eq!(
            counter,
            sections.len() as u64,
            "key {k}: the non-atomic counter is exact"
        );
        sections.sort_by_key(|s| s.start);
        for pair in sections.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.end < b.start,
                "key {k}: sections overlap: {a:?} and {b:?}"
            );
            assert!(
                a.fence < b.fence,
                "key {k}: fencing tokens increase with time: {a:?} then {b:?}"
            );
        }
        let holders: BTreeSet<u32> = sections.iter().map(|s| s.pid).collect();
        assert!(
            holders.len() > 1,
            "key {k} was contended by several processes: {holders:?}"
        );
        pids.extend(holders);
        total += sections.len();
    }
    assert_eq!(
        total,
        PROCESSES * TASKS_PER_PROCESS * CYCLES_PER_TASK,
        "every section ran once"
    );
    assert_eq!(pids.len(), PROCESSES, "every process held a lock");
    eprintln!(
        "mutual exclusion across processes on {deployment}: {PROCESSES} processes x \
         {TASKS_PER_PROCESS} tasks, {total} sections on {KEYS} keys, 0 overlaps"
    );
}

/// A child's part: 16 tasks, each with its own raw connection, taking the keys in turn
/// and doing a non-atomic read-modify-write of the key's counter under the lock (in fair
/// mode if `fair`).
async fn contend<C>(locks: LockManager, raws: Vec<C>, fair: bool)
where
    C: redis::aio::ConnectionLike + Send + Sync + 'static,
{
    let prefix = Arc::new(child::param("PREFIX"));
    let opts = LockOptions::new()
        .with_fair(fair)
        .with_fencing(true)
        .with_ttl(Duration::from_secs(30))
        .with_wait(Duration::from_secs(120))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(20)),
        );
    let pid = std::process::id();
    let mut tasks = Vec::new();
    for (t, mut raw) in raws.into_iter().enumerate() {
        let locks = locks.clone();
        let prefix = Arc::clone(&prefix);
        tasks.push(tokio::spawn(async move {
            for c in 0..CYCLES_PER_TASK {
                let k = (t + c) % KEYS;
                let guard = locks
                    .lock_with(format!("{prefix}:lock:{k}"), opts)
                    .await
                    .expect("lock within the wait budget");
                let start = monotonic_ns();
                let counter = format!("{prefix}:counter:{k}");
                // Deliberately not atomic: GET, a pause, SET. Only the lock keeps it exact.
                let value: Option<u64> = raw.get(&counter).await.expect("GET");
                tokio::time::sleep(Duration::from_micros(200)).await;
                let _: () = raw
                    .set(&counter, value.unwrap_or(0) + 1)
                    .await
                    .expect("SET");
                let end = monotonic_ns();
                assert!(guard.is_held(), "the section ended within the lease");
                let fence = guard
                    .fencing_token()
                    .expect("one primary per lock gives fences");
                let _: () = raw
                    .rpush(
                        format!("{prefix}:history:{k}"),
                        format!("{fence} {start} {end} {pid}"),
                    )
                    .await
                    .expect("RPUSH");
                guard.release().await.expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("contender task");
    }
}

const CRASH_TTL: Duration = Duration::from_millis(1500);
const CRASH_BACKOFF_CAP: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_lease_passes_on_after_its_ttl_and_not_before() {
    if let Some(role) = child::role() {
        assert_eq!(role, "holder");
        return hold_until_killed().await;
    }
    let node = RedisNode::start().await;
    let name = unique_key("crash");
    let mut holder = child::spawn(
        "a_crashed_holders_lease_passes_on_after_its_ttl_and_not_before",
        "holder",
        &[("URL", node.url()), ("NAME", name.clone())],
    );
    // "<before> <after> <fence>": CLOCK_MONOTONIC around the holder's lock call.
    let line = holder.next_line(Duration::from_secs(60));
    let fields: Vec<u64> = line.split(' ').map(|f| f.parse().unwrap()).collect();
    let (sent, acquired, crashed_fence) = (fields[0], fields[1], fields[2]);

    holder.kill();
    let (status, _) = holder.finish(Duration::from_secs(10));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the holder died mid-section"
    );

    let locks = LockManager::connect(&node.url()).await.unwrap();
    match locks.try_lock(&name).await {
        Err(Error::Contended { retry_after, .. }) => {
            assert!(retry_after.is_some_and(|left| left <= CRASH_TTL));
        }
        other => panic!("the dead holder's lease is still there, got {other:?}"),
    }
    let opts = LockOptions::new()
        .with_fencing(true)
        .with_ttl(Duration::from_secs(5))
        .with_wait(Duration::from_secs(10))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(10))
                .with_cap(CRASH_BACKOFF_CAP),
        );
    let guard = locks
        .lock_with(&name, opts)
        .await
        .expect("the lease passes on");
    let taken = monotonic_ns();

    let ttl_ns = CRASH_TTL.as_nanos() as u64;
    // The dead holder's SET ran after `sent`, so its key lived until at least sent + TTL,
    // and our SET ran before `taken`.
    assert!(
        taken >= sent + ttl_ns,
        "taken {} ms after the dead holder's acquire began: before its TTL ended",
        (taken - sent) / 1_000_000
    );
    // The key expired at most TTL after the holder's acquire returned; one backoff step
    // (at most the cap) later an attempt sees it free. 400 ms of slack covers a round trip
    // and scheduling on a loaded 2-core machine; the lower bound above is exact.
    let slack_ns = 400_000_000;
    let bound = acquired + ttl_ns + CRASH_BACKOFF_CAP.as_nanos() as u64 + slack_ns;
    assert!(
        taken <= bound,
        "taken {} ms after the dead holder acquired: later than TTL + one backoff step",
        (taken - acquired) / 1_000_000
    );
    assert!(guard.fencing_token().unwrap() > crashed_fence);
    eprintln!(
        "holder crash: lease passed on {} ms after the dead holder acquired (TTL {} ms)",
        (taken - acquired) / 1_000_000,
        CRASH_TTL.as_millis()
    );
    guard.release().await.unwrap();
}

/// The holder's part: take the lease, say so, then sit in the critical section until the
/// parent kills this process (bounded, should the parent die first).
async fn hold_until_killed() {
    let locks = LockManager::connect(&child::param("URL"))
        .await
        .expect("connect");
    let opts = LockOptions::new().with_fencing(true).with_ttl(CRASH_TTL);
    let sent = monotonic_ns();
    let guard = locks
        .lock_with(child::param("NAME"), opts)
        .await
        .expect("lock");
    let acquired = monotonic_ns();
    let fence = guard.fencing_token().expect("fence");
    child::report(&format!("{sent} {acquired} {fence}"));
    tokio::time::sleep(Duration::from_secs(60)).await;
    panic!("the holder was not killed");
}

const QUEUE_LEASE: Duration = Duration::from_millis(600);

fn fair_waiting() -> LockOptions {
    LockOptions::new()
        .with_fair(true)
        .with_queue_lease(QUEUE_LEASE)
        .with_ttl(Duration::from_secs(10))
        .with_wait(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_waiter_holds_up_a_fair_queue_at_most_its_entry_lease() {
    if let Some(role) = child::role() {
        assert_eq!(role, "waiter");
        let locks = LockManager::connect(&child::param("URL"))
            .await
            .expect("connect");
        let _ = locks.lock_with(child::param("NAME"), fair_waiting()).await;
        panic!("the waiter was not killed");
    }
    let node = RedisNode::start().await;
    let raw = node.conn().await;
    let name = unique_key("fair-kill");
    let queue = format!("{}:q", support::lease_key(&name));
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let guard = locks.lock_with(&name, fair_waiting()).await.unwrap();

    let mut waiter = child::spawn(
        "a_killed_waiter_holds_up_a_fair_queue_at_most_its_entry_lease",
        "waiter",
        &[("URL", node.url()), ("NAME", name.clone())],
    );
    let queued = |n: usize| {
        let (mut raw, queue) = (raw.clone(), queue.clone());
        async move {
            let len: usize = raw.zcard(&queue).await.unwrap();
            len == n
        }
    };
    support::eventually(Duration::from_secs(60), "the child queued", || queued(1)).await;
    // Let it refresh its entry a few times, then kill it at the head of the queue.
    tokio::time::sleep(QUEUE_LEASE).await;
    waiter.kill();
    let killed = std::time::Instant::now();
    let _ = waiter.finish(Duration::from_secs(10));

    let next = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move { locks.lock_with(&name, fair_waiting()).await })
    };
    support::eventually(Duration::from_secs(5), "the next waiter queued", || {
        queued(2)
    })
    .await;
    guard.release().await.unwrap();
    let got = next
        .await
        .unwrap()
        .expect("served after the dead entry expired");
    let waited = killed.elapsed();
    got.release().await.unwrap();
    // The dead entry was refreshed at most a third of its lease before the kill, so it
    // expired within the entry lease of it; the next waiter's refresh comes at most a
    // third of a lease later. 300 ms of slack for a loaded 2-core machine.
    assert!(
        waited <= QUEUE_LEASE + QUEUE_LEASE / 3 + Duration::from_millis(300),
        "the queue was held up {waited:?} by a dead waiter (entry lease {QUEUE_LEASE:?})"
    );
    eprintln!("a killed waiter held up the fair queue {waited:?} (entry lease {QUEUE_LEASE:?})");
    support::eventually(Duration::from_secs(2), "the queue is gone", || queued(0)).await;
}

/// Processes that queue in a known order are served in that order (fair mode): each child
/// waits for the lock the parent holds, and joins the queue only after the one before it
/// did; the parent releases, and the order the children got the lock in is the order
/// they queued in. Nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_served_in_the_order_they_queued_in_fair_mode() {
    const CHILDREN: usize = 6;
    if let Some(role) = child::role() {
        assert_eq!(role, "queuer");
        let url = child::param("URL");
        let locks = LockManager::connect(&url).await.expect("connect");
        let mut raw = redis::Client::open(url.as_str())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("raw connection");
        let guard = locks
            .lock_with(child::param("NAME"), fair_waiting())
            .await
            .expect("served in its turn");
        let _: () = raw
            .rpush(child::param("ORDER"), child::param("INDEX"))
            .await
            .expect("RPUSH");
        tokio::time::sleep(Duration::from_millis(20)).await;
        guard.release().await.expect("release");
        return;
    }
    let node = RedisNode::start().await;
    let mut raw = node.conn().await;
    let name = unique_key("fair-order");
    let order = format!("{name}:order");
    let queue = format!("{}:q", support::lease_key(&name));
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let guard = locks.lock_with(&name, fair_waiting()).await.unwrap();
    let mut children = Vec::new();
    for i in 0..CHILDREN {
        children.push(child::spawn(
            "processes_are_served_in_the_order_they_queued_in_fair_mode",
            "queuer",
            &[
                ("URL", node.url()),
                ("NAME", name.clone()),
                ("ORDER", order.clone()),
                ("INDEX", i.to_string()),
            ],
        ));
        let (raw, queue) = (raw.clone(), queue.clone());
        support::eventually(Duration::from_secs(60), "the child queued", || {
            let (mut raw, queue) = (raw.clone(), queue.clone());
            async move {
                let len: usize = raw.zcard(&queue).await.unwrap();
                len == i + 1
            }
        })
        .await;
    }
    guard.release().await.unwrap();
    for child in children {
        let id = child.id();
        let (status, _) = child.finish(Duration::from_secs(60));
        assert!(status.success(), "queuer {id} failed: {status}");
    }
    let served: Vec<usize> = raw.lrange(&order, 0, -1).await.unwrap();
    assert_eq!(
        served,
        (0..CHILDREN).collect::<Vec<_>>(),
        "served in queue order"
    );
    let _: () = raw.del(&order).await.unwrap();
    drop(locks);
    support::eventually(Duration::from_secs(5), "nothing left", || {
        let mut raw = raw.clone();
        async move {
            let left: Vec<String> = raw.keys("*").await.unwrap();
            left.is_empty()
        }
    })
    .await;
}
