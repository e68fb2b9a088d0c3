//! Mutual exclusion: a non-atomic read-modify-write under the lock ends exact.

use crate::support;

use std::time::Duration;

use distlock::LockManager;
use redis::AsyncCommands;
use support::{RedisNode, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_under_the_lock_are_exact() {
    const TASKS: usize = 32;
    const CYCLES: usize = 100;

    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("counter");
    let counter = format!("{name}:value");
    let opts = support::contended(Duration::from_secs(60));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        tasks.push(support::racy_increments(
            locks.clone(),
            name.clone(),
            counter.clone(),
            node.conn().await,
            CYCLES,
            opts,
        ));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut raw = node.conn().await;
    let total: u64 = raw.get(&counter).await.unwrap();
    assert_eq!(total, (TASKS * CYCLES) as u64);
}
