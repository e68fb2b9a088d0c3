//! Fair mode (issue 12): waiters of every manager are served in arrival order through the
//! queue in Redis; nobody barges past it; a crashed, cancelled or timed-out waiter holds it
//! up for at most its entry lease and leaves nothing behind.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions};
use proptest::prelude::*;
use support::{Baseline, RedisNode, fifo_waiter, lease_key, unique_key};

/// Fair options with a quick backoff and a long wait.
fn fair(wait: Duration) -> LockOptions {
    support::contended(wait).with_fair(true)
}

fn queue_key(name: &str) -> String {
    format!("{}:q", lease_key(name))
}

async fn queued(conn: &mut redis::aio::MultiplexedConnection, name: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(queue_key(name))
        .query_async(conn)
        .await
        .expect("ZCARD")
}

/// Waits until `n` waiters queue for `name`.
async fn until_queued(node: &RedisNode, name: &str, n: usize) {
    let conn = node.conn().await;
    support::eventually(Duration::from_secs(5), &format!("{n} queued"), || {
        let (name, mut conn) = (name.to_owned(), conn.clone());
        async move { queued(&mut conn, &name).await == n }
    })
    .await;
    drop(conn);
}

/// A queue entry nobody refreshes, as a crashed waiter leaves it: `id` queued now (after
/// everyone queued so far), its entry expiring `lease` from now on the server's clock.
async fn stale_entry(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    id: &str,
    lease: Duration,
) {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    let now_us = secs * 1_000_000 + micros;
    let expires = now_us / 1000 + lease.as_millis() as u64;
    let q = queue_key(name);
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg(&q)
        .arg(now_us)
        .arg(id)
        .ignore()
        .cmd("HSET")
        .arg(format!("{q}x"))
        .arg(id)
        .arg(expires)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&q)
        .arg(lease.as_millis() as u64 + 1000)
        .ignore()
        .cmd("PEXPIRE")
        .arg(format!("{q}x"))
        .arg(lease.as_millis() as u64 + 1000)
        .ignore()
        .query_async(conn)
        .await
        .expect("a stale entry");
}

