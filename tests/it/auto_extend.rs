//! Auto-extension, the lost-lock signal and `with_lock`, against a real Redis.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::{RedisNode, evalsha_calls, lease_key, unique_key};

fn auto(ttl_ms: u64) -> LockOptions {
    LockOptions::new()
        .with_ttl(Duration::from_millis(ttl_ms))
        .with_auto_extend(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_lease_is_held_for_five_seconds_and_stays_gone_after_release() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("watchdog");

    let guard = locks.lock_with(&name, auto(1000)).await.unwrap();
    assert!(guard.is_auto_extended());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
        assert!(pttl > 0, "lease gone after {:?}", started.elapsed());
        assert!(guard.is_held());
        assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    guard.release().await.unwrap();
    for _ in 0..15 {
        let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
        assert!(!exists, "an auto-extension brought the released lease back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_redis_under_a_held_lease_reports_unreachable_by_the_deadline() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("unreachable");
    let guard = locks.lock_with(&name, auto(1000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    node.stop().await;
    // No auto-extension can succeed from here on, so the deadline cannot move any more.
    let deadline = guard.valid_until();
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() resolves");
    let late = Instant::now().saturating_duration_since(deadline);
    assert_eq!(reason, LostReason::Unreachable);
    assert!(
        late < Duration::from_millis(100),
        "reported {late:?} after the deadline"
    );
    assert!(!guard.is_held());
    eprintln!("loss detection: unreachable reported {late:?} after the validity deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_makes_the_lease_unreachable_by_its_deadline() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("paused");
    let guard = locks.lock_with(&name, auto(900)).await.unwrap();

    node.pause().await;
    let deadline = guard.valid_until();
    // Auto-extensions hang (the 2 s command timeout is longer than the lease): the deadline alone
    // must end the lease.
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost()).await;
    let late = Instant::now().saturating_duration_since(deadline);
    node.resume().await;
    assert_eq!(reason.expect("lost() resolves"), LostReason::Unreachable);
    assert!(
        late < Duration::from_millis(100),
        "reported {late:?} after the deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_behind_its_back_is_reported_taken_within_one_auto_extension_period() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("taken");
    let ttl = Duration::from_millis(1500);
    let guard = locks
        .lock_with(
            &name,
            LockOptions::new().with_ttl(ttl).with_auto_extend(true),
        )
        .await
        .unwrap();

    let _: () = raw.set(lease_key(&name), "intruder").await.unwrap();
    let replaced = Instant::now();
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() resolves");
    let latency = replaced.elapsed();
    assert_eq!(reason, LostReason::Taken);
    // One auto-extension period is ttl/3; allow the coalescing window and scheduling slack.
    assert!(
        latency <= ttl / 3 + Duration::from_millis(250),
        "took {latency:?}"
    );
    eprintln!("loss detection: taken reported {latency:?} after the key was replaced");
    let value: String = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(value, "intruder", "the other owner's key is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_cancels_the_work_and_returns_lost_when_the_lease_is_taken() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("with-lock-taken");

    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));

    let intruder = {
        let name = name.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _: () = raw.set(lease_key(&name), "intruder").await.unwrap();
        })
    };
    let opts = LockOptions::new().with_ttl(Duration::from_millis(900));
    let (d, f) = (Arc::clone(&dropped), Arc::clone(&finished));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        locks.with_lock_with(&name, opts, |lease| async move {
            let _armed = SetOnDrop(d);
            assert!(lease.is_held());
            tokio::time::sleep(Duration::from_secs(5)).await;
            f.store(true, Ordering::SeqCst);
        }),
    )
    .await
    .expect("with_lock returns once the lease is lost");
    intruder.await.unwrap();

    match result {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Taken),
        other => panic!("expected Lost(Taken), got {other:?}"),
    }
    assert!(
        dropped.load(Ordering::SeqCst),
        "the work future was dropped"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work did not run to completion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_returns_the_output_keeps_the_lease_alive_and_releases() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("with-lock");
    let key = lease_key(&name);

    // The work outlives the 1 s TTL two and a half times: auto-extension is on.
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(1000))
        .with_fencing(true);
    let output = locks
        .with_lock_with(&name, opts, |lease| async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            assert!(lease.is_held());
            lease.fencing_token()
        })
        .await
        .unwrap();
    assert!(output.is_some());
    let exists: bool = raw.exists(&key).await.unwrap();
    assert!(!exists, "released after the work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_with_lock_still_releases() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("with-lock-panic");

    let task = {
        let locks = locks.clone();
        let name = name.clone();
        tokio::spawn(async move {
            locks
                .with_lock(&name, |_lease| async {
                    tokio::task::yield_now().await;
                    panic!("the work failed");
                })
                .await
        })
    };
    assert!(task.await.unwrap_err().is_panic());
    let started = Instant::now();
    loop {
        let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
        if !exists {
            break;
        }
        // Far below the 30 s default TTL: released, not expired.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "not released after a panic"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_extension_lost_resolves_expired_at_the_deadline() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let guard = locks
        .lock_with(
            unique_key("plain"),
            LockOptions::new().with_ttl(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert!(!guard.is_auto_extended());
    let deadline = guard.valid_until();
    let reason = guard.lost().await;
    assert_eq!(reason, LostReason::Expired);
    let now = Instant::now();
    assert!(now >= deadline && now - deadline < Duration::from_millis(100));
    // A loss is final: an extend now is refused without reviving the lease.
    assert!(
        guard
            .extend(Duration::from_secs(5))
            .await
            .unwrap_err()
            .is_lost()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_hold_stops_auto_extension_and_reports_the_cap() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("max-hold");
    let opts = auto(300).with_max_hold(Duration::from_millis(1000));
    let started = Instant::now();
    let guard = locks.lock_with(&name, opts).await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .unwrap();
    let held = started.elapsed();
    assert_eq!(reason, LostReason::MaxHoldReached);
    // Auto-extended well past the 300 ms TTL, and never past the 1 s cap.
    assert!(held > Duration::from_millis(800), "gave up early: {held:?}");
    assert!(
        held <= Duration::from_millis(1050),
        "held past the cap: {held:?}"
    );
    // The last auto-extension's TTL ended with the cap: the key expires right after.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
    assert!(!exists, "the lease outlived the hold-time cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_extensions_in_flight_never_resurrect_a_released_lease() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("race");
    // A 60 ms TTL extends every 20 ms: releases land on auto-extensions in flight.
    for i in 0..150u64 {
        let guard = locks
            .try_lock_with(&name, auto(60))
            .await
            .unwrap_or_else(|e| panic!("iteration {i}: the key was not free: {e}"));
        tokio::time::sleep(Duration::from_micros((i * 97) % 30_000)).await;
        match guard.release().await {
            Ok(()) => {}
            // On a loaded machine an auto-extension can miss a 60 ms lease; it expired, which is
            // not what this test is about.
            Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Expired),
            Err(e) => panic!("iteration {i}: {e}"),
        }
        let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
        assert!(!exists, "iteration {i}: the lease survived its release");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let exists: bool = raw.exists(lease_key(&name)).await.unwrap();
    assert!(!exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_leases_stay_alive_on_batched_auto_extensions() {
    const LEASES: usize = 1000;
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let prefix = unique_key("many");
    let ttl = Duration::from_millis(1500);

    let mut guards = Vec::with_capacity(LEASES);
    for i in 0..LEASES {
        let opts = LockOptions::new().with_ttl(ttl).with_auto_extend(true);
        guards.push(
            locks
                .try_lock_with(format!("{prefix}:{i}"), opts)
                .await
                .unwrap(),
        );
    }
    let before = evalsha_calls(&mut raw).await;
    let window = Duration::from_millis(4500); // three TTLs
    tokio::time::sleep(window).await;
    let calls = evalsha_calls(&mut raw).await - before;

    for (i, guard) in guards.iter().enumerate() {
        assert!(guard.is_held(), "lease {i} lost");
        let pttl: i64 = raw.pttl(lease_key(&format!("{prefix}:{i}"))).await.unwrap();
        assert!(pttl > 0, "lease {i} expired on the server");
    }
    // One tick per ttl/3 = 500 ms: ~9 ticks in the window, and one call per tick extends all
    // 1000 leases once they have drifted into one batch. Per-lease auto-extension would be ~9000.
    let ticks = (window.as_millis() / (ttl / 3).as_millis()) as u64;
    eprintln!(
        "batched auto-extension: {LEASES} leases, {calls} auto-extension calls in {window:?} (~{ticks} ticks, {:.1} calls per tick)",
        calls as f64 / ticks as f64
    );
    assert!(
        calls <= ticks + 3,
        "{calls} auto-extension calls for {ticks} ticks"
    );
    assert!(calls >= ticks / 2, "auto-extensions happened: {calls}");
    for guard in guards {
        guard.release().await.unwrap();
    }
}

/// One thread, so the capturing subscriber (thread-local default) sees the auto-extension
/// task's events too.
#[tokio::test(flavor = "current_thread")]
async fn a_lease_lost_in_the_background_is_logged_once_with_its_key_and_reason() {
    let capture = support::logs::Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("logged-loss");
    let guard = locks.lock_with(&name, auto(600)).await.unwrap();
    // Another program overwrites the key: the next auto-extension finds it taken.
    let _: () = raw.set(lease_key(&name), "someone-else").await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost within a period");
    assert_eq!(reason, LostReason::Taken);
    let lines = capture.find(tracing::Level::WARN, "lease lost in the background");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].text.contains(&name), "{lines:#?}");
    assert!(lines[0].text.contains("another owner"), "{lines:#?}");
    assert!(lines[0].text.contains("held_for"), "{lines:#?}");
    drop(guard);
    let _: () = raw.del(lease_key(&name)).await.unwrap();
}
