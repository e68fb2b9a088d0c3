//! Acquire, wait, extend and release against a real Redis.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::{RedisNode, lease_key, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_extend_release_round_trip() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("round-trip");

    let opts = LockOptions::new().with_ttl(Duration::from_secs(2));
    let before = Instant::now();
    let guard = locks.lock_with(&name, opts).await.unwrap();
    let after = Instant::now();
    assert!(guard.is_held());
    assert_eq!(guard.key(), name.as_bytes());
    // Validity: ttl - drift (2000 ms - 22 ms), counted from when the SET was sent.
    let validity = Duration::from_millis(2000 - 22);
    assert!(guard.valid_until() >= before + validity);
    assert!(guard.valid_until() <= after + validity);
    assert!(guard.remaining() > Duration::from_millis(1500));

    let stored: Option<String> = raw.get(lease_key(&name)).await.unwrap();
    let stored = stored.expect("the lease key exists while held");
    assert_eq!(stored.len(), 32, "the token is 32 hex digits");
    let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
    assert!((1..=2000).contains(&pttl), "pttl {pttl}");

    guard.extend(Duration::from_secs(20)).await.unwrap();
    let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
    assert!(pttl > 15_000, "extend set the new TTL, pttl {pttl}");
    assert!(guard.remaining() > Duration::from_secs(15));

    guard.release().await.unwrap();
    let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
    assert!(!exists, "release deleted the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_lock_on_a_held_key_is_contended() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("contended");

    let held = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(5)))
        .await
        .unwrap();
    match locks.try_lock(&name).await {
        Err(Error::Contended { key, retry_after }) => {
            assert_eq!(key, name);
            let left = retry_after.expect("the server reports the holder's remaining TTL");
            assert!(left <= Duration::from_secs(5) && left > Duration::from_secs(3));
        }
        other => panic!("expected Contended, got {other:?}"),
    }
    held.release().await.unwrap();
    let again = locks.try_lock(&name).await.expect("free after release");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_waits_and_gets_the_key_once_it_is_released() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("waits");

    let held = locks.lock(&name).await.unwrap();
    let waiter = {
        let locks = locks.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let opts = LockOptions::new()
                .with_wait(Duration::from_secs(5))
                .with_backoff(Backoff::new().with_cap(Duration::from_millis(20)));
            let started = Instant::now();
            let guard = locks.lock_with(&name, opts).await;
            (guard, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter must wait while the key is held"
    );
    held.release().await.unwrap();

    let (guard, waited) = waiter.await.unwrap();
    let guard = guard.expect("the waiter gets the lock after the release");
    assert!(waited >= Duration::from_millis(300));
    assert!(
        waited < Duration::from_secs(2),
        "picked up soon after release: {waited:?}"
    );
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_budget_is_honoured() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("budget");
    let _held = locks.lock(&name).await.unwrap();

    let budget = Duration::from_millis(400);
    let step = Duration::from_millis(50);
    let opts = LockOptions::new().with_wait(budget).with_backoff(
        Backoff::new()
            .with_base(Duration::from_millis(5))
            .with_cap(step),
    );
    let started = Instant::now();
    let result = locks.lock_with(&name, opts).await;
    let elapsed = started.elapsed();
    match result {
        Err(Error::Timeout {
            waited, attempts, ..
        }) => {
            assert!(waited >= budget, "gave up early: {waited:?}");
            assert!(waited <= elapsed);
            // No later than the budget plus one backoff step (and a little scheduling slack).
            assert!(
                elapsed <= budget + step + Duration::from_millis(50),
                "overran the budget: {elapsed:?}"
            );
            assert!(attempts >= 3, "retried while waiting: {attempts} attempts");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_attempt_limit_ends_the_wait() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("attempts");
    let _held = locks.lock(&name).await.unwrap();

    let opts = LockOptions::new()
        .with_wait(Duration::from_secs(10))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_millis(1))
                .with_cap(Duration::from_millis(2))
                .with_max_attempts(4),
        );
    match locks.lock_with(&name, opts).await {
        Err(Error::Timeout {
            attempts, waited, ..
        }) => {
            assert_eq!(attempts, 4);
            assert!(waited < Duration::from_secs(1));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_expiry_does_not_delete_the_next_holders_lease() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("stale-release");

    let short = LockOptions::new().with_ttl(Duration::from_millis(100));
    let stale = locks.lock_with(&name, short).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stale.is_held(),
        "past its validity the guard no longer claims the lock"
    );

    let next = locks.try_lock(&name).await.expect("expired lease is free");
    let next_token: String = raw.get(lease_key(&name)).await.unwrap();

    match stale.release().await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Taken),
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    let still: Option<String> = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(
        still,
        Some(next_token),
        "the next holder's lease is untouched"
    );
    assert!(next.is_held());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_expiry_reports_expired() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("expired-release");
    let guard = locks
        .lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    match guard.release().await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Expired),
        other => panic!("expected Lost(Expired), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_after_expiry_fails_with_lost() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("stale-extend");

    let guard = locks
        .lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    match guard.extend(Duration::from_secs(10)).await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Expired),
        other => panic!("expected Lost(Expired), got {other:?}"),
    }
    let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
    assert!(!exists, "a failed extend does not re-create the lease");
    assert!(!guard.is_held());
    // Once lost, the guard stays lost without asking the server again.
    assert!(
        guard
            .extend(Duration::from_secs(1))
            .await
            .unwrap_err()
            .is_lost()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_of_a_lease_taken_behind_its_back_fails_with_taken_and_leaves_the_new_lease() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("taken-extend");

    let guard = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    // Another owner's token replaces ours while our local deadline is still ahead.
    support::set_lease(&mut raw, &name, "another-owner", 3000).await;
    match guard.extend(Duration::from_secs(60)).await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Taken),
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    assert!(!guard.is_held());
    let value: String = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(value, "another-owner");
    let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
    assert!(
        pttl <= 3000,
        "the other owner's TTL was not touched: {pttl}"
    );
    drop(guard);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let value: String = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(
        value, "another-owner",
        "dropping a taken guard deletes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_from_one_lease_to_the_next() {
    let node = RedisNode::start().await;
    let locks = support::fenced_manager(&node.url()).await;
    let name = unique_key("fence");
    let mut last = 0;
    for _ in 0..50 {
        let guard = locks.try_lock(&name).await.unwrap();
        let token = guard
            .fencing_token()
            .expect("single-primary leases carry a token");
        assert!(token > last);
        last = token;
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_differ_per_acquisition_of_the_same_key() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("tokens");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100 {
        let guard = locks.try_lock(&name).await.unwrap();
        let token: String = raw.get(lease_key(&name)).await.unwrap();
        assert!(seen.insert(token), "a token was reused");
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_works_on_a_multiplexed_connection_and_a_custom_prefix() {
    let node = RedisNode::start().await;
    let client = redis::Client::open(node.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let locks = LockManager::builder()
        .with_prefix("app:")
        .build(conn)
        .unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("custom");

    let guard = locks.try_lock(&name).await.unwrap();
    let exists: bool = raw.exists(format!("app:{{{name}}}")).await.unwrap();
    assert!(exists, "the key carries the custom prefix");
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_unusual_names_lock_independently() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    // A name may contain braces anywhere but at its start (`}` first would leave the
    // Redis Cluster hash tag empty: rejected).
    let names: [&[u8]; 5] = [b"a{b}c", b"\0\xff\n", "ключ🔒".as_bytes(), b"a}", b"{"];
    let mut guards = Vec::new();
    for name in names {
        guards.push(locks.try_lock(name).await.unwrap());
    }
    for name in names {
        assert!(locks.try_lock(name).await.unwrap_err().is_held_by_other());
    }
    for guard in guards {
        guard.release().await.unwrap();
    }
}

/// CI runs this suite on Redis and on Valkey; `DISTLOCK_EXPECT_SERVER` (`redis` or
/// `valkey`) makes sure the servers started are the ones asked for, not a silent fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_are_the_kind_ci_asked_for() {
    let node = RedisNode::start().await;
    let mut raw = node.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut raw)
        .await
        .unwrap();
    let kind = if info.contains("server_name:valkey") {
        "valkey"
    } else {
        "redis"
    };
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or_default()
        .trim();
    eprintln!("server under test: {kind}, redis_version {version}");
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= 7, "distlock needs Redis 7 or later, got {version}");
    if let Ok(expected) = std::env::var("DISTLOCK_EXPECT_SERVER") {
        assert_eq!(kind, expected, "INFO server: {info}");
    }
}
