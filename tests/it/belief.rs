//! "Belief never exceeds truth": what a guard believes about its lease, checked against the
//! real server, with replies delayed, reordered and lost by a hostile connection
//! (tests/support/hostile.rs). Regression tests for issue 9, and the property test.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Error, LockGuard, LockManager, LockOptions, LostReason, MIN_TTL};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support::hostile::{Action, CommandInfo, HostileConnection};
use support::{Baseline, RedisNode, lease_key, unique_key};

/// How long a scenario may take to leave nothing behind once everything is dropped.
const SETTLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// The hostile connection itself: proven against server-side state.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_connection_executes_a_delayed_command_after_a_later_one() {
    let node = RedisNode::start().await;
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    let key = unique_key("hostile:order");
    hostile.set_plan(|cmd| {
        if cmd.has_arg(b"first") {
            Action::pass().via(1).delay_send(Duration::from_millis(300))
        } else {
            Action::pass().via(0)
        }
    });
    let mut slow = hostile.clone();
    let slow_key = key.clone();
    let first = tokio::spawn(async move {
        redis::cmd("RPUSH")
            .arg(&slow_key)
            .arg("first")
            .query_async::<i64>(&mut slow)
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fast = hostile.clone();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&key)
        .arg("second")
        .query_async(&mut fast)
        .await
        .expect("second push");
    first.await.expect("task").expect("first push");
    let mut check = node.conn().await;
    let order: Vec<String> = check.lrange(&key, 0, -1).await.expect("LRANGE");
    assert_eq!(
        order,
        ["second", "first"],
        "the command sent first must run last"
    );
}

#[tokio::test]
async fn hostile_connection_runs_a_command_whose_reply_it_loses() {
    let node = RedisNode::start().await;
    let mut hostile = HostileConnection::connect(&node.client(), 2).await;
    let key = unique_key("hostile:lost");
    hostile.set_plan(|cmd| {
        if cmd.name == "INCR" {
            Action::pass().lose_reply(Duration::from_millis(50))
        } else {
            Action::pass()
        }
    });
    let err = redis::cmd("INCR")
        .arg(&key)
        .query_async::<i64>(&mut hostile)
        .await
        .expect_err("the reply is lost");
    assert!(err.is_timeout(), "a lost reply reads as a timeout: {err:?}");
    let mut check = node.conn().await;
    support::eventually(Duration::from_secs(5), "the INCR ran anyway", || {
        let mut check = check.clone();
        let key = key.clone();
        async move { check.get::<_, Option<i64>>(&key).await.ok().flatten() == Some(1) }
    })
    .await;
    let _: () = check.del(&key).await.expect("DEL");
}

#[tokio::test]
async fn hostile_connection_delays_the_reply_of_an_executed_command() {
    let node = RedisNode::start().await;
    let hostile = HostileConnection::connect(&node.client(), 3).await;
    let key = unique_key("hostile:reply");
    hostile.set_plan(|cmd| {
        if cmd.name == "SET" {
            Action::pass()
                .via(2)
                .delay_reply(Duration::from_millis(600))
        } else {
            Action::pass()
        }
    });
    let started = std::time::Instant::now();
    let set_key = key.clone();
    let mut conn = hostile.clone();
    let set = tokio::spawn(async move {
        redis::cmd("SET")
            .arg(&set_key)
            .arg("v")
            .query_async::<()>(&mut conn)
            .await
    });
    let mut check = node.conn().await;
    support::eventually(
        Duration::from_secs(5),
        "the SET ran before its reply came",
        || {
            let mut check = check.clone();
            let key = key.clone();
            let set = &set;
            async move { check.exists::<_, bool>(&key).await.unwrap_or(false) && !set.is_finished() }
        },
    )
    .await;
    set.await.expect("task").expect("SET");
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(hostile.commands_seen() >= 1);
    let _: () = check.del(&key).await.expect("DEL");
}

