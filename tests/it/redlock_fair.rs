//! Fair mode over five primaries: the queue lives on the key's first node, so waiters of
//! every manager are served in arrival order; with that node down, locks still work
//! (unordered), and nothing is left behind.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{LockManager, LockOptions};
use support::{Baseline, RedisNode, five_nodes, lease_key, unique_key};

async fn redlock(nodes: &[RedisNode]) -> LockManager {
    LockManager::builder()
        .with_node_timeout(Duration::from_secs(1))
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap()
}

/// The node that keeps the queue, by the documented rule: FNV-1a (32 bit) of the lease
/// key, modulo the number of nodes.
fn queue_node(name: &str, nodes: usize) -> usize {
    let hash = lease_key(name).bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash as usize % nodes
}

async fn queued(node: &RedisNode, name: &str) -> usize {
    redis::cmd("ZCARD")
        .arg(format!("{}:q", lease_key(name)))
        .query_async(&mut node.conn().await)
        .await
        .expect("ZCARD")
}

fn fair(wait: Duration) -> LockOptions {
    support::contended(wait).with_fair(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_many_managers_are_served_in_arrival_order_over_five_nodes() {
    const WAITERS: usize = 8;
    let nodes = five_nodes().await;
    let mut baselines = Vec::new();
    for node in &nodes {
        baselines.push(Baseline::take(node).await);
    }
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(redlock(&nodes).await);
    }
    let name = unique_key("redlock-fair");
    let queue = &nodes[queue_node(&name, nodes.len())];
    let order = Arc::new(Mutex::new(Vec::new()));
    let opts = fair(Duration::from_secs(30));

    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        // Managers in a scrambled order, so arrival order is not manager order.
        let manager = &locks[(i * 3 + 1) % 4];
        tasks.push(support::fifo_waiter(manager, &name, i, &order, opts));
        support::eventually(Duration::from_secs(5), &format!("{} queued", i + 1), || {
            let name = name.clone();
            async move { queued(queue, &name).await == i + 1 }
        })
        .await;
    }
    guard.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
    drop(locks);
    for (node, baseline) in nodes.iter().zip(&baselines) {
        baseline.assert_settled(node, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_queues_node_down_fair_locks_still_exclude_and_leave_nothing() {
    const TASKS: usize = 6;
    const CYCLES: usize = 5;
    let nodes = five_nodes().await;
    let name = unique_key("redlock-fair-down");
    let first = queue_node(&name, nodes.len());
    let locks = [redlock(&nodes).await, redlock(&nodes).await];
    nodes[first].stop().await;

    let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (locks, name, inside) = (locks[t % 2].clone(), name.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..CYCLES {
                let guard = locks
                    .lock_with(&name, fair(Duration::from_secs(30)))
                    .await
                    .expect("served without the queue's node");
                assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                guard.release().await.expect("release on the other four");
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every task finished")
            .unwrap();
    }
    for (i, node) in nodes.iter().enumerate() {
        if i != first {
            let value: Option<String> = redis::cmd("GET")
                .arg(lease_key(&name))
                .query_async(&mut node.conn().await)
                .await
                .unwrap();
            assert_eq!(value, None, "node {i}");
        }
    }
}

/// The lease value on every node, in node order.
async fn values(nodes: &[RedisNode], name: &str) -> Vec<Option<String>> {
    let mut all = Vec::new();
    for node in nodes {
        let value: Option<String> = redis::cmd("GET")
            .arg(lease_key(name))
            .query_async(&mut node.conn().await)
            .await
            .expect("GET");
        all.push(value);
    }
    all
}

/// A waiter named by a release asks every node at once; if the queue's node says it is
/// not its turn after all (here: another owner holds the lease there, and no other node),
/// the waiter takes nothing, not even the majority the other four nodes gave it, and
/// leaves no lease on them. Its real turn still comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_waiter_whose_turn_the_queues_node_denies_takes_nothing() {
    let nodes = five_nodes().await;
    let name = unique_key("redlock-fair-named");
    let first = queue_node(&name, nodes.len());
    let locks = redlock(&nodes).await;
    let mut conn = nodes[first].conn().await;
    support::set_lease(&mut conn, &name, "other-owner", 30_000).await;

    let waiter = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move { locks.lock_with(&name, fair(Duration::from_secs(30))).await })
    };
    support::eventually(Duration::from_secs(5), "queued", || {
        let name = name.clone();
        let node = &nodes[first];
        async move { queued(node, &name).await == 1 }
    })
    .await;
    // Give the waiter time to subscribe (its second attempt follows the subscription).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{}:q", lease_key(&name)))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = ids[0].clone();
    let manager = id.split('.').next().unwrap().to_owned();
    let channel = format!("{}:released:{manager}", lease_key(&name));
    let publish = |payload: String| {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&channel).arg(payload);
        cmd
    };
    let heard: i64 = publish(id.clone()).query_async(&mut conn).await.unwrap();
    assert!(heard >= 1, "the waiter listens on {channel}");

    // Its named attempt runs; afterwards only the other owner's lease is left anywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter took the lock out of turn"
    );
    let mut expected = vec![None; nodes.len()];
    expected[first] = Some("other-owner".to_owned());
    assert_eq!(values(&nodes, &name).await, expected);
    assert_eq!(queued(&nodes[first], &name).await, 1, "still queued");

    // Its real turn: the other owner lets go and the waiter is named again.
    let _: i64 = redis::cmd("DEL")
        .arg(lease_key(&name))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = publish(id).query_async(&mut conn).await.unwrap();
    let guard = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("served on its turn")
        .unwrap()
        .expect("the lock");
    let held = values(&nodes, &name).await;
    assert!(held[0].is_some(), "{held:?}");
    assert!(
        held.iter().all(|v| *v == held[0]),
        "one token on every node: {held:?}"
    );
    guard.release().await.unwrap();
    assert_eq!(values(&nodes, &name).await, vec![None; nodes.len()]);
    assert_eq!(queued(&nodes[first], &name).await, 0);
}
