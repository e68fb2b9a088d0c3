//! A paused server, a blackholed or slow network, a reply lost on the way back: every call
//! ends within its documented bound with a typed error, a lease that cannot be auto-extended is
//! reported lost by its deadline, and no late or repeated request hurts a later holder.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions, LostReason};
use redis::AsyncCommands;
use support::proxy::{Fault, FaultProxy};
use support::{Baseline, RedisNode, command_calls, eventually, lease_key, unique_key};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Added to every documented bound: scheduling and a round trip on a loaded 2-core
/// machine. Far below the multi-second hangs these tests exist to catch.
const SLACK: Duration = Duration::from_millis(700);
/// A call that has not returned after this is hung, whatever its bound.
const HANG: Duration = Duration::from_secs(20);
/// How long a scenario may take to leave nothing behind once everything is dropped
/// (leases that could not be released run out their TTL within it).
const SETTLE: Duration = Duration::from_secs(8);

async fn manager(url: &str) -> LockManager {
    LockManager::builder()
        .with_command_timeout(COMMAND_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .unwrap()
}

/// Runs `call`, fails the test if it hangs, and returns its output and duration.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(HANG, call)
        .await
        .expect("the call hung");
    (out, started.elapsed())
}

fn assert_redis_error<T: std::fmt::Debug>(
    what: &str,
    result: distlock::Result<T>,
    took: Duration,
    bound: Duration,
) {
    assert!(
        matches!(result, Err(Error::Redis(_))),
        "{what}: expected a Redis error, got {result:?}"
    );
    assert!(
        took <= bound + SLACK,
        "{what}: took {took:?}, documented bound {bound:?}"
    );
}

enum Outage {
    PausedServer,
    BlackholedNetwork,
}

