//! A lock over five primaries passed from its holder to the next waiter of the same
//! manager: one round trip and the key never free between
//! them, a bounded streak so waiters of other managers get their turn, and, under
//! generated schedules of callers that give up, are cancelled, release or drop, mutual
//! exclusion and nothing left behind.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};
use proptest::prelude::*;
use support::{Baseline, RedisNode, command_calls, five_nodes, lease_key, unique_key};

const NODE_TIMEOUT: Duration = Duration::from_secs(1);

async fn redlock(nodes: &[RedisNode]) -> LockManager {
    LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap()
}

/// Waits by notification: a poll every 5 s could not explain a handoff.
fn slow_polling(wait: Duration) -> LockOptions {
    let poll = Duration::from_secs(5);
    LockOptions::new()
        .with_ttl(Duration::from_secs(30))
        .with_wait(wait)
        .with_backoff(
            Backoff::new()
                .with_base(poll)
                .with_cap(poll)
                .with_jitter(false),
        )
}

async fn values(nodes: &[RedisNode], name: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for node in nodes {
        let v: Option<String> = redis::cmd("GET")
            .arg(lease_key(name))
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
        out.push(v);
    }
    out
}

/// Per node: how many times the server ran `command`, scripts' calls included.
async fn calls(nodes: &[RedisNode], command: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(command_calls(&mut node.conn().await, command).await);
    }
    out
}