async fn managers(node: &RedisNode, n: usize) -> Vec<LockManager> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(LockManager::connect(&node.url()).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_many_managers_are_served_in_arrival_order() {
    const WAITERS: usize = 8;
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 4).await;
    let name = unique_key("fair-fifo");
    let order = Arc::new(Mutex::new(Vec::new()));
    let opts = fair(Duration::from_secs(30));

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        // Managers in a scrambled order, so arrival order is not manager order.
        let m = (i * 3 + 1) % locks.len();
        tasks.push(fifo_waiter(&locks[m], &name, i, &order, opts));
        until_queued(&node, &name, i + 1).await;
    }
    guard.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_only_the_head_not_a_waiter_per_manager() {
    const MANAGERS: usize = 6;
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, MANAGERS + 1).await;
    let name = unique_key("fair-herd");
    // Long entry leases (refreshes every 20 s) and a slow backoff: any attempt within the
    // test is a wake-up.
    let opts = fair(Duration::from_secs(30))
        .with_queue_lease(Duration::from_secs(60))
        .with_backoff(
            distlock::Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        );
    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, m) in locks[1..].iter().enumerate() {
        let (m, key, served) = (m.clone(), name.clone(), Arc::clone(&served));
        tasks.push(tokio::spawn(async move {
            let guard = m.lock_with(&key, opts).await.expect("served");
            served.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(400)).await;
            guard.release().await.expect("release");
        }));
        until_queued(&node, &name, i + 1).await;
    }
    // Every waiter has subscribed and made the attempt after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = support::evalsha_calls(&mut conn).await;
    guard.release().await.unwrap();
    support::eventually(Duration::from_secs(2), "the head is served", || {
        let served = Arc::clone(&served);
        async move { !served.lock().unwrap().is_empty() }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let calls = support::evalsha_calls(&mut conn).await - before;
    // The release and the head's acquire; a waiter per manager would add five attempts.
    assert_eq!(calls, 2, "scripts run after the release");
    assert_eq!(*served.lock().unwrap(), vec![0]);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(*served.lock().unwrap(), (0..MANAGERS).collect::<Vec<_>>());
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_barges_past_a_queue() {
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("fair-barge");
    let opts = fair(Duration::from_millis(300));

    // The key is free, but somebody queues for it.
    stale_entry(&mut conn, &name, "someone", Duration::from_secs(5)).await;
    match locks.try_lock_with(&name, opts).await {
        Err(Error::Contended { retry_after, .. }) => {
            let left = retry_after.expect("the head's entry lease");
            assert!(
                left <= Duration::from_secs(5) && left > Duration::from_secs(3),
                "{left:?}"
            );
        }
        other => panic!("barged past the queue: {other:?}"),
    }
    assert_eq!(
        queued(&mut conn, &name).await,
        1,
        "try_lock leaves no entry"
    );
    match locks.lock_with(&name, opts).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("barged past the queue: {other:?}"),
    }
    // The timed-out waiter left; the one ahead of it is still there.
    support::eventually(Duration::from_secs(2), "the timed-out waiter left", || {
        let (name, mut conn) = (name.clone(), conn.clone());
        async move { queued(&mut conn, &name).await == 1 }
    })
    .await;

    // Once the queue is gone the lock is free for anyone.
    let _: () = redis::cmd("DEL")
        .arg(queue_key(&name))
        .arg(format!("{}x", queue_key(&name)))
        .query_async(&mut conn)
        .await
        .unwrap();
    locks
        .try_lock_with(&name, opts)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_waiter_at_the_head_holds_up_the_queue_at_most_its_entry_lease() {
    const LEASE: Duration = Duration::from_millis(600);
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 2).await;
    let name = unique_key("fair-crash-head");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(LEASE);

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    // A waiter queues first and crashes: its entry is never refreshed.
    stale_entry(&mut conn, &name, "crashed", LEASE).await;
    let crashed_at = Instant::now();
    let order = Arc::new(Mutex::new(Vec::new()));
    let next = fifo_waiter(&locks[1], &name, 1, &order, opts);
    until_queued(&node, &name, 2).await;
    guard.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .unwrap()
        .unwrap();
    let waited = crashed_at.elapsed();
    // Not before the crashed entry expired, and at most one refresh interval (a third of
    // the lease) after it, with slack for a loaded machine.
    assert!(waited >= LEASE - Duration::from_millis(50), "{waited:?}");
    assert!(
        waited <= LEASE + LEASE / 3 + Duration::from_millis(250),
        "{waited:?}"
    );
    eprintln!("a crashed head held up the queue for {waited:?} (entry lease {LEASE:?})");
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_waiter_in_the_middle_holds_up_nobody() {
    const LEASE: Duration = Duration::from_millis(300);
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 3).await;
    let name = unique_key("fair-crash-middle");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(LEASE);
    let order = Arc::new(Mutex::new(Vec::new()));

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let first = fifo_waiter(&locks[1], &name, 0, &order, opts);
    until_queued(&node, &name, 1).await;
    stale_entry(&mut conn, &name, "crashed", LEASE).await;
    let last = fifo_waiter(&locks[2], &name, 2, &order, opts);
    until_queued(&node, &name, 3).await;
    // By the time the first waiter is done, the crashed entry has expired.
    tokio::time::sleep(LEASE).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    first.await.unwrap();
    last.await.unwrap();
    let took = released.elapsed();
    assert_eq!(*order.lock().unwrap(), vec![0, 2]);
    // Two 20 ms sections and two handoffs; an entry lease would show.
    assert!(took < Duration::from_millis(250), "{took:?}");
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_timed_out_waiter_leaves_no_entry() {
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 2).await;
    let name = unique_key("fair-leave");
    // An entry lease far longer than the test: only leaving removes an entry.
    let opts = fair(Duration::from_secs(30)).with_queue_lease(Duration::from_secs(60));

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let cancelled = fifo_waiter(&locks[1], &name, 0, &order, opts);
    until_queued(&node, &name, 1).await;
    cancelled.abort();
    until_queued(&node, &name, 0).await;

    let short = opts.with_wait(Duration::from_millis(200));
    match locks[1].lock_with(&name, short).await {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    until_queued(&node, &name, 0).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{}x", queue_key(&name)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the entry expiries are gone with the entries");

    guard.release().await.unwrap();

    // A waiter at the head that leaves while the key is free hands the turn on at once:
    // the next waiter does not wait for its refresh (20 s here).
    stale_entry(&mut conn, &name, "ghost", Duration::from_secs(60)).await;
    let next = fifo_waiter(&locks[1], &name, 1, &order, opts);
    until_queued(&node, &name, 2).await;
    // Give the waiter time to subscribe (its second attempt follows the subscription).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = Instant::now();
    let removed: i64 = redis::Script::new(distlock::protocol::LEAVE_QUEUE)
        .key(lease_key(&name))
        .key(queue_key(&name))
        .key(format!("{}x", queue_key(&name)))
        .arg("ghost")
        .arg(format!("{}:released", lease_key(&name)))
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    tokio::time::timeout(Duration::from_secs(2), next)
        .await
        .expect("woken by the leave")
        .unwrap();
    assert!(
        left.elapsed() < Duration::from_millis(500),
        "{:?}",
        left.elapsed()
    );
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_mode_keeps_mutual_exclusion_across_managers() {
    const MANAGERS: usize = 4;
    const TASKS: usize = 4;
    const CYCLES: usize = 25;
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, MANAGERS).await;
    let name = unique_key("fair-mutex");
    let counter = format!("{name}:counter");
    let mut tasks = Vec::new();
    for m in &locks {
        for _ in 0..TASKS {
            tasks.push(support::racy_increments(
                m.clone(),
                name.clone(),
                counter.clone(),
                node.conn().await,
                CYCLES,
                fair(Duration::from_secs(60)),
            ));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: u64 = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(total, (MANAGERS * TASKS * CYCLES) as u64);
    let _: () = redis::cmd("DEL")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// One waiter of a generated schedule: which manager it waits in, and after how many
/// services (if ever) it is cancelled.
#[derive(Debug, Clone)]
struct Arrival {
    manager: usize,
    cancel_after: Option<usize>,
}

fn schedule() -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (0..3usize, prop::option::weighted(0.3, 0..4usize)).prop_map(|(manager, cancel_after)| {
            Arrival {
                manager,
                cancel_after,
            }
        }),
        2..7,
    )
}

/// Arrivals in a known order over three managers, some cancelled before or while the
/// queue is served: the waiters served are served in arrival order, every waiter never
/// cancelled is served, and nothing is left behind.
async fn served_in_arrival_order(node: &RedisNode, arrivals: Vec<Arrival>) {
    let baseline = Baseline::take(node).await;
    let locks = managers(node, 3).await;
    let name = unique_key("fair-prop");
    let opts = fair(Duration::from_secs(30));
    let order = Arc::new(Mutex::new(Vec::new()));
    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let mut tasks = Vec::new();
    for (i, a) in arrivals.iter().enumerate() {
        tasks.push(Some(fifo_waiter(&locks[a.manager], &name, i, &order, opts)));
        until_queued(node, &name, i + 1).await;
    }
    for (i, a) in arrivals.iter().enumerate() {
        if a.cancel_after == Some(0) {
            tasks[i].take().unwrap().abort();
        }
    }
    guard.release().await.unwrap();
    for served in 1..=arrivals.len() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while order.lock().unwrap().len() < served
            && tasks.iter().flatten().any(|t| !t.is_finished())
        {
            assert!(
                Instant::now() < deadline,
                "the queue stalled: {:?}",
                order.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for (i, a) in arrivals.iter().enumerate() {
            if a.cancel_after == Some(served)
                && let Some(task) = tasks[i].take()
            {
                task.abort();
            }
        }
    }
    for task in tasks.into_iter().flatten() {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
    let order = order.lock().unwrap().clone();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "served out of order: {order:?}"
    );
    for (i, a) in arrivals.iter().enumerate() {
        if a.cancel_after.is_none() {
            assert!(order.contains(&i), "waiter {i} never served: {order:?}");
        }
    }
    drop(locks);
    baseline.assert_settled(node, Duration::from_secs(5)).await;
}

#[test]
fn generated_schedules_are_served_in_arrival_order() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let node = rt.block_on(RedisNode::start());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 12,
        ..ProptestConfig::default()
    });
    runner
        .run(&schedule(), |arrivals| {
            rt.block_on(served_in_arrival_order(&node, arrivals));
            Ok(())
        })
        .unwrap();
    rt.block_on(async move { drop(node) });
}

