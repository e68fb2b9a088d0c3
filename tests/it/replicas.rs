//! Replica-acknowledged leases (`with_replicas`): a primary and a replica as processes; the
//! replica frozen with SIGSTOP for the faults (its link stays open, it acknowledges
//! nothing, as a stuck or overloaded replica does).

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::replicated::ReplicaPair;
use support::{blocked_in_wait, lease_key, unique_key};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn replicated(count: u32, timeout: Duration) -> LockOptions {
    LockOptions::new()
        .with_ttl(Duration::from_secs(30))
        .with_replicas(count, timeout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_lease_is_on_the_replica_when_the_acquire_returns() {
    let pair = ReplicaPair::start().await;
    let locks = LockManager::connect(&pair.primary_url()).await.unwrap();
    let mut replica = pair.replica().await;
    for fenced in [false, true] {
        let name = unique_key("replicas-ack");
        let opts = replicated(1, ms(100)).with_fencing(fenced);
        let guard = locks.try_lock_with(&name, opts).await.unwrap();
        assert_eq!(guard.fencing_token().is_some(), fenced);
        // Read at once, no polling: the replica acknowledged before the acquire returned.
        let on_replica: Option<Vec<u8>> = replica.get(lease_key(&name)).await.unwrap();
        assert!(
            on_replica.is_some(),
            "the lease is on the replica (fenced: {fenced})"
        );
        // An acknowledged extend: the replica has the new expiry too.
        guard.extend(Duration::from_secs(60)).await.unwrap();
        let pttl: i64 = replica.pttl(lease_key(&name)).await.unwrap();
        assert!(pttl > 50_000, "extended on the replica: PTTL {pttl}");
        guard.release().await.unwrap();
    }
    // Contended: the holder's lease left as it was, `Contended` as without replicas.
    let name = unique_key("replicas-held");
    let holder = locks.try_lock(&name).await.unwrap();
    let err = locks
        .try_lock_with(&name, replicated(1, ms(100)))
        .await
        .unwrap_err();
    assert!(err.is_held_by_other(), "{err}");
    holder.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_short_of_replicas_fails_cleanly_and_leaves_no_key() {
    let pair = ReplicaPair::start().await;
    let locks = LockManager::connect(&pair.primary_url()).await.unwrap();
    let mut primary = pair.primary().await;
    pair.pause_replica();
    let timeout = ms(200);
    for fenced in [false, true] {
        let name = unique_key("replicas-short");
        let started = Instant::now();
        let result = locks
            .try_lock_with(&name, replicated(1, timeout).with_fencing(fenced))
            .await;
        let took = started.elapsed();
        match result {
            Err(Error::NotReplicated {
                acknowledged,
                requested,
                timeout: waited,
                ..
            }) => {
                assert_eq!((acknowledged, requested), (0, 1));
                assert_eq!(waited, timeout);
            }
            other => panic!("expected NotReplicated, got {other:?}"),
        }
        // WAIT waited its timeout; the call returned after it plus a round trip or two
        // (the bound is loose: it is about "no retry loop", not about speed).
        assert!(took >= timeout, "{took:?}");
        assert!(took < timeout + Duration::from_secs(2), "{took:?}");
        let left: bool = primary.exists(lease_key(&name)).await.unwrap();
        assert!(
            !left,
            "the unacknowledged lease was deleted before the call returned"
        );
    }
    // A waiting lock does not retry it: one attempt, the same error.
    let name = unique_key("replicas-short-wait");
    let opts = replicated(1, timeout).with_wait(Duration::from_secs(20));
    let started = Instant::now();
    let err = locks.lock_with(&name, opts).await.unwrap_err();
    assert!(err.is_not_replicated(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("0 of 1 replicas"), "{err}");
    pair.resume_replica();
    // Acknowledged again once the replica is back.
    let guard = locks
        .try_lock_with(&name, replicated(1, Duration::from_secs(5)))
        .await
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_lock_does_not_queue_behind_a_pending_wait() {
    let pair = ReplicaPair::start().await;
    let locks = LockManager::connect(&pair.primary_url()).await.unwrap();
    let mut primary = pair.primary().await;
    pair.pause_replica();
    let slow = {
        let locks = locks.clone();
        let name = unique_key("replicas-slow");
        tokio::spawn(async move {
            locks
                .try_lock_with(&name, replicated(1, Duration::from_secs(20)))
                .await
        })
    };
    support::eventually(Duration::from_secs(10), "the WAIT is pending", || {
        let mut conn = primary.clone();
        async move { blocked_in_wait(&mut conn).await == 1 }
    })
    .await;
    // Same manager, plain locks: they complete while the WAIT still blocks its connection.
    for _ in 0..3 {
        let guard = locks.try_lock(unique_key("replicas-plain")).await.unwrap();
        guard.release().await.unwrap();
    }
    assert!(
        !slow.is_finished(),
        "the replica-acknowledged acquire is still waiting"
    );
    assert_eq!(blocked_in_wait(&mut primary).await, 1);
    pair.resume_replica();
    let guard = slow
        .await
        .unwrap()
        .expect("acknowledged once the replica is back");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extend_short_of_replicas_is_an_error_and_keeps_only_the_old_deadline() {
    let pair = ReplicaPair::start().await;
    let locks = LockManager::connect(&pair.primary_url()).await.unwrap();
    let mut primary = pair.primary().await;
    let name = unique_key("replicas-extend");
    let guard = locks
        .try_lock_with(
            &name,
            replicated(1, ms(100)).with_ttl(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let before = guard.valid_until();
    pair.pause_replica();
    let err = guard.extend(Duration::from_secs(60)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotReplicated {
                acknowledged: 0,
                requested: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(guard.is_held(), "the lease is still held");
    assert!(
        guard.valid_until() <= before,
        "the belief keeps the old deadline"
    );
    let pttl: i64 = primary.pttl(lease_key(&name)).await.unwrap();
    assert!(pttl > 50_000, "the primary did extend it: PTTL {pttl}");
    pair.resume_replica();
    guard.extend(Duration::from_secs(60)).await.unwrap();
    assert!(guard.valid_until() > before + Duration::from_secs(40));
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_extension_short_of_replicas_loses_the_lease_as_not_replicated() {
    let pair = ReplicaPair::start().await;
    let locks = LockManager::connect(&pair.primary_url()).await.unwrap();
    let opts = LockOptions::new()
        .with_ttl(ms(900))
        // A healthy replica acknowledges within a millisecond; 150 ms leaves room for a
        // loaded machine (CI once saw 0 acknowledgements within 50 ms), and a renewal
        // (every 300 ms) plus its WAIT still ends well before the 900 ms TTL.
        .with_replicas(1, ms(150))
        .with_auto_extend(true);
    // Healthy replica: kept alive well past its TTL.
    let kept = locks
        .try_lock_with(unique_key("replicas-renew"), opts)
        .await
        .unwrap();
    tokio::time::sleep(ms(2_000)).await;
    assert!(kept.is_held(), "acknowledged renewals keep the lease");
    kept.release().await.unwrap();

    let guard = locks
        .try_lock_with(unique_key("replicas-renew"), opts)
        .await
        .unwrap();
    pair.pause_replica();
    let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost())
        .await
        .expect("lost by its deadline");
    assert_eq!(reason, LostReason::NotReplicated);
    pair.resume_replica();
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_where_no_single_primary_waits_are_typed_errors() {
    let node = support::RedisNode::start().await;
    let url = node.url();
    let ttl = Duration::from_secs(1);
    let locks = LockManager::connect(&url).await.unwrap();
    for bad in [
        LockOptions::new().with_replicas(0, ms(100)),
        LockOptions::new().with_replicas(1, Duration::ZERO),
        LockOptions::new().with_ttl(ttl).with_replicas(1, ttl),
        LockOptions::new().with_replicas(1, ms(100)).with_fair(true),
    ] {
        match locks.try_lock_with(unique_key("replicas-bad"), bad).await {
            Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "replicas"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }
    let bad_builder = LockManager::builder()
        .with_replicas(0, ms(100))
        .connect(&url)
        .await;
    assert!(
        matches!(bad_builder, Err(Error::InvalidArgument(_))),
        "{bad_builder:?}"
    );
    let redlock = LockManager::builder()
        .with_replicas(1, ms(100))
        .connect_redlock([url.as_str()])
        .await;
    assert!(
        matches!(redlock, Err(Error::InvalidArgument(_))),
        "{redlock:?}"
    );
    let redlock = LockManager::builder()
        .connect_redlock([url.as_str()])
        .await
        .unwrap();
    let refused = redlock
        .try_lock_with(unique_key("replicas-redlock"), replicated(1, ms(100)))
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{refused:?}"
    );
    let permits = locks.semaphore(unique_key("replicas-sem"), 2).unwrap();
    let refused = permits.try_acquire_with(replicated(1, ms(100))).await;
    assert!(
        matches!(refused, Err(Error::InvalidArgument(_))),
        "{refused:?}"
    );
    // A manager that waits for replicas, overridden per call: no WAIT at all.
    let waiting = LockManager::builder()
        .with_replicas(1, ms(100))
        .connect(&url)
        .await
        .unwrap();
    let err = waiting
        .try_lock(unique_key("replicas-none"))
        .await
        .unwrap_err();
    assert!(err.is_not_replicated(), "a server without replicas: {err}");
    let plain = LockOptions::new().without_replicas();
    let guard = waiting
        .try_lock_with(unique_key("replicas-none"), plain)
        .await
        .unwrap();
    guard.release().await.unwrap();
}
