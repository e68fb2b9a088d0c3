//! `lock_all`: several locks at once, all or none, no deadlock between overlapping sets.

use crate::support;

use std::time::Duration;

use distlock::{Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::{Baseline, RedisNode, lease_key, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_or_none_and_release_takes_them_all() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let other = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let names: Vec<String> = (0..4).map(|i| unique_key(&format!("multi{i}"))).collect();

    // One of the four is held elsewhere: nothing is taken, nothing is left.
    let blocker = other.lock(&names[2]).await.unwrap();
    let short = LockOptions::new().with_wait(Duration::from_millis(200));
    let err = locks.lock_all_with(&names, short).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    for (i, name) in names.iter().enumerate() {
        let held: bool = raw.exists(lease_key(name)).await.unwrap();
        assert_eq!(held, i == 2, "only the blocker's lock is held: {name}");
    }
    blocker.release().await.unwrap();

    // Listed in any order, with a duplicate: taken once each, sorted.
    let listed = [&names[3], &names[0], &names[3], &names[1], &names[2]];
    let all = locks.lock_all(listed).await.unwrap();
    assert_eq!(all.guards().len(), 4);
    assert!(all.is_held());
    assert!(all.get(&names[1]).is_some());
    for name in &names {
        assert!(other.try_lock(name).await.unwrap_err().is_held_by_other());
    }
    all.extend(Duration::from_secs(20)).await.unwrap();
    all.release().await.unwrap();
    for name in &names {
        let held: bool = raw.exists(lease_key(name)).await.unwrap();
        assert!(!held, "released: {name}");
    }
    drop((locks, other, raw));
    baseline.assert_settled(&node, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_sets_in_opposite_orders_never_deadlock_and_counters_stay_exact() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let names: Vec<String> = (0..3).map(|i| unique_key(&format!("ring{i}"))).collect();
    // Each task asks for two of the three names, in its own order: without one global
    // order, two of them would soon hold one lock each and wait for the other's.
    let sets = [
        [names[0].clone(), names[1].clone()],
        [names[1].clone(), names[0].clone()],
        [names[1].clone(), names[2].clone()],
        [names[2].clone(), names[0].clone()],
    ];
    let mut tasks = Vec::new();
    for (i, set) in sets.into_iter().enumerate() {
        let locks = LockManager::connect(&node.url()).await.unwrap();
        let mut conn = node.conn().await;
        tasks.push(tokio::spawn(async move {
            let opts = support::contended(Duration::from_secs(30));
            for _ in 0..25 {
                let guard = locks.lock_all_with(&set, opts).await.expect("lock_all");
                for name in &set {
                    let counter = format!("{name}:count");
                    let value: Option<u64> = conn.get(&counter).await.unwrap();
                    tokio::task::yield_now().await;
                    let _: () = conn.set(&counter, value.unwrap_or(0) + 1).await.unwrap();
                }
                guard.release().await.expect("release");
            }
            i
        }));
    }
    let all = async {
        for task in tasks {
            task.await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("no deadlock: every task finished");
    let mut raw = node.conn().await;
    // names[0] is in three sets, names[1] in three, names[2] in two; 25 rounds each.
    for (name, sets) in names.iter().zip([3u64, 3, 2]) {
        let count: u64 = raw.get(format!("{name}:count")).await.unwrap();
        assert_eq!(count, 25 * sets, "{name}");
    }
    drop(raw);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_any_lock_of_the_set_resolves_lost_with_its_name() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let names = [unique_key("lostA"), unique_key("lostB")];
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(600))
        .with_auto_extend(true);
    let all = locks.lock_all_with(&names, opts).await.unwrap();
    let lost = all.lost();
    let mut raw = node.conn().await;
    let _: () = raw.set(lease_key(&names[1]), "someone else").await.unwrap();
    let (name, reason) = tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost() resolves within an auto-extension period or two");
    assert_eq!(name, names[1].as_bytes());
    assert_eq!(reason, LostReason::Taken);
    assert!(!all.is_held());
    assert!(all.release().await.unwrap_err().is_lost());
    let first: bool = raw.exists(lease_key(&names[0])).await.unwrap();
    assert!(!first, "the lock still held was released");
    // The other owner's value is the test's own; nothing of distlock's may be left.
    let _: () = raw.del(lease_key(&names[1])).await.unwrap();
    drop((locks, raw));
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sets_are_invalid_arguments_and_send_nothing() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let none: [&str; 0] = [];
    assert!(matches!(
        locks.lock_all(none).await,
        Err(Error::InvalidArgument(_))
    ));
    let name = unique_key("fine");
    let bad = [name.as_str(), ""];
    assert!(matches!(
        locks.lock_all(bad).await,
        Err(Error::InvalidArgument(_))
    ));
    let mut raw = node.conn().await;
    let held: bool = raw.exists(lease_key(&name)).await.unwrap();
    assert!(!held, "nothing was taken for a set with a bad name");
}