/// Runs [`distlock::protocol::RELEASE_FAIR`] with the handoff keys for `token`, as a holder
/// speaking the raw protocol would, and `then` right after it in the same pipeline (nothing
/// the handoff's announcement sets off runs in between).
async fn release_handoff(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    token: &str,
    then: &[redis::Cmd],
) -> i64 {
    let lease = lease_key(name);
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(distlock::protocol::RELEASE_FAIR)
        .arg(5)
        .arg(&lease)
        .arg(queue_key(name))
        .arg(format!("{}x", queue_key(name)))
        .arg(format!("{lease}:fence"))
        .arg(format!("{}h", queue_key(name)))
        .arg(token)
        .arg(format!("{lease}:released"));
    for cmd in then {
        pipe.add_command(cmd.clone()).ignore();
    }
    let (code,): (i64,) = pipe.query_async(conn).await.expect("RELEASE_FAIR");
    code
}

/// `CLIENT PAUSE <pause> WRITE`: the server runs no write (nor script) until it ends.
fn pause_writes(pause: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("PAUSE").arg(pause.as_millis() as u64).arg("WRITE");
    cmd
}

/// A holder of `name` speaking the raw protocol, a waiter of `lock` queued behind it, then
/// the holder's release hands the lease over, followed by `then`: the waiter's guard and
/// when it came back.
async fn served_by_handoff(
    node: &RedisNode,
    lock: &LockManager,
    name: &str,
    opts: LockOptions,
    then: &[redis::Cmd],
) -> (distlock::LockGuard, Instant) {
    const HOLDER: &str = "00000000000000000000000000000001";
    let mut conn = node.conn().await;
    support::set_lease(&mut conn, name, HOLDER, 10_000).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let (lock, name) = (lock.clone(), name.to_owned());
        tokio::spawn(async move {
            let guard = lock.lock_with(&name, opts).await.expect("served");
            tx.send((guard, Instant::now())).ok();
        })
    };
    until_queued(node, name, 1).await;
    // Let the waiter subscribe and queue again: it sleeps on the announcement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(release_handoff(&mut conn, name, HOLDER, then).await, 1);
    let served = tokio::time::timeout(Duration::from_secs(1), rx)
        .await
        .expect("served by the announcement")
        .unwrap();
    waiter.await.unwrap();
    served
}