#[tokio::test]
async fn baseline_notices_a_leftover_key_connection_and_task() {
    let node = RedisNode::start().await;
    let baseline = support::Baseline::take(&node).await;
    baseline.assert_settled(&node, Duration::from_secs(2)).await;
    // A leftover lease key, a connection with its driver task, a subscribed channel.
    let mut extra = node.conn().await;
    let key = support::lease_key(&unique_key("baseline"));
    let _: () = extra.set(&key, "x").await.expect("SET");
    let mut pubsub = node.client().get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("distlock-test-channel")
        .await
        .expect("SUBSCRIBE");
    let left = baseline
        .left_behind(&node, Duration::from_millis(200))
        .await
        .expect("leftovers must not pass as settled");
    for what in [
        "lease keys",
        "subscribed channels",
        "client connections",
        "alive runtime tasks",
    ] {
        assert!(left.contains(what), "{what} not named in: {left}");
    }
    let _: () = extra.del(&key).await.expect("DEL");
    drop(extra);
    drop(pubsub);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------------------
// Helpers for the lease tests.
// ---------------------------------------------------------------------------------------

/// The SHAs of distlock's scripts, learned by watching a manager use them (so the tests do
/// not depend on the scripts' text). An acquire without fencing is the plain
/// `SET key token NX PX ttl GET`, not a script.
#[derive(Debug, Clone, Default)]
struct Shas {
    acquire: Option<String>,
    extend: String,
    release: String,
}

impl Shas {
    fn is_acquire(&self, cmd: &CommandInfo) -> bool {
        match &self.acquire {
            Some(sha) => cmd.sha.as_deref() == Some(sha.as_str()),
            None => cmd.name == "SET" && cmd.has_arg(b"NX"),
        }
    }
    fn is_extend(&self, cmd: &CommandInfo) -> bool {
        cmd.sha.as_deref() == Some(self.extend.as_str())
    }
}

/// A manager on a hostile connection (two real connections) to `node`, and the SHAs of
/// its scripts, learned on a probe lock that is released again.
async fn hostile_manager(node: &RedisNode) -> (LockManager, HostileConnection, Shas) {
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    let locks = LockManager::builder()
        .build(hostile.clone())
        .expect("manager on the hostile connection");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&seen);
    hostile.set_plan(move |cmd| {
        if let Some(sha) = &cmd.sha {
            log.lock().unwrap().push(sha.clone());
        }
        Action::pass()
    });
    let last = || seen.lock().unwrap().last().cloned().expect("a script ran");
    let probe = unique_key("probe");
    let guard = locks.try_lock(&probe).await.expect("probe lock");
    // The default acquire is a plain SET: no script ran for it.
    let acquire = None;
    assert!(seen.lock().unwrap().is_empty(), "the acquire ran a script");
    guard
        .extend(Duration::from_secs(5))
        .await
        .expect("probe extend");
    let extend = last();
    guard.release().await.expect("probe release");
    let release = last();
    hostile.clear_plan();
    let shas = Shas {
        acquire,
        extend,
        release,
    };
    assert!(
        shas.extend != shas.release,
        "two different scripts expected: {shas:?}"
    );
    (locks, hostile, shas)
}

/// A manager on a plain multiplexed connection: the "other owner".
async fn plain_manager(node: &RedisNode) -> LockManager {
    LockManager::builder()
        .build(node.conn().await)
        .expect("plain manager")
}

/// Invariant 1, checked from outside: if `guard` says it is held, the server's key lives
/// at least until the guard's `valid_until`. The belief is read BEFORE the query; the
/// server's expiry is then at most `reply time + PTTL + 1 ms` (PTTL rounds down), so with
/// 2 ms more of slack a failure here is a real violation, never scheduling noise.
/// A missing key counts as PTTL 0.
async fn assert_belief_within_truth(
    guard: &LockGuard,
    check: &mut MultiplexedConnection,
    key: &str,
    context: &str,
) {
    let believed = guard.valid_until();
    if !guard.is_held() {
        return;
    }
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(check)
        .await
        .expect("PTTL");
    let replied = Instant::now();
    if pttl == -1 {
        return; // no expiry at all: nothing can outlive it
    }
    let truth = replied + Duration::from_millis(pttl.max(0) as u64 + 3);
    assert!(
        believed <= truth,
        "{context}: belief exceeds truth: the guard is held with {:?} left, the server's PTTL is {pttl} ms",
        believed.saturating_duration_since(replied)
    );
}

async fn pttl(check: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(check)
        .await
        .expect("PTTL")
}

fn ttl_opts(ttl: Duration) -> LockOptions {
    LockOptions::new().with_ttl(ttl).with_wait(Duration::ZERO)
}

// ---------------------------------------------------------------------------------------
// #1: concurrent extends of one guard.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn concurrent_extends_never_leave_belief_above_the_server_ttl() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("concurrent-extends");
    let key = lease_key(&name);
    let guard = locks
        .try_lock_with(&name, ttl_opts(Duration::from_secs(5)))
        .await
        .expect("lock");
    // The 1 s extend leaves first on the slow connection; the 30 s one 50 ms later on the
    // fast one: the server runs the 30 s extend first, then the 1 s one.
    let plan_shas = shas.clone();
    hostile.set_plan(move |cmd| {
        if plan_shas.is_extend(cmd) && cmd.has_arg(b"1000") {
            Action::pass().via(1).delay_send(Duration::from_millis(300))
        } else {
            Action::pass().via(0)
        }
    });
    let (short, long) = tokio::join!(guard.extend(Duration::from_secs(1)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        guard.extend(Duration::from_secs(30)).await
    });
    hostile.clear_plan();
    let server_pttl = pttl(&mut check, &key).await;
    assert!(
        (0..=1000).contains(&server_pttl),
        "test setup: the server should have run the 1 s extend last, PTTL {server_pttl} (results {short:?} {long:?})"
    );
    assert_belief_within_truth(&guard, &mut check, &key, "after both extends returned").await;
    // Once the server let the key go, another owner can take it: the guard must not
    // still believe it holds the lease.
    // the key expires on the server.
    support::wait_until_gone(&mut check, &key, Duration::from_secs(5)).await;
    let other = plain_manager(&node).await;
    let second = other
        .try_lock(&name)
        .await
        .expect("a second owner gets the expired lock");
    assert!(
        !guard.is_held(),
        "two owners: another manager holds the lock while the first guard still says is_held() with {:?} left",
        guard.remaining()
    );
    second.release().await.expect("release the second owner");
    drop(guard);
    drop(locks);
    drop(other);
    drop(hostile);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test]
