//! Locks through Redis Sentinel (feature `sentinel`): the manager finds the primary through
//! the Sentinels and follows it across a failover.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::sentinel::{SERVICE, SentinelSet};
use support::{free_port, lease_key, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_follows_the_primary_across_a_sentinel_failover() {
    let set = SentinelSet::start().await;
    let [first, second] = set.servers();
    let subscribers = set.sentinel_subscribers().await;
    let locks = LockManager::builder()
        .connect_sentinel(set.sentinel_urls(), SERVICE)
        .await
        .unwrap();
    let name = unique_key("sentinel");
    let opts = LockOptions::new().with_ttl(Duration::from_secs(30));
    let guard = locks.lock_with(&name, opts).await.unwrap();
    let mut on_first = set.server_conn(first).await;
    let token: Option<Vec<u8>> = on_first.get(lease_key(&name)).await.unwrap();
    assert!(
        token.is_some(),
        "the lease is on the primary the Sentinels named"
    );

    assert_eq!(set.failover().await, second);
    let mut on_second = set.server_conn(second).await;
    let moved: Option<Vec<u8>> = on_second.get(lease_key(&name)).await.unwrap();
    assert_eq!(moved, token, "a manual failover keeps the lease");

    // The old primary still calls itself primary (and accepts writes it will lose) until the
    // Sentinels reconfigure it, about 10 s later. The manager does not wait for that: the
    // Sentinels' `+switch-master` announcement, published when they name the new primary,
    // drops its connection to the old one. Give the announcement a moment to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut on_first).await.unwrap();
    assert_eq!(
        role.first(),
        Some(&redis::Value::BulkString(b"master".to_vec())),
        "the scenario this test is about: the old primary still accepts writes"
    );
    guard.extend(Duration::from_secs(40)).await.unwrap();
    let pttl: i64 = on_second.pttl(lease_key(&name)).await.unwrap();
    assert!(pttl > 35_000, "extended on the new primary: PTTL {pttl}");

    let other = unique_key("sentinel-after");
    let second_guard = locks.try_lock(&other).await.unwrap();
    let exists: bool = on_second.exists(lease_key(&other)).await.unwrap();
    assert!(exists, "new leases go to the new primary");
    assert!(
        locks.try_lock(&name).await.unwrap_err().is_held_by_other(),
        "the lease still excludes"
    );

    second_guard.release().await.unwrap();
    guard.release().await.unwrap();
    for key in [&name, &other] {
        let left: bool = on_second.exists(lease_key(key)).await.unwrap();
        assert!(!left, "released on the new primary: {key}");
    }
    assert_eq!(
        set.sentinel_subscribers().await,
        subscribers + 1,
        "the manager listens to one Sentinel"
    );
    drop(locks);
    support::eventually(
        Duration::from_secs(3),
        "the watch ends with the manager",
        || async { set.sentinel_subscribers().await == subscribers },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lock_is_granted_across_a_failover() {
    let set = SentinelSet::start().await;
    let locks = LockManager::builder()
        .connect_sentinel(set.sentinel_urls(), SERVICE)
        .await
        .unwrap();
    let name = unique_key("sentinel-wait");
    let holder = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(3)))
        .await
        .unwrap();
    let waiter = {
        let locks = locks.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let opts = LockOptions::new().with_wait(Duration::from_secs(30));
            locks.lock_with(&name, opts).await
        })
    };
    set.failover().await;
    // The holder never releases: its lease runs out on the new primary.
    std::mem::forget(holder);
    let granted = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter ends within its budget")
        .unwrap();
    let guard = granted.expect("granted once the holder's lease ran out");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sentinel_answering_is_a_transient_redis_error_within_the_connect_timeout() {
    let urls = [free_port(), free_port()].map(|p| format!("redis://127.0.0.1:{p}"));
    let started = Instant::now();
    let result = LockManager::builder()
        .with_connect_timeout(Duration::from_secs(1))
        .connect_sentinel(&urls, SERVICE)
        .await;
    assert!(started.elapsed() < Duration::from_millis(1500));
    match result {
        Err(e @ Error::Redis(_)) => {
            assert!(e.is_transient(), "{e}");
            assert!(e.to_string().contains(SERVICE), "names the service: {e}");
        }
        other => panic!("expected a Redis error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sentinel_arguments_are_typed_errors_without_secrets() {
    let none: [&str; 0] = [];
    let empty = LockManager::builder().connect_sentinel(none, SERVICE).await;
    assert!(matches!(empty, Err(Error::InvalidArgument(_))), "{empty:?}");
    let unnamed = LockManager::builder()
        .connect_sentinel(["redis://127.0.0.1:1"], "")
        .await;
    assert!(
        matches!(unnamed, Err(Error::InvalidArgument(_))),
        "{unnamed:?}"
    );
    let no_host = LockManager::builder()
        .connect_sentinel(["redis://127.0.0.1:1"], "redis://app:hunter2@/0")
        .await;
    match no_host {
        Err(e @ Error::InvalidArgument(_)) => assert!(!e.to_string().contains("hunter2"), "{e}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// The number of subscribers of `channel` on the server on `port` (`PUBSUB NUMSUB`).
async fn subscribers(set: &SentinelSet, port: u16, channel: &str) -> u64 {
    let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut set.server_conn(port).await)
        .await
        .unwrap();
    counts.first().map_or(0, |(_, n)| *n)
}

/// Release notifications survive a primary killed with SIGKILL: the waiter's subscription
/// moves to the replica the Sentinels listed at connect (which receives every publish,
/// and is the primary after the failover), and the holder's release on the new primary
/// wakes the waiter at once. Left on the dead server, the subscription would keep trying
/// it, and the waiter would poll (here 5 s apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_survive_a_killed_primary() {
    let set = SentinelSet::start().await;
    let [first, second] = set.servers();
    let connect = || async {
        LockManager::builder()
            .connect_sentinel(set.sentinel_urls(), SERVICE)
            .await
            .unwrap()
    };
    let (locks, waiting) = (connect().await, connect().await);
    let name = unique_key("sentinel-notify");
    let channel = format!("{}:released", lease_key(&name));
    let holder = locks
        .lock_with(
            &name,
            LockOptions::new()
                .with_ttl(Duration::from_secs(30))
                .with_replicas(1, Duration::from_secs(2)),
        )
        .await
        .unwrap();
    let slow = LockOptions::new()
        .with_wait(Duration::from_secs(40))
        .with_backoff(
            distlock::Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        );
    let waiter = {
        let name = name.clone();
        tokio::spawn(async move {
            let guard = waiting.lock_with(&name, slow).await;
            (guard, Instant::now(), waiting)
        })
    };
    support::eventually(
        Duration::from_secs(5),
        "the waiter listens on the primary",
        || async { subscribers(&set, first, &channel).await == 1 },
    )
    .await;
    set.signal_server(first, libc::SIGKILL);
    let killed = Instant::now();
    support::eventually(
        Duration::from_secs(5),
        "the waiter's channel is subscribed on the surviving server",
        || async { subscribers(&set, second, &channel).await == 1 },
    )
    .await;
    eprintln!(
        "subscribed on the replica {:?} after the kill",
        killed.elapsed()
    );
    set.wait_promoted(second).await;
    eprintln!("promoted {:?} after the kill", killed.elapsed());
    let released = Instant::now();
    // The holder's manager may not have heard of the switch yet: its release then fails
    // on the dead link (a transient error), and the guard's drop releases it in the
    // background on the new primary.
    if let Err(e) = holder.release().await {
        assert!(e.is_transient(), "a release during a failover: {e}");
    }
    let (guard, granted, waiting) = waiter.await.unwrap();
    guard.expect("granted").release().await.unwrap();
    eprintln!(
        "granted {:?} after the release",
        granted.duration_since(released)
    );
    assert!(
        granted.duration_since(released) < Duration::from_secs(2),
        "woken by the release after {:?}",
        granted.duration_since(released)
    );
    let left: bool = set
        .server_conn(second)
        .await
        .exists(lease_key(&name))
        .await
        .unwrap();
    assert!(!left, "released on the new primary");
    drop((waiting, locks));
    support::eventually(
        Duration::from_secs(3),
        "the subscription ends with the manager",
        || async { subscribers(&set, second, &channel).await == 0 },
    )
    .await;
}
