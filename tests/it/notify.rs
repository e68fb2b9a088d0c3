//! Release notifications: waiters wake on a release, in arrival order, and never depend
//! on a message arriving.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockOptions};
use support::{RedisNode, unique_key};

/// A wait that polling cannot explain: a fixed 5 s between attempts.
fn slow_polling(wait: Duration) -> LockOptions {
    LockOptions::new().with_wait(wait).with_backoff(
        Backoff::new()
            .with_base(Duration::from_secs(5))
            .with_cap(Duration::from_secs(5))
            .with_jitter(false),
    )
}

async fn subscribed_channels(node: &RedisNode) -> Vec<String> {
    support::subscribed_channels(&mut node.conn().await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_the_release_not_by_polling() {
    let node = RedisNode::start().await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let waiters = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("wake");

    let guard = holder.lock(&name).await.unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            let guard = waiters
                .lock_with(&name, slow_polling(Duration::from_secs(20)))
                .await;
            (guard, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    let (got, at) = waiter.await.unwrap();
    got.unwrap().release().await.unwrap();
    let handoff = at.duration_since(released);
    // Polling would take 5 s; the notification takes a round trip or two.
    assert!(
        handoff < Duration::from_millis(500),
        "handoff took {handoff:?}"
    );
    eprintln!("release to next holder across managers: {handoff:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_notifications_off_waiters_poll() {
    let node = RedisNode::start().await;
    let holder = LockManager::builder()
        .with_notify(false)
        .connect(&node.url())
        .await
        .unwrap();
    let waiters = LockManager::builder()
        .with_notify(false)
        .connect(&node.url())
        .await
        .unwrap();
    let name = unique_key("poll");
    let guard = holder.lock(&name).await.unwrap();
    let started = Instant::now();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            waiters
                .lock_with(&name, slow_polling(Duration::from_secs(20)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    guard.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
    // Nothing announces the release: the next attempt comes after the 5 s backoff step.
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(subscribed_channels(&node).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_picked_up_without_any_release() {
    let node = RedisNode::start().await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let waiters = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("expiry");

    let guard = holder
        .lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(400)),
        )
        .await
        .unwrap();
    // The holder vanishes without releasing: no message will ever come.
    std::mem::forget(guard);
    let started = Instant::now();
    let got = waiters
        .lock_with(&name, slow_polling(Duration::from_secs(20)))
        .await
        .unwrap();
    let waited = started.elapsed();
    got.release().await.unwrap();
    // The failed attempt reported the remaining TTL, and the wait ended with it.
    assert!(waited < Duration::from_millis(900), "waited {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_of_one_manager_get_the_lock_in_arrival_order() {
    const WAITERS: usize = 6;
    let node = RedisNode::start().await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let waiters = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("fifo");
    let order = Arc::new(Mutex::new(Vec::new()));

    let guard = holder.lock(&name).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let opts = slow_polling(Duration::from_secs(30));
        tasks.push(support::fifo_waiter(&waiters, &name, i, &order, opts));
        // Arrivals well apart, so the arrival order is unambiguous.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    guard.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_is_re_established_and_loses_no_waiter() {
    let node = RedisNode::start().await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let waiters = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("resubscribe");

    let guard = holder.lock(&name).await.unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            waiters
                .lock_with(&name, slow_polling(Duration::from_secs(30)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subscribed_channels(&node).await.len(), 1);

    // Cut the subscription connection behind the manager's back.
    let mut raw = node.conn().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    // The waiter is woken, retries, finds the lock still held and subscribes again.
    let deadline = Instant::now() + Duration::from_secs(3);
    while subscribed_channels(&node).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the waiter did not subscribe again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = Instant::now();
    guard.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
    assert!(
        released.elapsed() < Duration::from_millis(500),
        "the release was missed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_ends_when_nobody_waits() {
    let node = RedisNode::start().await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let waiters = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("unsubscribe");

    let guard = holder.lock(&name).await.unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            waiters
                .lock_with(&name, slow_polling(Duration::from_secs(30)))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        subscribed_channels(&node).await.len(),
        1,
        "a waiter subscribes"
    );
    guard.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while !subscribed_channels(&node).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still subscribed with nobody waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_manager_whose_subscription_task_died_with_its_runtime_subscribes_again_on_the_next() {
    let make = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    };
    // The server lives on a runtime of its own for the whole test.
    let base = make();
    let node = base.block_on(RedisNode::start());
    let first = make();
    let (holder, waiters, name) = first.block_on(async {
        let holder = LockManager::connect(&node.url()).await.unwrap();
        let waiters = LockManager::connect(&node.url()).await.unwrap();
        (holder, waiters, unique_key("runtime-gone"))
    });
    // A waiter on the first runtime starts the subscription task there, then that runtime
    // shuts down with the task (and the waiter) still running.
    first.block_on(async {
        let guard = holder.lock(&name).await.unwrap();
        let waiting = {
            let (waiters, name) = (waiters.clone(), name.clone());
            tokio::spawn(async move {
                let _ = waiters
                    .lock_with(&name, slow_polling(Duration::from_secs(20)))
                    .await;
            })
        };
        support::eventually(Duration::from_secs(5), "the waiter subscribed", || {
            let node = &node;
            async move { !subscribed_channels(node).await.is_empty() }
        })
        .await;
        drop(waiting);
        guard.release().await.unwrap();
    });
    drop(first);
    // On a second runtime, a waiter of the same manager is woken by a release, not by its
    // 5 s polling: a new subscription task runs.
    let second = make();
    second.block_on(async {
        // Both managers' connections died with the first runtime: let them reconnect.
        for locks in [&holder, &waiters] {
            support::eventually(Duration::from_secs(10), "the manager reconnected", || {
                let locks = locks.clone();
                async move {
                    match locks.try_lock(unique_key("probe")).await {
                        Ok(guard) => guard.release().await.is_ok(),
                        Err(_) => false,
                    }
                }
            })
            .await;
        }
        let other = unique_key("runtime-next");
        let guard = holder.lock(&other).await.unwrap();
        let waiter = {
            let (waiters, other) = (waiters.clone(), other.clone());
            tokio::spawn(async move {
                let got = waiters
                    .lock_with(&other, slow_polling(Duration::from_secs(20)))
                    .await;
                (got, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let released = Instant::now();
        guard.release().await.unwrap();
        let (got, at) = waiter.await.unwrap();
        got.unwrap().release().await.unwrap();
        let handoff = at.duration_since(released);
        assert!(
            handoff < Duration::from_millis(1500),
            "woken by polling, not by a notification: {handoff:?}"
        );
        drop((holder, waiters));
    });
    drop(second);
    base.block_on(async move { drop(node) });
}