async fn auto_extension_racing_a_shorter_extend_never_leaves_belief_above_the_server_ttl() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("auto-extension-vs-extend");
    let key = lease_key(&name);
    // Auto-extended every 200 ms with the old TTL of 600 ms.
    let guard = locks
        .try_lock_with(
            &name,
            ttl_opts(Duration::from_millis(600)).with_auto_extend(true),
        )
        .await
        .expect("lock");
    // The user's shorter extend leaves first but waits 250 ms on the slow connection:
    // at least one auto-extension (600 ms) runs on the server before it, and sets the later deadline.
    let plan_shas = shas.clone();
    hostile.set_plan(move |cmd| {
        if plan_shas.is_extend(cmd) {
            Action::pass().via(1).delay_send(Duration::from_millis(250))
        } else {
            Action::pass().via(0)
        }
    });
    let extended = guard.extend(Duration::from_millis(200)).await;
    assert_belief_within_truth(
        &guard,
        &mut check,
        &key,
        &format!("right after the shorter extend returned {extended:?}"),
    )
    .await;
    hostile.clear_plan();
    // And while auto-extension goes on.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_belief_within_truth(&guard, &mut check, &key, "while auto-extension goes on").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(guard);
    drop(locks);
    drop(hostile);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// #6: replies that come back after the lease's time.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn try_lock_answered_after_its_ttl_fails_and_leaves_no_lease() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("late-acquire");
    let key = lease_key(&name);
    let plan_shas = shas.clone();
    hostile.set_plan(move |cmd| {
        if plan_shas.is_acquire(cmd) {
            Action::pass().delay_reply(Duration::from_millis(300))
        } else {
            Action::pass()
        }
    });
    let result = locks
        .try_lock_with(&name, ttl_opts(Duration::from_millis(100)))
        .await;
    hostile.clear_plan();
    match &result {
        Err(e) => assert!(
            e.is_redis(),
            "expected a Redis (timed-out) error, got {e:?}"
        ),
        Ok(guard) => panic!(
            "Ok(guard) for an acquire answered after its TTL: is_held() == {}, remaining {:?}",
            guard.is_held(),
            guard.remaining()
        ),
    }
    drop(result);
    // the attempt's lease is gone.
    support::wait_until_gone(&mut check, &key, Duration::from_secs(3)).await;
    drop(locks);
    drop(hostile);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test]
async fn lock_with_retries_an_acquire_answered_after_its_ttl() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("late-acquire-retry");
    // Only the first acquire is late.
    let plan_shas = shas.clone();
    let delayed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    hostile.set_plan(move |cmd| {
        if plan_shas.is_acquire(cmd) && !delayed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Action::pass().delay_reply(Duration::from_millis(300))
        } else {
            Action::pass()
        }
    });
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(100))
        .with_wait(Duration::from_secs(3));
    let guard = locks.lock_with(&name, opts).await;
    let now = Instant::now();
    hostile.clear_plan();
    let guard = guard.expect("lock_with retries within its budget");
    assert!(
        guard.valid_until() > now,
        "Ok(guard) with no validity left at return (is_held() == {})",
        guard.is_held()
    );
    drop(guard);
    drop(locks);
    drop(hostile);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test]
async fn extend_answered_after_its_validity_reports_expired() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("late-extend");
    let guard = locks
        .try_lock_with(&name, ttl_opts(Duration::from_secs(5)))
        .await
        .expect("lock");
    let plan_shas = shas.clone();
    hostile.set_plan(move |cmd| {
        if plan_shas.is_extend(cmd) {
            Action::pass().delay_reply(Duration::from_millis(400))
        } else {
            Action::pass()
        }
    });
    let result = guard.extend(Duration::from_millis(200)).await;
    hostile.clear_plan();
    assert!(
        matches!(
            result,
            Err(Error::Lost {
                reason: LostReason::Expired,
                ..
            })
        ),
        "an extend answered after its validity ended returned {result:?} (is_held() == {}, remaining {:?})",
        guard.is_held(),
        guard.remaining()
    );
    assert!(!guard.is_held());
    drop(guard);
    drop(locks);
    drop(hostile);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test]
