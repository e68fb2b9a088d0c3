//! "Belief never exceeds truth": what a guard believes about its lease, checked against the
//! real server, with replies delayed, reordered and lost by a hostile connection
//! (tests/support/hostile.rs). Regression tests for issue 9, and the property test.

mod support;

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
/// not depend on the scripts' text).
#[derive(Debug, Clone, Default)]
struct Shas {
    acquire: String,
    extend: String,
    release: String,
}

impl Shas {
    fn is_acquire(&self, cmd: &CommandInfo) -> bool {
        cmd.sha.as_deref() == Some(self.acquire.as_str())
    }
    fn is_extend(&self, cmd: &CommandInfo) -> bool {
        cmd.sha.as_deref() == Some(self.extend.as_str())
    }
    /// Any other script: the renewal task's batch (and whatever else comes).
    fn is_renewal(&self, cmd: &CommandInfo) -> bool {
        cmd.sha
            .as_ref()
            .is_some_and(|sha| *sha != self.acquire && *sha != self.extend && *sha != self.release)
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
    let acquire = last();
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
        shas.acquire != shas.extend && shas.extend != shas.release,
        "three different scripts expected: {shas:?}"
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
    LockOptions::new().ttl(ttl).wait(Duration::ZERO)
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
    support::eventually(
        Duration::from_secs(5),
        "the key expires on the server",
        || {
            let mut check = check.clone();
            let key = key.clone();
            async move { pttl(&mut check, &key).await == -2 }
        },
    )
    .await;
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
async fn renewal_racing_a_shorter_extend_never_leaves_belief_above_the_server_ttl() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let (locks, hostile, shas) = hostile_manager(&node).await;
    let name = unique_key("renewal-vs-extend");
    let key = lease_key(&name);
    // Renewed every 200 ms with the old TTL of 600 ms.
    let guard = locks
        .try_lock_with(
            &name,
            ttl_opts(Duration::from_millis(600)).auto_extend(true),
        )
        .await
        .expect("lock");
    // The user's shorter extend leaves first but waits 250 ms on the slow connection:
    // at least one renewal (600 ms) runs on the server before it, and sets the later deadline.
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
    // And while renewal goes on.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert_belief_within_truth(&guard, &mut check, &key, "while renewal goes on").await;
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
    let check = node.conn().await;
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
    support::eventually(
        Duration::from_secs(3),
        "the attempt's lease is gone",
        || {
            let mut check = check.clone();
            let key = key.clone();
            async move { pttl(&mut check, &key).await == -2 }
        },
    )
    .await;
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
        .ttl(Duration::from_millis(100))
        .wait(Duration::from_secs(3));
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
        match locks.try_lock_with(&name, ttl_opts(MIN_TTL)).await {
            Ok(guard) => {
                let now = Instant::now();
                assert!(
                    guard.valid_until() > now,
                    "a lease at MIN_TTL {MIN_TTL:?} is born expired (is_held() == {})",
                    guard.is_held()
                );
                granted += 1;
                // Let it run out rather than race a release against a 10 ms TTL.
                std::mem::forget(guard);
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
// #7: one bad key in a renewal batch.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_retyped_key_does_not_break_renewal_of_the_other_leases() {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = plain_manager(&node).await;
    let ttl = Duration::from_millis(600); // renewed every 200 ms, both in one batch
    let (healthy_name, bad_name) = (unique_key("batch-healthy"), unique_key("batch-bad"));
    let opts = ttl_opts(ttl).auto_extend(true);
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
    // Several renewal periods later, the other lease is still held, and truly so.
    let until = Instant::now() + ttl * 4;
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
            .auto_extend(true)
            .max_hold(hold);
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
        support::eventually(
            Duration::from_secs(2),
            "the key is gone after max_hold",
            || {
                let mut check = check.clone();
                let key = key.clone();
                async move { pttl(&mut check, &key).await == -2 }
            },
        )
        .await;
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
        .try_lock_with(&name, ttl_opts(Duration::from_secs(3)).auto_extend(true))
        .await
        .expect("lock");
    guard
        .extend(Duration::from_millis(600))
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
    let locks = plain_manager(&node).await;
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
