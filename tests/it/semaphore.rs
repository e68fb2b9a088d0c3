//! `Semaphore`: at most N holders, each permit a lease with the lock's guarantees.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::{Baseline, RedisNode, unique_key};

fn permits_key(name: &str) -> String {
    format!("{}sem:{{{name}}}", distlock::DEFAULT_PREFIX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_n_holders_across_managers_and_nothing_left() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("sem");
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut managers = Vec::new();
    for _ in 0..3 {
        let locks = LockManager::connect(&node.url()).await.unwrap();
        let sem = locks.semaphore(&name, 3).unwrap();
        managers.push(locks);
        for _ in 0..4 {
            let (sem, in_flight, most) = (sem.clone(), in_flight.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let opts = support::contended(Duration::from_secs(30));
                for _ in 0..15 {
                    let permit = sem.acquire_with(opts).await.expect("permit");
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    permit.release().await.expect("release");
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 3, "{most} holders at once with 3 permits");
    assert_eq!(
        most, 3,
        "12 contending tasks filled all 3 permits at some point"
    );
    let mut raw = node.conn().await;
    let left: bool = raw.exists(permits_key(&name)).await.unwrap();
    assert!(!left, "no permit set once every permit is back");
    drop((managers, raw));
    baseline.assert_settled(&node, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holders_permit_comes_back_within_its_ttl() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("sem-crash");
    let sem = locks.semaphore(&name, 1).unwrap();
    let ttl = Duration::from_millis(500);
    let taken = Instant::now();
    let permit = sem
        .acquire_with(LockOptions::new().with_ttl(ttl))
        .await
        .unwrap();
    // The holder vanishes without giving the permit back.
    std::mem::forget(permit);
    match sem.try_acquire().await {
        Err(Error::Contended { retry_after, .. }) => {
            let retry_after = retry_after.expect("when the permit expires");
            assert!(retry_after <= ttl, "{retry_after:?}");
        }
        other => panic!("expected Contended, got {other:?}"),
    }
    let opts = LockOptions::new()
        .with_wait(Duration::from_secs(5))
        .with_backoff(Backoff::new().with_base(Duration::from_millis(5)));
    let next = sem.acquire_with(opts).await.unwrap();
    let after = taken.elapsed();
    assert!(
        after >= ttl - Duration::from_millis(20),
        "not before its TTL: {after:?}"
    );
    assert!(
        after < ttl + Duration::from_millis(600),
        "soon after its TTL: {after:?}"
    );
    next.release().await.unwrap();
    // The vanished holder's permit was reclaimed: the set is gone with the last permit.
    let mut raw = node.conn().await;
    support::wait_until_gone(&mut raw, &permits_key(&name), Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permits_are_leases_fenced_extended_and_lost_like_locks() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("sem-lease");
    let sem = locks.semaphore(&name, 2).unwrap();
    let fenced = LockOptions::new().with_fencing(true);
    let a = sem.acquire_with(fenced).await.unwrap();
    let b = sem.acquire_with(fenced).await.unwrap();
    assert!(
        b.fencing_token() > a.fencing_token(),
        "tokens increase per grant"
    );
    assert!(sem.try_acquire().await.unwrap_err().is_held_by_other());
    a.extend(Duration::from_secs(60)).await.unwrap();
    let mut raw = node.conn().await;
    let held: u64 = raw.zcard(permits_key(&name)).await.unwrap();
    assert_eq!(held, 2, "one member per permit");
    let pttl: i64 = raw.pttl(permits_key(&name)).await.unwrap();
    assert!(
        pttl > 50_000,
        "the set lives as long as its longest permit: {pttl}"
    );

    // An auto-extended permit removed behind its back is reported lost.
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(600))
        .with_auto_extend(true);
    b.release().await.unwrap();
    let c = sem.acquire_with(opts).await.unwrap();
    let lost = c.lost();
    let members: Vec<String> = raw.zrange(permits_key(&name), 0, -1).await.unwrap();
    for member in &members {
        let _: () = raw.zrem(permits_key(&name), member).await.unwrap();
    }
    let reason = tokio::time::timeout(Duration::from_secs(3), lost)
        .await
        .expect("lost within an auto-extension period or two");
    assert_eq!(reason, LostReason::Expired);
    assert!(a.release().await.unwrap_err().is_lost());
    drop((c, sem, locks, raw));
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiting_acquire() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let sem = locks.semaphore(unique_key("sem-wake"), 1).unwrap();
    let held = sem
        .acquire_with(LockOptions::new().with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // Polling alone would sleep 5 s between attempts.
    let slow = LockOptions::new()
        .with_wait(Duration::from_secs(20))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        );
    let waiter = {
        let sem = sem.clone();
        tokio::spawn(async move { (sem.acquire_with(slow).await, Instant::now()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    held.release().await.unwrap();
    let (permit, granted) = waiter.await.unwrap();
    permit.unwrap().release().await.unwrap();
    let after = granted.duration_since(released);
    assert!(
        after < Duration::from_secs(1),
        "woken by the release: {after:?}"
    );
    drop((sem, locks));
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_semaphores_are_typed_errors() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    assert!(matches!(
        locks.semaphore("x", 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        locks.semaphore("", 1),
        Err(Error::InvalidArgument(_))
    ));
    // A key of another type is an error, not "all permits held".
    let name = unique_key("sem-type");
    let mut raw = node.conn().await;
    let _: () = raw.set(permits_key(&name), "not a set").await.unwrap();
    let err = locks
        .semaphore(&name, 1)
        .unwrap()
        .try_acquire()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Redis(_)), "{err:?}");
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");

    let others = [RedisNode::start().await, RedisNode::start().await];
    let urls = [node.url(), others[0].url(), others[1].url()];
    let redlock = LockManager::builder().connect_redlock(&urls).await.unwrap();
    assert!(matches!(
        redlock.semaphore("x", 2),
        Err(Error::InvalidArgument(_))
    ));
}