async fn ttls_that_cannot_leave_validity_are_rejected() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    let name = unique_key("min-ttl");
    let below = MIN_TTL.saturating_sub(Duration::from_millis(1));
    match locks.try_lock_with(&name, ttl_opts(below)).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "ttl"),
        other => panic!("TTL {below:?} below MIN_TTL {MIN_TTL:?}: {other:?}"),
    }
    // A lease at MIN_TTL has validity left when it is returned (or the attempt counts
    // as failed because the reply came too late: retried a few times).
    let mut granted = 0;
    for _ in 0..5 {
        let called = Instant::now();
        match locks.try_lock_with(&name, ttl_opts(MIN_TTL)).await {
            Ok(guard) => {
                // Deterministic: a lease that leaves validity at MIN_TTL is valid for well
                // over half of it from the call (drift is ttl/100 + 2 ms).
                assert!(
                    guard.valid_until() >= called + MIN_TTL / 2,
                    "a lease at MIN_TTL {MIN_TTL:?} is born expired (is_held() == {})",
                    guard.is_held()
                );
                granted += 1;
                // Dropped: the background compare-and-delete may find it expired already,
                // which is fine either way.
                drop(guard);
            }
            Err(e) if e.is_redis() || e.is_held_by_other() => {}
            Err(e) => panic!("MIN_TTL lease: {e:?}"),
        }
        tokio::time::sleep(MIN_TTL * 2).await;
    }
    assert!(granted > 0, "no lease at MIN_TTL in 5 tries");
    let guard = locks
        .try_lock_with(&name, ttl_opts(Duration::from_secs(5)))
        .await
        .expect("lock");
    match guard.extend(below).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "ttl"),
        other => panic!("extend({below:?}) below MIN_TTL: {other:?}"),
    }
    guard.release().await.expect("release");
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// #7: one bad key in an auto-extension batch.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_retyped_key_does_not_break_auto_extension_of_the_other_leases() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    // Auto-extended every 500 ms, both in one batch; an auto-extension may be late by up to ~1 s
    // (a loaded machine) before the lease is in danger.
    let ttl = Duration::from_millis(1500);
    let (healthy_name, bad_name) = (unique_key("batch-healthy"), unique_key("batch-bad"));
    let opts = ttl_opts(ttl).with_auto_extend(true);
    let healthy = locks
        .try_lock_with(&healthy_name, opts)
        .await
        .expect("lock");
    let bad = locks.try_lock_with(&bad_name, opts).await.expect("lock");
    let (healthy_key, bad_key) = (lease_key(&healthy_name), lease_key(&bad_name));
    // A foreign client replaces one lease key by a hash.
    let _: () = redis::pipe()
        .atomic()
        .del(&bad_key)
        .hset(&bad_key, "f", "v")
        .query_async(&mut check)
        .await
        .expect("retype");
    let reason = tokio::time::timeout(Duration::from_secs(3), bad.lost())
        .await
        .expect("the retyped lease is reported lost within a few periods");
    assert_eq!(
        reason,
        LostReason::Taken,
        "the retyped lease's reason (the healthy one is_held() == {})",
        healthy.is_held()
    );
    // Several auto-extension periods later, the other lease is still held, and truly so.
    let until = Instant::now() + ttl * 5 / 3; // five auto-extension periods
    while Instant::now() < until {
        assert!(
            healthy.is_held(),
            "the healthy lease was lost: {:?}",
            healthy.handle().lost_reason()
        );
        assert_belief_within_truth(&healthy, &mut check, &healthy_key, "healthy lease").await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(bad);
    healthy.release().await.expect("release the healthy lease");
    drop(locks);
    let _: () = check.del(&bad_key).await.expect("DEL the foreign hash");
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// #8: max_hold below the TTL.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn max_hold_below_the_ttl_caps_the_lease() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    for hold in [Duration::from_millis(500), Duration::from_secs(1)] {
        let name = unique_key("max-hold");
        let key = lease_key(&name);
        let opts = ttl_opts(Duration::from_secs(3))
            .with_auto_extend(true)
            .with_max_hold(hold);
        let started = Instant::now();
        let guard = locks.try_lock_with(&name, opts).await.expect("lock");
        let left = pttl(&mut check, &key).await;
        assert!(
            left <= hold.as_millis() as i64,
            "max_hold {hold:?} with TTL 3 s: the server's PTTL right after acquire is {left} ms"
        );
        assert!(
            guard.valid_until() <= started + hold,
            "max_hold {hold:?}: the guard believes {:?} left",
            guard.remaining()
        );
        let reason = tokio::time::timeout(hold + Duration::from_secs(2), guard.lost())
            .await
            .expect("lost() resolves after max_hold");
        assert_eq!(reason, LostReason::MaxHoldReached);
        // the key is gone after max_hold.
        support::wait_until_gone(&mut check, &key, Duration::from_secs(2)).await;
        drop(guard);
    }
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// #9: a shortening extend on an auto-extended lease.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn shortening_extend_on_an_auto_extended_lease_stays_held() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    let name = unique_key("shorten");
    let key = lease_key(&name);
    let guard = locks
        .try_lock_with(
            &name,
            ttl_opts(Duration::from_secs(3)).with_auto_extend(true),
        )
        .await
        .expect("lock");
    guard
        .extend(Duration::from_millis(800))
        .await
        .expect("shortening extend");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(
            guard.is_held(),
            "the auto-extended lease was lost after a shortening extend: {:?}",
            guard.handle().lost_reason()
        );
        assert_belief_within_truth(&guard, &mut check, &key, "after a shortening extend").await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    guard.release().await.expect("release");
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// #12: names and fence counters.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn lock_name_starting_with_a_closing_brace_is_rejected() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    let name = format!("}}{}", unique_key("brace"));
    match locks.try_lock(&name).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "key"),
        Ok(guard) => {
            let fence = guard.fencing_token();
            guard.release().await.expect("release");
            panic!(
                "a name starting with '}}' (empty hash tag) was accepted, fencing token {fence:?}"
            )
        }
        Err(e) => panic!("a name starting with '}}': {e:?}"),
    }
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test]
async fn a_bad_fence_counter_fails_the_acquire_clearly() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    // Fencing on: the counter is read (and refused) before anything is written.
    let locks = LockManager::builder()
        .with_default_options(LockOptions::new().with_fencing(true))
        .build(node.conn().await)
        .expect("fenced manager");
    let mut wrong = Vec::new();
    for bad in ["abc", "-5", "9007199254740993"] {
        let name = unique_key("bad-fence");
        let key = lease_key(&name);
        let fence_key = format!("{key}:fence");
        let _: () = check.set(&fence_key, bad).await.expect("SET fence");
        match locks.try_lock(&name).await {
            Err(Error::Redis(e)) if e.to_string().contains("fence") => {}
            Ok(guard) => {
                let token = guard.fencing_token();
                guard.release().await.expect("release");
                wrong.push(format!(
                    "{bad:?}: acquire succeeded with fencing token {token:?}"
                ));
            }
            Err(e) => wrong.push(format!(
                "{bad:?}: not a Redis error naming the fence: {e:?}"
            )),
        }
        if pttl(&mut check, &key).await != -2 {
            wrong.push(format!("{bad:?}: a lease key was left"));
            let _: () = check.del(&key).await.expect("DEL lease");
        }
        let _: () = check.del(&fence_key).await.expect("DEL fence");
    }
    assert!(wrong.is_empty(), "bad fence counters: {}", wrong.join("; "));
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// The property: belief <= truth under random schedules.
// ---------------------------------------------------------------------------------------