/// Waits until the waiter's channel is subscribed on every node: it waits, registered.
async fn until_waiting(nodes: &[RedisNode]) {
    support::eventually(Duration::from_secs(10), "the waiter subscribes", || async {
        for node in nodes {
            if support::subscribed_channels(&mut node.conn().await)
                .await
                .is_empty()
            {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_of_the_holders_manager_takes_the_lease_over_with_the_key_never_free() {
    let nodes = five_nodes().await;
    let mut baselines = Vec::new();
    for node in &nodes {
        baselines.push(Baseline::take(node).await);
    }
    let locks = redlock(&nodes).await;
    let name = unique_key("redlock-pass");
    let holder = locks
        .lock_with(&name, slow_polling(Duration::ZERO))
        .await
        .unwrap();
    let held = values(&nodes, &name).await;
    let waiter = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move {
            let got = locks
                .lock_with(&name, slow_polling(Duration::from_secs(60)))
                .await;
            (got, Instant::now())
        })
    };
    until_waiting(&nodes).await;
    // Subscribed, the waiter attempts once more at once, then sleeps for its 5 s poll.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (dels, publishes) = (calls(&nodes, "del").await, calls(&nodes, "publish").await);
    let released = Instant::now();
    holder.release().await.unwrap();
    let (got, at) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter ends")
        .unwrap();
    let guard = got.expect("the waiter gets the lock");
    let took = at.duration_since(released);
    assert!(took < Duration::from_millis(2500), "handoff took {took:?}");
    // A release would have deleted the key and announced it on every node.
    assert_eq!(
        (calls(&nodes, "del").await, calls(&nodes, "publish").await),
        (dels, publishes),
        "the key was never free between the two holders"
    );
    let passed = values(&nodes, &name).await;
    assert!(
        passed
            .iter()
            .all(|v| v.is_some() && *v == passed[0] && *v != held[0]),
        "every node holds the new holder's token: held {held:?}, now {passed:?}"
    );
    assert!(guard.is_held());
    // Belief never exceeds truth: read every node's TTL first, the guard's belief after.
    let mut pttls = Vec::new();
    for node in &nodes {
        let ms: i64 = redis::cmd("PTTL")
            .arg(lease_key(&name))
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
        pttls.push(ms);
    }
    let believed = guard.remaining().as_millis() as i64;
    assert!(
        pttls.iter().all(|&ms| believed <= ms + 1),
        "the passed lease believes {believed} ms left; the nodes hold it for {pttls:?} ms"
    );
    guard.release().await.unwrap();
    assert!(values(&nodes, &name).await.iter().all(Option::is_none));
    drop(locks);
    for (node, baseline) in nodes.iter().zip(&baselines) {
        baseline.assert_settled(node, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_within_one_manager_still_lets_a_waiter_of_another_manager_in() {
    let nodes = five_nodes().await;
    let busy = redlock(&nodes).await;
    let other = redlock(&nodes).await;
    let name = unique_key("redlock-streak");
    let opts = support::contended(Duration::from_secs(30));
    // Six tasks of one manager that always want the lock back: without a bound on
    // passing, some of them would always be waiting to be passed the lease.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acquisitions = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (busy, name) = (busy.clone(), name.clone());
        let (done, acquisitions) = (Arc::clone(&done), Arc::clone(&acquisitions));
        tasks.push(tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                let guard = busy.lock_with(&name, opts).await.expect("busy lock");
                acquisitions.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                guard.release().await.expect("busy release");
            }
        }));
    }
    // Within the busy manager most handoffs are passes: no release deletes the key.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (dels, before) = (
        calls(&nodes, "del").await,
        acquisitions.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (dels_after, taken) = (
        calls(&nodes, "del").await,
        acquisitions.load(Ordering::Relaxed) - before,
    );
    let dels_each: Vec<u64> = dels_after
        .iter()
        .zip(&dels)
        .map(|(now, then)| now - then)
        .collect();
    assert!(
        taken >= 10 && dels_each.iter().all(|&d| (d as usize) * 2 <= taken),
        "{taken} acquisitions in the busy manager, DELs per node {dels_each:?}"
    );
    // A waiter of another manager still gets in, well within its budget.
    let got = other
        .lock_with(&name, slow_polling(Duration::from_secs(20)))
        .await;
    let other_guard = got.expect("the other manager's waiter gets the lock");
    done.store(true, Ordering::Release);
    other_guard.release().await.unwrap();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
    }
    assert!(values(&nodes, &name).await.iter().all(Option::is_none));
}

/// Takes the lock, starts a waiter in the same manager and waits until it waits; returns
/// the holder's guard and the waiter's task.
async fn holder_and_waiter(
    nodes: &[RedisNode],
    locks: &LockManager,
    name: &str,
    wait: Duration,
) -> (
    distlock::LockGuard,
    tokio::task::JoinHandle<distlock::Result<distlock::LockGuard>>,
) {
    let holder = locks
        .lock_with(name, slow_polling(Duration::ZERO))
        .await
        .unwrap();
    let waiter = {
        let (locks, name) = (locks.clone(), name.to_owned());
        tokio::spawn(async move { locks.lock_with(&name, slow_polling(wait)).await })
    };
    until_waiting(nodes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    (holder, waiter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_of_five_stopped_the_lease_is_still_passed() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("redlock-pass-two-down");
    let (holder, waiter) = holder_and_waiter(&nodes, &locks, &name, Duration::from_secs(60)).await;
    nodes[0].stop().await;
    nodes[3].stop().await;
    // The lost subscriptions wake the waiter, which attempts again (held) before it
    // sleeps: a waiter acting on a wake-up is not passed a lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = [&nodes[1], &nodes[2], &nodes[4]];
    let mut dels = Vec::new();
    for node in live {
        dels.push(command_calls(&mut node.conn().await, "del").await);
    }
    holder.release().await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter ends")
        .unwrap()
        .expect("the waiter is passed the lease on the three nodes left");
    for (node, before) in live.iter().zip(&dels) {
        assert_eq!(
            command_calls(&mut node.conn().await, "del").await,
            *before,
            "passed, not released and taken again"
        );
    }
    assert!(guard.is_held());
    guard.release().await.unwrap();
    for node in live {
        support::wait_until_gone(
            &mut node.conn().await,
            &lease_key(&name),
            Duration::from_secs(5),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_three_frozen_nodes_cannot_answer_ends_in_one_more_node_timeout_and_leaves_nothing()
{
    let nodes = five_nodes().await;
    let mut baselines = Vec::new();
    for node in &nodes {
        baselines.push(Baseline::take(node).await);
    }
    let locks = redlock(&nodes).await;
    let name = unique_key("redlock-pass-frozen");
    let (holder, waiter) = holder_and_waiter(&nodes, &locks, &name, Duration::from_secs(3)).await;
    for node in &nodes[..3] {
        node.pause().await;
    }
    let started = Instant::now();
    let released = holder.release().await;
    let took = started.elapsed();
    let e = released.expect_err("three of five nodes cannot confirm the release");
    assert!(e.is_quorum(), "{e}");
    // The pass waits one node timeout (1 s) for the frozen nodes, and undoing it another:
    // the waiter's token and the holder's are deleted at once, not one after the other.
    assert!(
        took < Duration::from_millis(2600),
        "a pass the frozen nodes could not answer took {took:?} to release"
    );
    let got = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter ends by its budget")
        .unwrap();
    assert!(got.is_err(), "no majority can answer the waiter either");
    for node in &nodes[..3] {
        node.resume().await;
    }
    drop(locks);
    for (node, baseline) in nodes.iter().zip(&baselines) {
        baseline.assert_settled(node, Duration::from_secs(15)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_that_finds_another_owner_passes_nothing_and_reports_the_lease_taken() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("redlock-pass-taken");
    let (holder, waiter) = holder_and_waiter(&nodes, &locks, &name, Duration::from_secs(3)).await;
    // Another owner, speaking the raw protocol, holds the key on a majority now.
    for node in &nodes[..3] {
        support::set_lease(&mut node.conn().await, &name, "another-owner", 30_000).await;
    }
    let e = holder.release().await.expect_err("the lease was taken");
    assert!(e.is_lost(), "{e}");
    assert!(
        e.to_string().contains("taken"),
        "the reason says another token is there: {e}"
    );
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter ends by its budget")
        .unwrap();
    assert!(got.is_err(), "nobody passed the waiter a lease");
    let left = values(&nodes, &name).await;
    assert!(
        left[..3]
            .iter()
            .all(|v| v.as_deref() == Some("another-owner")),
        "the other owner's lease is untouched: {left:?}"
    );
    assert!(
        left[3..].iter().all(Option::is_none),
        "the holder's lease is gone where it was: {left:?}"
    );
}

/// One caller of a generated schedule.
#[derive(Debug, Clone)]
struct Caller {
    manager: usize,
    /// Pause before calling, ms.
    after: u64,
    /// Wait budget, ms: a short one gives up while the lease may be being passed to it.
    wait: u64,
    /// Cancel the call after this many ms, if it has not returned by then.
    cancel: Option<u64>,
    /// Hold, ms.
    hold: u64,
    /// End by dropping the guard instead of releasing it.
    drop: bool,
}

fn schedule() -> impl Strategy<Value = Vec<Caller>> {
    prop::collection::vec(
        (
            0..2usize,
            0..30u64,
            prop_oneof![5..60u64, 2_000..3_000u64],
            prop::option::weighted(0.3, 0..40u64),
            0..15u64,
            any::<bool>(),
        )
            .prop_map(|(manager, after, wait, cancel, hold, drop)| Caller {
                manager,
                after,
                wait,
                cancel,
                hold,
                drop,
            }),
        3..12,
    )
}

/// Runs `callers` on one lock over two managers: never two holders at once, and once
/// every call has ended, no lease key, channel, connection or task left.
async fn no_overlap_and_nothing_left(nodes: &[RedisNode], callers: Vec<Caller>) {
    let mut baselines = Vec::new();
    for node in nodes {
        baselines.push(Baseline::take(node).await);
    }
    let managers = [redlock(nodes).await, redlock(nodes).await];
    let name = unique_key("redlock-pass-prop");
    let holders = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in callers {
        let (locks, name, holders) = (
            managers[c.manager].clone(),
            name.clone(),
            Arc::clone(&holders),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(c.after)).await;
            let opts =
                support::contended(Duration::from_millis(c.wait)).with_ttl(Duration::from_secs(2));
            let call = locks.lock_with(&name, opts);
            let got = match c.cancel {
                Some(ms) => match tokio::time::timeout(Duration::from_millis(ms), call).await {
                    Ok(got) => got,
                    Err(_) => return,
                },
                None => call.await,
            };
            let Ok(guard) = got else { return };
            assert_eq!(
                holders.fetch_add(1, Ordering::AcqRel),
                0,
                "two holders at once"
            );
            tokio::time::sleep(Duration::from_millis(c.hold)).await;
            assert!(guard.is_held(), "a lease of 2 s held for {} ms", c.hold);
            holders.fetch_sub(1, Ordering::AcqRel);
            if c.drop {
                drop(guard);
            } else {
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("every call ends")
            .expect("no caller saw two holders");
    }
    drop(managers);
    for (node, baseline) in nodes.iter().zip(&baselines) {
        baseline.assert_settled(node, Duration::from_secs(10)).await;
    }
}

#[test]
fn generated_schedules_of_passes_keep_exclusion_and_leave_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nodes = rt.block_on(five_nodes());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 10,
        ..ProptestConfig::default()
    });
    runner
        .run(&schedule(), |callers| {
            rt.block_on(no_overlap_and_nothing_left(&nodes, callers));
            Ok(())
        })
        .unwrap();
    rt.block_on(async move { drop(nodes) });
}
