//! Mutual exclusion: a non-atomic read-modify-write under the lock ends exact.

mod support;

use std::sync::Arc;
use std::time::Duration;

use distlock::{Backoff, LockManager, LockOptions};
use redis::AsyncCommands;
use support::{RedisNode, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_under_the_lock_are_exact() {
    const TASKS: usize = 32;
    const CYCLES: usize = 100;

    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("counter");
    let counter = Arc::new(format!("{name}:value"));
    let opts = LockOptions::new()
        .with_ttl(Duration::from_secs(10))
        .with_wait(Duration::from_secs(60))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(20)),
        );

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let locks = locks.clone();
        let name = name.clone();
        let counter = Arc::clone(&counter);
        let mut raw = node.conn().await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..CYCLES {
                let guard = locks.lock_with(&name, opts).await.unwrap();
                // Deliberately not atomic: GET, yield, SET. Only the lock keeps it exact.
                let value: Option<u64> = raw.get(counter.as_str()).await.unwrap();
                tokio::task::yield_now().await;
                let _: () = raw
                    .set(counter.as_str(), value.unwrap_or(0) + 1)
                    .await
                    .unwrap();
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut raw = node.conn().await;
    let total: u64 = raw.get(counter.as_str()).await.unwrap();
    assert_eq!(total, (TASKS * CYCLES) as u64);
}