async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_lease_to_the_next_waiter_before_it_returns() {
    const ENTRY: Duration = Duration::from_millis(800);
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 2).await;
    let name = unique_key("fair-handoff");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(ENTRY);

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let (lock, name) = (locks[1].clone(), name.clone());
        tokio::spawn(async move {
            let guard = lock.lock_with(&name, opts).await.expect("served");
            tx.send(guard).ok();
        })
    };
    until_queued(&node, &name, 1).await;
    // Let the waiter subscribe and queue again: it sleeps on the announcement.
    tokio::time::sleep(Duration::from_millis(300)).await;
    guard.release().await.unwrap();
    // The release wrote the waiter's lease itself: the key is never free in between.
    let handed = get(&mut conn, &lease_key(&name))
        .await
        .expect("the release handed the lease over");
    let served = tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .expect("served within the announcement")
        .unwrap();
    waiter.await.unwrap();
    assert!(served.is_held());
    // The waiter holds the handed token (no acquire of its own replaced it), and the
    // background extension lifts the entry lease's PX to the full TTL.
    assert_eq!(
        get(&mut conn, &lease_key(&name)).await.as_deref(),
        Some(&*handed)
    );
    support::eventually(Duration::from_secs(3), "extended to the TTL", || {
        let (mut conn, key, remaining) = (conn.clone(), lease_key(&name), served.remaining());
        async move {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            pttl > 5_000 && remaining > Duration::from_secs(5)
        }
    })
    .await;
    served
        .release()
        .await
        .expect("the handed lease is released by its holder");
    assert_eq!(get(&mut conn, &lease_key(&name)).await, None);
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_lease_is_believed_for_at_most_the_entry_lease_until_extended() {
    const ENTRY: Duration = Duration::from_millis(1500);
    const PAUSE: Duration = Duration::from_millis(400);
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 1).await;
    let name = unique_key("fair-handoff-belief");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(ENTRY);

    // The handoff, then no write for 0.4 s: the waiter's extension cannot land before.
    let (served, at) =
        served_by_handoff(&node, &locks[0], &name, opts, &[pause_writes(PAUSE)]).await;
    // The server set the lease for the entry lease: the belief is no longer.
    assert!(
        served.valid_until() <= at + ENTRY,
        "believed {:?} past the handoff",
        served.valid_until() - at
    );
    // And the server's lease ends no earlier than believed (reads run during the pause).
    let asked = Instant::now();
    let pttl: u64 = redis::cmd("PTTL")
        .arg(lease_key(&name))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        asked + Duration::from_millis(pttl + 3) >= served.valid_until(),
        "believed past the server's lease: PTTL {pttl} ms"
    );
    // Once writes resume, the extension lands and the belief grows to the TTL.
    support::eventually(Duration::from_secs(5), "extended after the pause", || {
        let remaining = served.remaining();
        async move { remaining > Duration::from_secs(5) }
    })
    .await;
    served.release().await.unwrap();
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// A handed lease that is gone by the time its extension lands (here: another owner's
/// token in its place) is reported lost for the reason the server gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handed_lease_taken_before_its_extension_lands_is_reported_taken() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 1).await;
    let name = unique_key("fair-handoff-taken");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(Duration::from_millis(1500));
    let mut overwrite = redis::cmd("SET");
    overwrite
        .arg(lease_key(&name))
        .arg("another-owner")
        .arg("PX")
        .arg(2_000);
    let then = [overwrite, pause_writes(Duration::from_millis(200))];
    let (served, _) = served_by_handoff(&node, &locks[0], &name, opts, &then).await;
    let reason = tokio::time::timeout(Duration::from_secs(3), served.lost())
        .await
        .expect("the extension found the lease gone");
    assert_eq!(reason, distlock::LostReason::Taken);
    assert!(!served.is_held());
    match served.release().await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, distlock::LostReason::Taken),
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    let mut conn = node.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(lease_key(&name))
        .query_async(&mut conn)
        .await
        .unwrap();
    drop((conn, locks));
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_handed_to_a_crashed_waiter_ends_with_its_queue_entry() {
    const LEASE: Duration = Duration::from_millis(600);
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = managers(&node, 2).await;
    let name = unique_key("fair-handoff-crash");
    let opts = fair(Duration::from_secs(10)).with_queue_lease(LEASE);

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    // A waiter of another manager queues first with its handoff terms (a 30 s TTL) and
    // crashes: the release hands it the lease, which nobody takes up.
    let crashed = "0123456789abcdef.crashed";
    stale_entry(&mut conn, &name, crashed, LEASE).await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{}h", queue_key(&name)))
        .arg(crashed)
        .arg(format!(
            "{} 30000 0 {} 1",
            "ab".repeat(16),
            LEASE.as_millis()
        ))
        .query_async(&mut conn)
        .await
        .unwrap();
    let crashed_at = Instant::now();
    let order = Arc::new(Mutex::new(Vec::new()));
    let next = fifo_waiter(&locks[1], &name, 1, &order, opts);
    until_queued(&node, &name, 2).await;
    // The release comes late in the crashed entry's life: the handed lease ends with it.
    tokio::time::sleep_until((crashed_at + LEASE * 5 / 6).into()).await;
    guard.release().await.unwrap();
    assert_eq!(
        get(&mut conn, &lease_key(&name)).await.as_deref(),
        Some(&*"ab".repeat(16)),
        "handed to the crashed waiter"
    );
    tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("served once the handed lease ended")
        .unwrap();
    let waited = crashed_at.elapsed();
    // The handed lease ends with the crashed waiter's entry (not an entry lease after the
    // release, nor the 30 s TTL its terms asked for); the next waiter's refresh comes at
    // most a third of a lease later.
    assert!(waited >= LEASE - Duration::from_millis(50), "{waited:?}");
    assert!(
        waited <= LEASE + LEASE / 3 + Duration::from_millis(150),
        "{waited:?}"
    );
    eprintln!(
        "a lease handed to a crashed waiter held up the queue {waited:?} after its last refresh"
    );
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// One [`distlock::protocol::ACQUIRE_FAIR`] by waiter `id` with `token`, as the `attempt`th
/// attempt of its call (one primary: with the handoff hash).
async fn acquire_fair(
    conn: &mut redis::aio::MultiplexedConnection,
    name: &str,
    id: &str,
    token: &str,
    attempt: u64,
) -> Vec<i64> {
    let lease = lease_key(name);
    redis::cmd("EVAL")
        .arg(distlock::protocol::ACQUIRE_FAIR)
        .arg(5)
        .arg(&lease)
        .arg(format!("{lease}:fence"))
        .arg(queue_key(name))
        .arg(format!("{}x", queue_key(name)))
        .arg(format!("{}h", queue_key(name)))
        .arg(token)
        .arg(10_000)
        .arg(0)
        .arg(id)
        .arg(5_000)
        .arg(1)
        .arg(attempt)
        .query_async(conn)
        .await
        .expect("ACQUIRE_FAIR")
}

/// A waiter's attempt that reaches the server late (delayed on the way, after a later
/// attempt of the same call queued and a release handed the lease to that later one) must
/// not take the handed lease from under the waiter, which may already hold it on the
/// release's announcement alone; a later attempt of a waiter that missed the announcement
/// still takes it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_attempt_does_not_take_over_a_lease_handed_to_a_later_one() {
    let node = RedisNode::start().await;
    let mut conn = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("fair-late-attempt");
    let lease = lease_key(&name);
    let (holder, late, handed, later) = (
        "00000000000000000000000000000001",
        "00000000000000000000000000000002",
        "00000000000000000000000000000003",
        "00000000000000000000000000000004",
    );
    support::set_lease(&mut conn, &name, holder, 10_000).await;
    // Attempt 3 queues; the release hands it the lease.
    let reply = acquire_fair(&mut conn, &name, "m.w", handed, 3).await;
    assert_eq!(reply[0], 0, "queued: {reply:?}");
    assert_eq!(release_handoff(&mut conn, &name, holder, &[]).await, 1);
    assert_eq!(get(&mut conn, &lease).await.as_deref(), Some(handed));
    // Attempt 2, sent before attempt 3, arrives now: it changes nothing.
    let reply = acquire_fair(&mut conn, &name, "m.w", late, 2).await;
    assert_eq!(
        reply[0], 0,
        "the late attempt did not take the lock: {reply:?}"
    );
    assert_eq!(
        get(&mut conn, &lease).await.as_deref(),
        Some(handed),
        "the handed lease still holds the token its holder believes in"
    );
    assert_eq!(
        queued(&mut conn, &name).await,
        0,
        "and it did not queue again"
    );
    // Attempt 5 (the waiter missed the announcement) takes the handed lease up.
    let reply = acquire_fair(&mut conn, &name, "m.w", later, 5).await;
    assert_eq!(reply[0], 1, "taken up: {reply:?}");
    assert_eq!(get(&mut conn, &lease).await.as_deref(), Some(later));
    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut conn)
        .await
        .unwrap();
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}
