//! Waiting on a lock over five primaries: release notifications from every node, one
//! failed node unable to silence a release, contended retries that touch one node, and
//! nothing left subscribed or connected afterwards.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};
use support::{Baseline, RedisNode, five_nodes, unique_key};

/// Generous next to a loopback round trip on a loaded machine.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// The holder's lease: far longer than any handoff the tests accept, so an expiry cannot
/// explain a handoff.
const HOLDER_TTL: Duration = Duration::from_secs(30);

/// Polling cannot explain a handoff faster than this (5 s between attempts, no jitter).
const POLL: Duration = Duration::from_secs(5);

/// What the tests accept for a handoff by notification: well under one poll.
const HANDOFF_LIMIT: Duration = Duration::from_millis(2500);

fn slow_polling(wait: Duration) -> LockOptions {
    LockOptions::new()
        .with_ttl(HOLDER_TTL)
        .with_wait(wait)
        .with_backoff(
            Backoff::new()
                .with_base(POLL)
                .with_cap(POLL)
                .with_jitter(false),
        )
}

async fn redlock(nodes: &[RedisNode]) -> LockManager {
    LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap()
}

async fn channels_on(node: &RedisNode) -> usize {
    support::subscribed_channels(&mut node.conn().await)
        .await
        .len()
}

