//! Dropping guards and abandoning acquires: background release, no panic, no leftovers.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{LockManager, LockOptions};
use redis::AsyncCommands;
use support::{RedisNode, lease_key, unique_key, wait_until_gone};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_guard_releases_the_key_in_the_background() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("drop");

    let guard = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    drop(guard);
    // Far sooner than the 30 s TTL.
    wait_until_gone(&mut raw, &lease_key(&name), Duration::from_secs(2)).await;
    locks
        .try_lock(&name)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[test]
fn dropping_a_guard_on_a_thread_outside_any_runtime_releases_it() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = unique_key("drop-thread");
    let (node, guard) = rt.block_on(async {
        let node = RedisNode::start().await;
        let locks = LockManager::connect(&node.url()).await.unwrap();
        let guard = locks.lock(&name).await.unwrap();
        (node, guard)
    });
    // A plain OS thread, no runtime context: the drop hands off to the acquiring runtime.
    std::thread::spawn(move || drop(guard))
        .join()
        .expect("drop must not panic");
    rt.block_on(async {
        let mut raw = node.conn().await;
        wait_until_gone(&mut raw, &lease_key(&name), Duration::from_secs(2)).await;
    });
}

#[test]
fn dropping_a_guard_after_its_runtime_is_gone_does_not_panic_and_the_ttl_ends_it() {
    let name = unique_key("drop-dead-runtime");
    let node_rt = tokio::runtime::Runtime::new().unwrap();
    let node = node_rt.block_on(RedisNode::start());
    let url = node.url();

    let guard = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let guard = rt.block_on(async {
            let locks = LockManager::connect(&url).await.unwrap();
            locks
                .lock_with(
                    &name,
                    LockOptions::new().with_ttl(Duration::from_millis(500)),
                )
                .await
                .unwrap()
        });
        drop(rt);
        guard
    };
    // The acquiring runtime has shut down; dropping must neither panic nor block.
    let started = Instant::now();
    drop(guard);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "drop blocked"
    );

    node_rt.block_on(async {
        let mut raw = node.conn().await;
        let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
        assert!(
            exists,
            "nothing could release it, so the lease is still there"
        );
        wait_until_gone(&mut raw, &lease_key(&name), Duration::from_secs(3)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_guard_is_not_released_again_on_drop() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("no-double");
    let stale = locks
        .lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let next = locks.try_lock(&name).await.unwrap();
    // The stale guard is dropped without release: its background compare-and-delete must
    // leave the new holder alone.
    drop(stale);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_acquires_leave_no_lease_behind() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("abandon");
    let opts = LockOptions::new().with_ttl(Duration::from_secs(60));

    // Drop the acquire at many points in its round trip.
    let mut timed_out = 0;
    for i in 0..200u64 {
        // Cut off by time (the timer's 1 ms granularity may let a fast round trip finish),
        // or after a few polls of this task: with no poll to spare (`i % 16 == 0`), the
        // acquire is dropped right after sending, before any reply can have arrived.
        let cut = async {
            if i % 2 == 0 {
                for _ in 0..(i / 2) % 8 {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep(Duration::from_micros(i * 3)).await;
            }
        };
        tokio::select! {
            biased;
            got = locks.lock_with(&name, opts) => match got {
                Ok(guard) => guard.release().await.unwrap(),
                Err(e) => panic!("unexpected error {e}"),
            },
            () = cut => timed_out += 1,
        }
    }
    assert!(timed_out > 0, "some acquires were cut off mid-flight");
    // Every lease an abandoned acquire may have set is released long before its 60 s TTL.
    wait_until_gone(&mut raw, &lease_key(&name), Duration::from_secs(2)).await;
}