mod property {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// The command timeout of both managers: every call's budget includes it once.
    const CMD_TIMEOUT: Duration = Duration::from_secs(1);
    /// What a call may take beyond its wait budget and one command timeout.
    const SLACK: Duration = Duration::from_millis(300);
    /// How long before the caller saw `Ok` a guard may have run out without failing (c).
    const C_TOLERANCE: Duration = Duration::from_millis(3);
    /// Lock names per case, guard slots per case.
    const NAMES: usize = 2;
    const SLOTS: usize = 3;

    /// How the hostile connection treats the commands whose sequence number falls on it.
    #[derive(Debug, Clone)]
    pub(super) struct Chaos {
        route: usize,
        send_ms: u64,
        reply_ms: u64,
        lose_ms: Option<u64>,
    }

    #[derive(Debug, Clone, Copy)]
    pub(super) enum Foreign {
        Del,
        SetOther,
        Hash,
        ScriptFlush,
    }

    #[derive(Debug, Clone)]
    pub(super) enum Step {
        /// `wait_ms == 0`: `try_lock_with`; otherwise `lock_with` with that budget.
        Acquire {
            slot: usize,
            mgr: usize,
            name: usize,
            ttl_ms: u64,
            wait_ms: u64,
            /// `Some(max_hold)`: auto-extended, with an optional hold-time cap.
            auto: Option<Option<u64>>,
            /// Fair mode: through the lock's waiter queue in Redis.
            fair: bool,
            cancel_ms: Option<u64>,
        },
        Extend {
            slot: usize,
            ttl_ms: u64,
            cancel_ms: Option<u64>,
        },
        TwoExtends {
            slot: usize,
            first_ms: u64,
            second_ms: u64,
            gap_ms: u64,
            cancel_ms: Option<u64>,
        },
        Release {
            slot: usize,
            cancel_ms: Option<u64>,
        },
        Drop {
            slot: usize,
        },
        Foreign {
            name: usize,
            what: Foreign,
        },
        Sleep {
            ms: u64,
        },
    }

    #[derive(Debug, Clone)]
    pub(super) struct Case {
        managers: usize,
        chaos: Vec<Chaos>,
        steps: Vec<Step>,
    }

    fn chaos() -> impl Strategy<Value = Chaos> {
        (
            0usize..2,
            prop_oneof![1 => Just(0u64), 1 => 0u64..120],
            prop_oneof![1 => Just(0u64), 1 => 0u64..200],
            prop_oneof![5 => Just(None), 1 => (0u64..200).prop_map(Some)],
        )
            .prop_map(|(route, send_ms, reply_ms, lose_ms)| Chaos {
                route,
                send_ms,
                reply_ms,
                lose_ms,
            })
    }

    fn cancel() -> impl Strategy<Value = Option<u64>> {
        prop_oneof![4 => Just(None), 1 => (0u64..60).prop_map(Some)]
    }

    /// Mostly short TTLs: that is where replies can come back after the lease's time.
    fn extend_ttl() -> impl Strategy<Value = u64> {
        let min = MIN_TTL.as_millis() as u64;
        prop_oneof![2 => min..300, 1 => min..2_000]
    }

    fn acquire_ttl() -> impl Strategy<Value = u64> {
        prop_oneof![2 => 50u64..300, 1 => 50u64..2_000]
    }

