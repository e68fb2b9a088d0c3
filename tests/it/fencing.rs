//! Fencing tokens: strictly increasing per lock, across flushes and restarts, and what a
//! resource does with them.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distlock::{Backoff, LockManager, LockOptions};
use redis::AsyncCommands;
use support::{RedisNode, unique_key};

fn fence_key(name: &str) -> String {
    format!("{}{{{name}}}:fence", distlock::DEFAULT_PREFIX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_ten_thousand_acquisitions_by_many_tasks() {
    const TASKS: usize = 16;
    const EACH: usize = 625;
    let node = RedisNode::start().await;
    let locks = support::fenced_manager(&node.url()).await;
    let name = unique_key("fence-many");
    // Tokens in the order the leases were held: pushed while holding the lock.
    let order = Arc::new(Mutex::new(Vec::with_capacity(TASKS * EACH)));
    let opts = LockOptions::new()
        .with_fencing(true)
        .with_ttl(Duration::from_secs(10))
        .with_wait(Duration::from_secs(120))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_micros(200))
                .with_cap(Duration::from_millis(5)),
        );

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (locks, name, order) = (locks.clone(), name.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let guard = locks.lock_with(&name, opts).await.unwrap();
                let token = guard.fencing_token().expect("a token");
                order.lock().unwrap().push(token);
                guard.release().await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let order = order.lock().unwrap();
    assert_eq!(order.len(), TASKS * EACH);
    for pair in order.windows(2) {
        assert!(
            pair[0] < pair[1],
            "token {} followed by {}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keep_increasing_after_flushall_and_after_a_restart_without_data() {
    let node = RedisNode::start().await;
    let locks = support::fenced_manager(&node.url()).await;
    let mut raw = node.conn().await;
    let name = unique_key("fence-flush");

    let take = |locks: &LockManager| {
        let (locks, name) = (locks.clone(), name.clone());
        async move {
            let guard = locks.try_lock(&name).await.unwrap();
            let token = guard.fencing_token().unwrap();
            guard.release().await.unwrap();
            token
        }
    };
    let first = take(&locks).await;
    let second = take(&locks).await;
    assert!(second > first);

    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    let after_flush = take(&locks).await;
    assert!(
        after_flush > second,
        "{after_flush} after {second}: went backwards on FLUSHALL"
    );

    node.stop().await;
    node.start_again().await;
    let locks = support::fenced_manager(&node.url()).await;
    let after_restart = take(&locks).await;
    assert!(
        after_restart > after_flush,
        "{after_restart} after {after_flush}: went backwards on restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_counter_expires_instead_of_living_forever() {
    let node = RedisNode::start().await;
    let locks = support::fenced_manager(&node.url()).await;
    let mut raw = node.conn().await;
    let name = unique_key("fence-ttl");
    locks
        .try_lock(&name)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let pttl: i64 = raw.pttl(fence_key(&name)).await.unwrap();
    // One day for a short lease: bounded, unlike a counter that never expires.
    assert!(pttl > 0 && pttl <= 86_400_000, "fence counter pttl {pttl}");
}

/// The resource side: a record that remembers the highest fencing token it accepted.
#[derive(Default)]
struct FencedRecord {
    highest: u64,
    value: Option<String>,
}

impl FencedRecord {
    fn write(&mut self, token: u64, value: &str) -> Result<(), String> {
        if token < self.highest {
            return Err(format!("stale token {token} < {}", self.highest));
        }
        self.highest = token;
        self.value = Some(value.to_owned());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_stalls_past_its_lease_has_its_late_write_rejected() {
    let node = RedisNode::start().await;
    let locks = support::fenced_manager(&node.url()).await;
    let name = unique_key("gc-pause");
    let record = Arc::new(Mutex::new(FencedRecord::default()));

    // A takes the lock with a short lease and then stalls, like a long GC pause.
    let a = locks
        .lock_with(
            &name,
            LockOptions::new()
                .with_fencing(true)
                .with_ttl(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    let a_token = a.fencing_token().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Meanwhile the lease expired, B took the lock and wrote.
    let b = locks.try_lock(&name).await.expect("A's lease expired");
    let b_token = b.fencing_token().unwrap();
    assert!(b_token > a_token);
    record
        .lock()
        .unwrap()
        .write(b_token, "written by B")
        .unwrap();

    // A wakes up, still believing it holds the lock, and writes: the record refuses.
    let late = record.lock().unwrap().write(a_token, "written by A");
    assert!(late.is_err(), "the stale write was accepted");
    assert_eq!(
        record.lock().unwrap().value.as_deref(),
        Some("written by B")
    );
    assert!(!a.is_held(), "A's guard knows its lease is gone");
    b.release().await.unwrap();
}