/// Waits until the waiter's channel is subscribed on at least `nodes` of `all`.
async fn until_subscribed_on(all: &[RedisNode], nodes: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut on = 0;
        for node in all {
            if channels_on(node).await > 0 {
                on += 1;
            }
        }
        if on >= nodes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "subscribed on {on} nodes, wanted {nodes}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes the lock in `holder`, starts a waiter in `waiters`, waits until it listens,
/// runs `meanwhile`, releases, and returns how long the waiter took to get the lock.
async fn handoff(
    nodes: &[RedisNode],
    holder: &LockManager,
    waiters: &LockManager,
    listening_on: usize,
    meanwhile: impl std::future::Future<Output = ()>,
) -> Duration {
    let name = unique_key("redlock-wake");
    let guard = holder
        .lock_with(&name, LockOptions::new().with_ttl(HOLDER_TTL))
        .await
        .unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            let got = waiters
                .lock_with(&name, slow_polling(Duration::from_secs(60)))
                .await;
            (got, Instant::now())
        })
    };
    until_subscribed_on(nodes, listening_on).await;
    meanwhile.await;
    let released = Instant::now();
    guard.release().await.unwrap();
    let (got, at) = tokio::time::timeout(Duration::from_secs(60), waiter)
        .await
        .expect("the waiter ends within its budget")
        .unwrap();
    got.expect("the waiter gets the lock")
        .release()
        .await
        .unwrap();
    at.duration_since(released)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_five_nodes_wakes_the_waiter_and_leaves_nothing_subscribed() {
    let nodes = five_nodes().await;
    let holder = redlock(&nodes).await;
    let waiters = redlock(&nodes).await;
    // Warm both managers up, then record what each node looks like at rest.
    for locks in [&holder, &waiters] {
        locks
            .try_lock(unique_key("warm"))
            .await
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    let mut baselines = Vec::new();
    for node in &nodes {
        baselines.push(Baseline::take(node).await);
    }

    let took = handoff(&nodes, &holder, &waiters, 5, async {}).await;
    assert!(
        took < HANDOFF_LIMIT,
        "handoff took {took:?}; polling would take {POLL:?}, the holder's TTL is {HOLDER_TTL:?}"
    );
    eprintln!("release to next holder over five nodes: {took:?}");
    for (node, baseline) in nodes.iter().zip(&baselines) {
        // No key, no channel, the subscription connections closed.
        baseline.assert_settled(node, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_failed_nodes_of_five_cannot_silence_a_release() {
    let nodes = five_nodes().await;
    let holder = redlock(&nodes).await;
    let waiters = redlock(&nodes).await;
    // Whichever nodes the subscriptions ride on, stopping two leaves three: enough.
    let took = handoff(&nodes, &holder, &waiters, 5, async {
        nodes[1].stop().await;
        nodes[3].stop().await;
    })
    .await;
    assert!(
        took < HANDOFF_LIMIT,
        "handoff took {took:?} with two nodes down; polling would take {POLL:?}"
    );
    eprintln!("release to next holder with two of five nodes down: {took:?}");
}

/// The node a contended retry asks first, by the documented rule: FNV-1a (32 bit) of the
/// lease key, modulo the number of nodes.
fn first_node(name: &str, nodes: usize) -> usize {
    let hash = support::lease_key(name)
        .bytes()
        .fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    hash as usize % nodes
}

/// SETs each node ran while `waiter` polled `name` for 600 ms (about 30 attempts).
async fn sets_while_polling(nodes: &[RedisNode], waiter: &LockManager, name: &str) -> Vec<u64> {
    let mut before = Vec::new();
    for node in nodes {
        before.push(support::command_calls(&mut node.conn().await, "set").await);
    }
    let polling = LockOptions::new()
        .with_wait(Duration::from_millis(600))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(20))
                .with_cap(Duration::from_millis(20))
                .with_jitter(false),
        );
    let err = waiter.lock_with(name, polling).await.unwrap_err();
    assert!(err.is_held_by_other(), "{err:?}");
    let mut calls = Vec::new();
    for (node, before) in nodes.iter().zip(&before) {
        calls.push(support::command_calls(&mut node.conn().await, "set").await - before);
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_collision_retries_touch_only_the_keys_first_node() {
    let nodes = five_nodes().await;
    let holder = redlock(&nodes).await;
    let waiter = LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .with_notify(false)
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap();

    // Held on all five: every attempt finds it held everywhere and took nothing, so no
    // contender collided: retries ask every node, no extra round trip.
    let held = unique_key("redlock-no-collision");
    let guard = holder
        .lock_with(&held, LockOptions::new().with_ttl(HOLDER_TTL))
        .await
        .unwrap();
    let calls = sets_while_polling(&nodes, &waiter, &held).await;
    assert!(calls.iter().all(|&c| c >= 5), "SETs per node: {calls:?}");
    guard.release().await.unwrap();

    // Another owner's lease on three nodes, the key's first node among them: the first
    // attempt takes the two free nodes and still loses (a collision); every retry after
    // it asks the first node alone.
    let name = unique_key("redlock-collision");
    let first = first_node(&name, nodes.len());
    let others: Vec<usize> = (0..nodes.len()).filter(|&i| i != first).take(2).collect();
    for i in [first, others[0], others[1]] {
        let _: () = redis::cmd("SET")
            .arg(support::lease_key(&name))
            .arg("another-owner")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut nodes[i].conn().await)
            .await
            .unwrap();
    }
    let calls = sets_while_polling(&nodes, &waiter, &name).await;
    for (i, c) in calls.iter().enumerate() {
        if i == first {
            assert!(*c >= 5, "the retries went to the first node: {calls:?}");
        } else {
            assert_eq!(
                *c, 1,
                "node {i} was asked once, by the first attempt: {calls:?}"
            );
        }
    }
    // Nothing of the waiter's is left: the two free nodes are free again.
    for (i, node) in nodes.iter().enumerate() {
        let value: Option<String> = redis::cmd("GET")
            .arg(support::lease_key(&name))
            .query_async(&mut node.conn().await)
            .await
            .unwrap();
        let expected = [first, others[0], others[1]]
            .contains(&i)
            .then(|| "another-owner".to_owned());
        assert_eq!(value, expected, "node {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stays_down_does_not_wake_the_waiters_again_and_again() {
    let nodes = five_nodes().await;
    let holder = redlock(&nodes).await;
    let waiters = redlock(&nodes).await;
    let name = unique_key("redlock-down-node");
    let guard = holder
        .lock_with(&name, LockOptions::new().with_ttl(HOLDER_TTL))
        .await
        .unwrap();
    // One node down before anybody waits: its subscription can never be made.
    nodes[4].stop().await;
    let before = support::command_calls(&mut nodes[0].conn().await, "set").await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (waiters, name) = (waiters.clone(), name.clone());
        tasks.push(tokio::spawn(async move {
            let guard = waiters
                .lock_with(&name, slow_polling(Duration::from_secs(60)))
                .await?;
            guard.release().await
        }));
    }
    until_subscribed_on(&nodes[..4], 4).await;
    // Four seconds of waiting while the down node's subscription task retries (its pauses
    // grow from 50 ms to 2 s): the waiters poll every 5 s, so a waiter that attempts
    // again here was woken by a failed retry.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts = support::command_calls(&mut nodes[0].conn().await, "set").await - before;
    assert!(
        attempts <= 6,
        "{attempts} attempts by 3 waiters in 4 s: woken by the down node's retries"
    );
    let released = Instant::now();
    guard.release().await.unwrap();
    for task in tasks {
        task.await
            .unwrap()
            .expect("every waiter got the lock in turn");
    }
    assert!(released.elapsed() < Duration::from_secs(10), "handed on");
}

/// Sets `name`'s lease to `owner`'s token on `node`, as another client would.
async fn set_owner(node: &RedisNode, name: &str, owner: &str) {
    let _: () = redis::cmd("SET")
        .arg(support::lease_key(name))
        .arg(owner)
        .arg("PX")
        .arg(30_000)
        .query_async(&mut node.conn().await)
        .await
        .unwrap();
}

/// A split vote (the `split_vote` debug event the contention bench counts) is an attempt
/// after which nobody has a majority; the holders' tokens the nodes answer with tell it
/// from a race lost to one holder. One thread, so the capturing subscriber sees every
/// event.
#[tokio::test(flavor = "current_thread")]
async fn a_split_vote_is_told_from_a_race_lost_to_one_holder() {
    let capture = support::logs::Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());
    let nodes = five_nodes().await;
    let locks = LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .with_notify(false)
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap();
    let splits = || capture.find(tracing::Level::DEBUG, "split_vote=true").len();

    // One holder on three nodes: the attempt takes two and loses to a majority.
    let lost = unique_key("redlock-lost-race");
    for node in &nodes[..3] {
        set_owner(node, &lost, "holder-a").await;
    }
    let err = locks.try_lock(&lost).await.unwrap_err();
    assert!(err.is_held_by_other(), "{err:?}");
    assert_eq!(splits(), 0, "a race lost to one holder is no split vote");

    // Two holders, on two nodes and on one: the attempt takes two, nobody has three.
    let split = unique_key("redlock-split");
    for node in &nodes[..2] {
        set_owner(node, &split, "holder-a").await;
    }
    set_owner(&nodes[2], &split, "holder-b").await;
    let err = locks.try_lock(&split).await.unwrap_err();
    assert!(err.is_held_by_other(), "{err:?}");
    assert_eq!(splits(), 1, "nobody has a majority: a split vote");

    // The attempts left nothing of theirs: the two free nodes are free again.
    for name in [&lost, &split] {
        for node in &nodes[3..] {
            let value: Option<String> = redis::cmd("GET")
                .arg(support::lease_key(name))
                .query_async(&mut node.conn().await)
                .await
                .unwrap();
            assert_eq!(value, None, "{name}");
        }
    }
}