    fn acquire(slot: std::ops::Range<usize>) -> impl Strategy<Value = Step> {
        (
            slot,
            0usize..2,
            0..NAMES,
            acquire_ttl(),
            prop_oneof![1 => Just(0u64), 1 => 0u64..400],
            prop_oneof![
                1 => Just(None),
                1 => prop_oneof![1 => Just(None), 1 => (50u64..3_000).prop_map(Some)]
                    .prop_map(Some),
            ],
            any::<bool>(),
            cancel(),
        )
            .prop_map(
                |(slot, mgr, name, ttl_ms, wait_ms, auto, fair, cancel_ms)| Step::Acquire {
                    slot,
                    mgr,
                    name,
                    ttl_ms,
                    wait_ms,
                    auto,
                    fair,
                    cancel_ms,
                },
            )
    }

    /// Every case starts by taking a lease in slot 0.
    fn step_acquire() -> impl Strategy<Value = Step> {
        acquire(0..1)
    }

    fn step() -> impl Strategy<Value = Step> {
        let slot = 0..SLOTS;
        prop_oneof![
            4 => acquire(slot.clone()),
            3 => (slot.clone(), extend_ttl(), cancel())
                .prop_map(|(slot, ttl_ms, cancel_ms)| Step::Extend { slot, ttl_ms, cancel_ms }),
            2 => (slot.clone(), extend_ttl(), extend_ttl(), 0u64..80, cancel()).prop_map(
                |(slot, first_ms, second_ms, gap_ms, cancel_ms)| Step::TwoExtends {
                    slot,
                    first_ms,
                    second_ms,
                    gap_ms,
                    cancel_ms,
                }
            ),
            1 => (slot.clone(), cancel())
                .prop_map(|(slot, cancel_ms)| Step::Release { slot, cancel_ms }),
            1 => slot.prop_map(|slot| Step::Drop { slot }),
            1 => (
                0..NAMES,
                prop_oneof![
                    Just(Foreign::Del),
                    Just(Foreign::SetOther),
                    Just(Foreign::Hash),
                    Just(Foreign::ScriptFlush)
                ]
            )
                .prop_map(|(name, what)| Step::Foreign { name, what }),
            2 => (0u64..400).prop_map(|ms| Step::Sleep { ms }),
        ]
    }

    pub(super) fn case() -> impl Strategy<Value = Case> {
        (
            1usize..=2,
            proptest::collection::vec(chaos(), 1..6),
            step_acquire(),
            proptest::collection::vec(step(), 1..10),
        )
            .prop_map(|(managers, chaos, first, mut steps)| {
                steps.insert(0, first);
                Case {
                    managers,
                    chaos,
                    steps,
                }
            })
    }

    /// One guard of the case and what the case knows about its history.
    struct Held {
        guard: LockGuard,
        name: usize,
        /// The 8 hex digits the guard's Debug output shows of its token, if it does.
        token: Option<String>,
        /// A foreign client wrote the key since this lease was taken: losing it is legitimate.
        tainted: bool,
        /// Another acquire attempt (possibly cancelled, possibly a ghost) on the name since.
        contested: bool,
        capped: bool,
        reported: Option<LostReason>,
    }

    fn token_prefix(guard: &LockGuard) -> Option<String> {
        let debug = format!("{:?}", guard.handle());
        let rest = &debug[debug.find("token: ")? + "token: ".len()..];
        let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        (hex.len() >= 8).then_some(hex)
    }

    fn fail(msg: String) -> TestCaseError {
        TestCaseError::fail(msg)
    }

    /// `Some(r)` if `fut` finished within `cancel` (or there is no cancel); measures it
    /// against `budget` (check (d)).
    async fn call<T>(
        fut: impl std::future::Future<Output = T>,
        cancel_ms: Option<u64>,
        budget: Duration,
        what: &str,
    ) -> Result<Option<T>, TestCaseError> {
        let started = Instant::now();
        let out = match cancel_ms {
            None => Some(fut.await),
            Some(ms) => tokio::time::timeout(Duration::from_millis(ms), fut)
                .await
                .ok(),
        };
        let took = started.elapsed();
        if out.is_some() && took > budget {
            return Err(fail(format!(
                "(d) {what} took {took:?}, over its budget {budget:?}"
            )));
        }
        Ok(out)
    }

    /// Reads the server's view of one lease key atomically: type, string value, PTTL.
    async fn server_view(
        check: &mut MultiplexedConnection,
        key: &str,
    ) -> (String, String, i64, Instant) {
        let (kind, value, pttl): (String, String, i64) = redis::Script::new(
            "local t = redis.call('TYPE', KEYS[1])['ok'] \
             local v = '' \
             if t == 'string' then v = redis.call('GET', KEYS[1]) end \
             return {t, v, redis.call('PTTL', KEYS[1])}",
        )
        .key(key)
        .invoke_async(check)
        .await
        .expect("read the lease key");
        (kind, value, pttl, Instant::now())
    }

    /// What a guard said, read before the server is asked: is_held, valid_until,
    /// lost_reason, and when it was read.
    type Belief = (bool, Instant, Option<LostReason>, Instant);

