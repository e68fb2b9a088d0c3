//! Futures dropped at random points: no lease outlives its holder, no guard claims a lease
//! the server does not have, and an abandoned acquire cleans up after itself.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{LockManager, LockOptions};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use redis::AsyncCommands;
use support::proxy::{Fault, FaultProxy};
use support::{Baseline, RedisNode, lease_key, unique_key};

/// Iterations per operation; each drops one future at a random point.
const ITERATIONS: usize = 120;
/// Every lease here lives 60 s unless released: "gone within a few seconds" can only be
/// the work of a (background) release, never of expiry.
const LONG_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Op {
    Lock,
    LockWaiting,
    TryLock,
    Extend,
    Release,
    WithLock,
}

const OPS: [Op; 6] = [
    Op::Lock,
    Op::LockWaiting,
    Op::TryLock,
    Op::Extend,
    Op::Release,
    Op::WithLock,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn futures_dropped_at_random_points_leave_no_lease_behind_and_no_false_hold() {
    let seed = std::env::var("DISTLOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("cancellation: seed {seed} (rerun with DISTLOCK_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);

    let node = RedisNode::start().await;
    // 1 ms each way widens every round trip to a few ms, so random drop points land
    // before the request, while it is in flight, and after the reply alike.
    let proxy = FaultProxy::start(node.port()).await;
    proxy.set(Fault::Latency(Duration::from_millis(1)));
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&proxy.url()).await.unwrap();
    let prefix = unique_key("cancel");
    let long = LockOptions::new().with_ttl(LONG_TTL);
    let blocker_name = format!("{prefix}:blocker");
    let blocker = locks.try_lock_with(&blocker_name, long).await.unwrap();

    let mut dropped = 0usize;
    let mut completed = 0usize;
    let mut extends_checked = 0usize;
    for i in 0..ITERATIONS * OPS.len() {
        let op = OPS[i % OPS.len()];
        let name = format!("{prefix}:{i}");
        let cut = Duration::from_micros(rng.random_range(0..12_000));
        match op {
            Op::Lock | Op::TryLock | Op::WithLock => {
                let finished = match op {
                    Op::Lock => match tokio::time::timeout(cut, locks.lock_with(&name, long)).await
                    {
                        Ok(guard) => {
                            let guard = guard.unwrap();
                            assert_held_on_server(&mut raw, &name, guard.is_held()).await;
                            guard.release().await.unwrap();
                            true
                        }
                        Err(_) => false,
                    },
                    Op::TryLock => {
                        match tokio::time::timeout(cut, locks.try_lock_with(&name, long)).await {
                            Ok(guard) => {
                                let guard = guard.unwrap();
                                assert_held_on_server(&mut raw, &name, guard.is_held()).await;
                                drop(guard);
                                true
                            }
                            Err(_) => false,
                        }
                    }
                    _ => {
                        let work = Duration::from_micros(rng.random_range(0..3_000));
                        let run = locks.with_lock_with(&name, long, |_| tokio::time::sleep(work));
                        tokio::time::timeout(cut, run).await.is_ok()
                    }
                };
                if finished {
                    completed += 1
                } else {
                    dropped += 1
                }
            }
            Op::LockWaiting => {
                // Held by the blocker: this call is always dropped while waiting.
                let waiting = LockOptions::new()
                    .with_ttl(LONG_TTL)
                    .with_wait(Duration::from_secs(10));
                let r = tokio::time::timeout(cut, locks.lock_with(&blocker_name, waiting)).await;
                assert!(r.is_err(), "the blocker holds it: {r:?}");
                dropped += 1;
            }
            Op::Extend => {
                let guard = locks
                    .try_lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(2)))
                    .await
                    .unwrap();
                let r = tokio::time::timeout(cut, guard.extend(LONG_TTL)).await;
                if r.is_ok() {
                    completed += 1
                } else {
                    dropped += 1
                }
                // Whatever happened on the server, the guard's deadline must not be later
                // than the server's expiry: a 2 s deadline with a 60 s key is safe, a 60 s
                // deadline with a 2 s key is a false hold.
                let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
                let asked = Instant::now();
                assert!(pttl > 0, "the lease is on the server: pttl {pttl}");
                let server_expiry = asked + Duration::from_millis(pttl as u64 + 2);
                assert!(
                    guard.valid_until() <= server_expiry,
                    "iteration {i}: the guard claims {:?} more than the server grants",
                    guard.valid_until() - server_expiry
                );
                assert!(guard.is_held());
                extends_checked += 1;
                guard.release().await.unwrap();
            }
            Op::Release => {
                let guard = locks.try_lock_with(&name, long).await.unwrap();
                let r = tokio::time::timeout(cut, guard.release()).await;
                if r.is_ok() {
                    completed += 1
                } else {
                    dropped += 1
                }
            }
        }
    }
    blocker.release().await.unwrap();

    // Every lease any of those futures may have left is released in the background, far
    // sooner than its 60 s TTL.
    let started = Instant::now();
    let left = loop {
        let left = lease_keys(&mut raw, &prefix).await;
        if left.is_empty() || started.elapsed() > Duration::from_secs(10) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left.is_empty(), "leases left behind: {left:?}");
    assert!(
        dropped > ITERATIONS,
        "most operations were cut off: {dropped} dropped"
    );
    eprintln!(
        "cancellation: {} operations, {dropped} futures dropped mid-way, {completed} completed, \
         {extends_checked} deadlines checked against the server, 0 leases left \
         (all gone {:?} after the last drop, TTL {LONG_TTL:?})",
        ITERATIONS * OPS.len(),
        started.elapsed()
    );
    drop(locks);
    baseline.assert_settled(&node, Duration::from_secs(8)).await;
}

/// A guard that says it holds the lease has the key on the server.
async fn assert_held_on_server(
    raw: &mut redis::aio::MultiplexedConnection,
    name: &str,
    held: bool,
) {
    assert!(held, "a fresh guard is held");
    let exists: bool = raw.exists(lease_key(name)).await.unwrap();
    assert!(exists, "the guard's lease is on the server");
}

/// Lease keys (not fencing counters) under `prefix` still on the server.
async fn lease_keys(raw: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let pattern = format!("{}{{{prefix}:*", distlock::DEFAULT_PREFIX);
    let mut keys: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = raw.scan_match(pattern).await.unwrap();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    keys.retain(|k| !k.ends_with(":fence"));
    keys
}