/// Every call on a manager that cannot reach Redis, and what bounds it.
async fn every_call_is_bounded(outage: Outage) {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let baseline = Baseline::take(&node).await;
    let locks = manager(&proxy.url()).await;
    let name = unique_key("outage");
    let extended = locks.try_lock(format!("{name}:a")).await.unwrap();
    let released = locks.try_lock(format!("{name}:b")).await.unwrap();
    let dropped = locks.try_lock(format!("{name}:c")).await.unwrap();

    match outage {
        Outage::PausedServer => node.pause().await,
        Outage::BlackholedNetwork => proxy.set(Fault::Blackhole),
    }

    let (r, took) = timed(locks.try_lock(format!("{name}:d"))).await;
    assert_redis_error("try_lock", r, took, COMMAND_TIMEOUT);
    // Connection errors are retried within the wait budget (a restart or failover of a
    // second should not fail every waiter); when it runs out, the last one is returned.
    let budget = Duration::from_secs(1);
    let opts = LockOptions::new().with_wait(budget);
    let (r, took) = timed(locks.lock_with(format!("{name}:d"), opts)).await;
    assert_redis_error("lock_with", r, took, budget + COMMAND_TIMEOUT);
    let (r, took) = timed(extended.extend(Duration::from_secs(30))).await;
    assert_redis_error("extend", r, took, COMMAND_TIMEOUT);
    assert!(
        extended.is_held(),
        "an unknown extend outcome keeps the older deadline"
    );
    let (r, took) = timed(released.release()).await;
    assert_redis_error("release", r, took, COMMAND_TIMEOUT);
    let (r, took) = timed(locks.with_lock_with(format!("{name}:e"), opts, |_| async { 1 })).await;
    assert_redis_error("with_lock", r, took, budget + COMMAND_TIMEOUT);
    let started = Instant::now();
    drop(dropped);
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "drop returned at once"
    );
    let (r, took) = timed(
        LockManager::builder()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .connect(&proxy.url()),
    )
    .await;
    assert_redis_error("connect", r, took, CONNECT_TIMEOUT);

    match outage {
        Outage::PausedServer => node.resume().await,
        Outage::BlackholedNetwork => proxy.set(Fault::Pass),
    }
    // The same manager works again by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match timed(locks.try_lock(format!("{name}:f"))).await.0 {
            Ok(guard) => break guard.release().await.unwrap(),
            Err(Error::Redis(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("no recovery: {other:?}"),
        }
    }
    drop(extended);
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_returns_within_its_bound_while_the_server_is_paused() {
    every_call_is_bounded(Outage::PausedServer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_returns_within_its_bound_while_the_network_is_blackholed() {
    every_call_is_bounded(Outage::BlackholedNetwork).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_auto_extensions_are_blackholed_is_reported_lost_by_its_deadline() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let baseline = Baseline::take(&node).await;
    let locks = manager(&proxy.url()).await;
    let name = unique_key("cut-off");
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(1200))
        .with_auto_extend(true);
    let guard = locks.lock_with(&name, opts).await.unwrap();
    // Auto-extensions work while the network does.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(guard.is_held(), "auto-extended past its first TTL");

    proxy.set(Fault::Blackhole);
    let deadline = guard.valid_until();
    let (reason, _) = timed(guard.lost()).await;
    let late = Instant::now().saturating_duration_since(deadline);
    assert_eq!(reason, LostReason::Unreachable);
    // The loss is reported at the deadline; 200 ms covers timer and scheduling delay.
    assert!(
        late < Duration::from_millis(200),
        "reported {late:?} after the deadline"
    );
    assert!(!guard.is_held());

    // with_lock cancels its work the same way.
    proxy.set(Fault::Pass);
    let work_started = std::sync::Arc::new(tokio::sync::Notify::new());
    let cut = {
        let work_started = std::sync::Arc::clone(&work_started);
        async move {
            work_started.notified().await;
        }
    };
    let run = locks.with_lock_with(format!("{name}:work"), opts, |_| {
        let started = std::sync::Arc::clone(&work_started);
        async move {
            started.notify_one();
            tokio::time::sleep(Duration::from_secs(60)).await;
            "finished"
        }
    });
    let (result, took) = timed(async {
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            () = cut => {
                proxy.set(Fault::Blackhole);
                run.await
            }
        }
    })
    .await;
    match result {
        Err(Error::Lost {
            reason: LostReason::Unreachable,
            ..
        }) => {}
        other => panic!("expected Lost(Unreachable), got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(5),
        "cancelled by the lease deadline, took {took:?}"
    );
    proxy.set(Fault::Pass);
    drop(guard);
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_slower_than_the_command_timeout_is_an_error_and_its_lease_is_cleaned_up() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = manager(&proxy.url()).await;
    let name = unique_key("slow");

    // 200 ms each way: the acquire lands on the server, its reply misses the 300 ms timeout.
    proxy.set(Fault::Latency(Duration::from_millis(200)));
    let opts = LockOptions::new().with_ttl(Duration::from_secs(60));
    let (r, took) = timed(locks.try_lock_with(&name, opts)).await;
    assert_redis_error("slow try_lock", r, took, COMMAND_TIMEOUT);
    // The lease the server granted is released in the background, long before its 60 s.
    eventually(
        Duration::from_secs(5),
        "the abandoned lease is released",
        || {
            let mut raw = raw.clone();
            let key = lease_key(&name);
            async move { !raw.exists::<_, bool>(&key).await.unwrap() }
        },
    )
    .await;

    // Slow but within the timeout: the lease holds, and its validity counts the latency.
    let patient = LockManager::builder()
        .with_command_timeout(Duration::from_secs(5))
        .connect(&proxy.url())
        .await
        .unwrap();
    let before = Instant::now();
    let guard = patient
        .try_lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(2)))
        .await
        .unwrap();
    assert!(guard.valid_until() <= before + Duration::from_secs(2));
    assert!(
        guard.remaining() <= Duration::from_millis(2000 - 200),
        "the reply's trip is not counted as lease time: {:?}",
        guard.remaining()
    );
    proxy.set(Fault::Pass);
    guard.release().await.unwrap();
    let _: () = raw.del(lease_key(&name)).await.unwrap();
    drop(locks);
    drop(patient);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_reply_is_lost_reports_no_false_hold_and_its_retry_spares_the_next_holder()
{
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::builder()
        .with_command_timeout(Duration::from_secs(5))
        .connect(&proxy.url())
        .await
        .unwrap();
    let direct = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("lost-reply");
    // Load the release script first: a NOSCRIPT reply held back would stall the release
    // before it ever ran.
    let warm = locks.try_lock(format!("{name}:warm")).await.unwrap();
    warm.release().await.unwrap();
    let guard = locks.try_lock(&name).await.unwrap();

    proxy.set(Fault::HoldReplies);
    let release = tokio::spawn(guard.release());
    eventually(Duration::from_secs(5), "the server ran the release", || {
        let mut raw = raw.clone();
        let key = lease_key(&name);
        async move { !raw.exists::<_, bool>(&key).await.unwrap() }
    })
    .await;
    // A later holder takes the lock while the first one has not heard back.
    let later = direct.try_lock(&name).await.unwrap();
    let later_token: String = raw.get(lease_key(&name)).await.unwrap();
    // Scripts run by SHA or, for a background release, by body.
    let calls_before =
        command_calls(&mut raw, "evalsha").await + command_calls(&mut raw, "eval").await;

    // The connection dies before the reply gets through.
    proxy.reset_connections();
    proxy.set(Fault::Pass);
    let (outcome, _) = timed(release).await;
    match outcome.unwrap() {
        // The outcome is unknown to the client and reported as such. Never `Lost(Taken)`:
        // the lease was not taken from it, it released it.
        Err(Error::Redis(_)) => {}
        other => panic!("expected a Redis error (outcome unknown), got {other:?}"),
    }
    // The background retry reaches the server, finds the later holder's token, leaves it.
    eventually(
        Duration::from_secs(10),
        "the retried release reached the server",
        || {
            let mut raw = raw.clone();
            async move {
                command_calls(&mut raw, "evalsha").await + command_calls(&mut raw, "eval").await
                    > calls_before
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token: Option<String> = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(
        token.as_deref(),
        Some(later_token.as_str()),
        "the later holder's lease is intact"
    );
    later
        .release()
        .await
        .expect("the later holder still held it");
    drop(locks);
    drop(direct);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_duplicate_release_never_deletes_a_later_holders_lease() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = manager(&proxy.url()).await;
    let direct = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("late-release");
    let guard = locks
        .try_lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(500)),
        )
        .await
        .unwrap();

    // The release and its background retry are held in the network...
    proxy.set(Fault::Blackhole);
    let (r, took) = timed(guard.release()).await;
    assert_redis_error("held release", r, took, COMMAND_TIMEOUT);
    let bytes_held_at = proxy.stats().bytes_to_server;
    // ...the lease expires, and a later holder takes the lock...
    let later = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match direct.try_lock(&name).await {
                Ok(guard) => break guard,
                Err(e) if e.is_held_by_other() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => panic!("the expired lease should pass on, got {other:?}"),
            }
        }
    };
    let later_token: String = raw.get(lease_key(&name)).await.unwrap();
    // Scripts run by SHA or, for a background release, by body.
    let calls_before =
        command_calls(&mut raw, "evalsha").await + command_calls(&mut raw, "eval").await;

    // ...then the network heals and the stale releases arrive.
    proxy.set(Fault::Pass);
    eventually(
        Duration::from_secs(10),
        "the held release reached the server",
        || {
            let mut raw = raw.clone();
            async move {
                command_calls(&mut raw, "evalsha").await + command_calls(&mut raw, "eval").await
                    > calls_before
            }
        },
    )
    .await;
    assert!(proxy.stats().bytes_to_server > bytes_held_at);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token: Option<String> = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(
        token.as_deref(),
        Some(later_token.as_str()),
        "the later holder's lease is intact"
    );
    later
        .release()
        .await
        .expect("the later holder still held it");
    drop(locks);
    drop(direct);
    baseline.assert_settled(&node, SETTLE).await;
}