    /// Checks (a) and (b) for every guard against the server.
    async fn check_all(
        slots: &mut [Option<Held>],
        keys: &[String],
        check: &mut MultiplexedConnection,
        context: &str,
    ) -> Result<(), TestCaseError> {
        // Beliefs first, then the truth.
        let beliefs: Vec<Option<Belief>> = slots
            .iter()
            .map(|h| {
                h.as_ref().map(|h| {
                    let v = h.guard.valid_until();
                    let held = h.guard.is_held();
                    let reason = h.guard.handle().lost_reason();
                    (held, v, reason, Instant::now())
                })
            })
            .collect();
        let mut views = Vec::new();
        for key in keys {
            views.push(server_view(check, key).await);
        }
        let mut held_by_name = [None::<usize>; NAMES];
        for (i, (h, belief)) in slots.iter_mut().zip(&beliefs).enumerate() {
            let (Some(h), Some((held, v, reason, read_at))) = (h, belief) else {
                continue;
            };
            let (kind, value, pttl, replied) = &views[h.name];
            let ours = h
                .token
                .as_ref()
                .map(|t| kind == "string" && value.starts_with(t.as_str()));
            if *held && !h.tainted {
                if ours == Some(false) {
                    return Err(fail(format!(
                        "(a) {context}: slot {i} is_held() with {:?} left, but the key holds {kind} {value:?} (PTTL {pttl})",
                        v.saturating_duration_since(*read_at)
                    )));
                }
                if *pttl != -1 {
                    let truth = *replied + Duration::from_millis(((*pttl).max(0) as u64) + 3);
                    if *v > truth {
                        return Err(fail(format!(
                            "(a) {context}: slot {i} is_held() with {:?} left, the server's PTTL is {pttl} ms",
                            v.saturating_duration_since(*read_at)
                        )));
                    }
                }
                if let Some(other) = held_by_name[h.name].replace(i) {
                    return Err(fail(format!(
                        "(a) {context}: slots {other} and {i} both is_held() on name {}",
                        h.name
                    )));
                }
            }
            if h.reported.is_none()
                && let Some(reason) = reason
            {
                h.reported = Some(*reason);
                match reason {
                    LostReason::Taken if !h.tainted && !h.contested => {
                        return Err(fail(format!(
                            "(b) {context}: slot {i} reports Taken, but nobody else tried the name and no foreign write happened (key: {kind} {value:?})"
                        )));
                    }
                    LostReason::Expired if *read_at < *v && ours == Some(true) && *pttl > 0 => {
                        return Err(fail(format!(
                            "(b) {context}: slot {i} reports Expired with {:?} of belief left while the key holds its token (PTTL {pttl})",
                            v.saturating_duration_since(*read_at)
                        )));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    pub(super) async fn run(node: &RedisNode, case: Case) -> Result<(), TestCaseError> {
        let mut check = node.conn().await;
        let baseline = Baseline::take(node).await;
        let tag = unique_key("prop");
        let names: Vec<String> = (0..NAMES).map(|i| format!("{tag}:{i}")).collect();
        let keys: Vec<String> = names.iter().map(|n| lease_key(n)).collect();
        let hostile = HostileConnection::connect(&node.client(), 2).await;
        let chaos = case.chaos.clone();
        hostile.set_plan(move |cmd| {
            let c = &chaos[cmd.seq as usize % chaos.len()];
            let mut action = Action::pass()
                .via(c.route)
                .delay_send(Duration::from_millis(c.send_ms))
                .delay_reply(Duration::from_millis(c.reply_ms));
            if let Some(ms) = c.lose_ms {
                action = action.lose_reply(Duration::from_millis(ms));
            }
            action
        });
        let mut managers = vec![
            LockManager::builder()
                .with_command_timeout(CMD_TIMEOUT)
                .build(hostile.clone())
                .expect("hostile manager"),
        ];
        if case.managers == 2 {
            managers.push(
                LockManager::builder()
                    .with_command_timeout(CMD_TIMEOUT)
                    .build(node.conn().await)
                    .expect("plain manager"),
            );
        }
        let mut slots: Vec<Option<Held>> = (0..SLOTS).map(|_| None).collect();
        let one_call = CMD_TIMEOUT + SLACK;
        for (n, step) in case.steps.iter().enumerate() {
            let context = format!("after step {n} {step:?}");
            match step.clone() {
                Step::Acquire {
                    slot,
                    mgr,
                    name,
                    ttl_ms,
                    wait_ms,
                    auto,
                    fair,
                    cancel_ms,
                } => {
                    drop(slots[slot].take());
                    for h in slots.iter_mut().flatten().filter(|h| h.name == name) {
                        h.contested = true;
                    }
                    let locks = &managers[mgr % managers.len()];
                    let mut opts = LockOptions::new()
                        .with_ttl(Duration::from_millis(ttl_ms))
                        .with_wait(Duration::from_millis(wait_ms))
                        .with_auto_extend(auto.is_some())
                        .with_fair(fair);
                    if let Some(Some(hold)) = auto {
                        opts = opts.with_max_hold(Duration::from_millis(hold));
                    }
                    let budget = Duration::from_millis(wait_ms) + one_call;
                    let out = if wait_ms == 0 {
                        call(
                            locks.try_lock_with(&names[name], opts),
                            cancel_ms,
                            budget,
                            "try_lock",
                        )
                        .await?
                    } else {
                        call(
                            locks.lock_with(&names[name], opts),
                            cancel_ms,
                            budget,
                            "lock_with",
                        )
                        .await?
                    };
                    let returned = Instant::now();
                    if let Some(Ok(guard)) = out {
                        // 3 ms of tolerance: the library can only promise validity at its
                        // own return, and this thread may be descheduled right after.
                        if guard.valid_until() + C_TOLERANCE <= returned {
                            return Err(fail(format!(
                                "(c) {context}: Ok(guard) with no validity left at return"
                            )));
                        }
                        slots[slot] = Some(Held {
                            token: token_prefix(&guard),
                            guard,
                            name,
                            tainted: false,
                            contested: false,
                            capped: matches!(auto, Some(Some(_))),
                            reported: None,
                        });
                    }
                }
                Step::Extend {
                    slot,
                    ttl_ms,
                    cancel_ms,
                } => {
                    if let Some(h) = &slots[slot] {
                        let out = call(
                            h.guard.extend(Duration::from_millis(ttl_ms)),
                            cancel_ms,
                            one_call,
                            "extend",
                        )
                        .await?;
                        let returned = Instant::now();
                        if matches!(out, Some(Ok(())))
                            && ttl_ms >= 50
                            && !h.capped
                            && h.guard.valid_until() + C_TOLERANCE <= returned
                        {
                            return Err(fail(format!(
                                "(c) {context}: extend returned Ok with no validity left"
                            )));
                        }
                    }
                }
                Step::TwoExtends {
                    slot,
                    first_ms,
                    second_ms,
                    gap_ms,
                    cancel_ms,
                } => {
                    if let Some(h) = &slots[slot] {
                        let both = async {
                            tokio::join!(h.guard.extend(Duration::from_millis(first_ms)), async {
                                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                                h.guard.extend(Duration::from_millis(second_ms)).await
                            })
                        };
                        call(
                            both,
                            cancel_ms,
                            one_call + Duration::from_millis(gap_ms),
                            "two extends",
                        )
                        .await?;
                    }
                }
                Step::Release { slot, cancel_ms } => {
                    if let Some(h) = slots[slot].take() {
                        call(h.guard.release(), cancel_ms, one_call, "release").await?;
                    }
                }
                Step::Drop { slot } => drop(slots[slot].take()),
                Step::Foreign { name, what } => {
                    let key = &keys[name];
                    match what {
                        Foreign::Del => {
                            let _: () = check.del(key).await.expect("DEL");
                        }
                        Foreign::SetOther => {
                            let _: () = redis::cmd("SET")
                                .arg(key)
                                .arg("foreign")
                                .arg("PX")
                                .arg(3_000)
                                .query_async(&mut check)
                                .await
                                .expect("SET");
                        }
                        Foreign::Hash => {
                            let _: () = redis::pipe()
                                .atomic()
                                .del(key)
                                .hset(key, "f", "v")
                                .pexpire(key, 3_000)
                                .query_async(&mut check)
                                .await
                                .expect("retype");
                        }
                        Foreign::ScriptFlush => {
                            let _: () = redis::cmd("SCRIPT")
                                .arg("FLUSH")
                                .query_async(&mut check)
                                .await
                                .expect("SCRIPT FLUSH");
                        }
                    }
                    if !matches!(what, Foreign::ScriptFlush) {
                        for h in slots.iter_mut().flatten().filter(|h| h.name == name) {
                            h.tainted = true;
                        }
                    }
                }
                Step::Sleep { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            }
            check_all(&mut slots, &keys, &mut check, &context).await?;
        }
        // Teardown: everything dropped, the foreign values removed, then nothing may be
        // left behind.
        hostile.clear_plan();
        drop(slots);
        drop(managers);
        drop(hostile);
        for key in &keys {
            let (kind, value, _, _) = server_view(&mut check, key).await;
            if kind == "hash" || value == "foreign" {
                let _: () = check.del(key).await.expect("DEL foreign value");
            }
        }
        if let Some(left) = baseline.left_behind(node, Duration::from_secs(6)).await {
            return Err(fail(format!("not settled after the case: {left}")));
        }
        Ok(())
    }

    /// Cases per run: `PROPTEST_CASES`, default 24.
    pub(super) fn config() -> Config {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(24);
        Config {
            cases,
            max_shrink_iters: 48,
            max_shrink_time: 120_000,
            failure_persistence: None,
            ..Config::default()
        }
    }

    pub(super) fn runner() -> TestRunner {
        TestRunner::new(config())
    }
}

/// Proptest schedules over one or two managers (one through the hostile connection with
/// random per-command delays, reorders and lost replies) and up to three guards on two lock
/// names; after every step the guards' beliefs are checked against the real server
/// (issue 9's (a)–(d)), and after every case that nothing is left behind.
#[test]
fn belief_never_exceeds_truth_under_random_schedules() {
    let outer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = outer.block_on(RedisNode::start());
    let mut runner = property::runner();
    let started = Instant::now();
    let result = runner.run(&property::case(), |case| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("case runtime");
        let out = rt.block_on(property::run(&node, case));
        rt.shutdown_timeout(Duration::from_secs(2));
        out
    });
    eprintln!(
        "belief property: {} cases in {:?}",
        property::config().cases,
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    drop(node);
    drop(outer);
}
