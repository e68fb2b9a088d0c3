//! Release notifications and waits under faults: subscription connections that leak or
//! hang, ACL users without channel permission (Redis 7's default), waits cancelled while
//! subscribing, connections killed during a wait, and a `rediss://` URL without TLS
//! support. Regression tests for issue 9, items 2, 3, 4, 5, 10, 13 and 14.
//!
//! Every scenario counts what the server sees (`CLIENT LIST`, `PUBSUB CHANNELS`) on one
//! admin connection opened at the start, so the counting itself adds nothing.

use crate::support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions};
use rand::RngExt;
use redis::aio::MultiplexedConnection;
use support::proxy::{Fault, FaultProxy};
use support::{
    Baseline, RedisNode, command_calls, eventually, free_port, lease_key, subscribed_channels,
    unique_key,
};

/// The slack the contract allows a wait past its budget (item 4).
const BUDGET_SLACK: Duration = Duration::from_millis(250);
/// How long a dropped manager may take to close what it opened (item 2).
const SETTLE: Duration = Duration::from_secs(2);
/// A call that has not returned after this is hung, whatever its bound.
const HANG: Duration = Duration::from_secs(30);

/// One client as `CLIENT LIST` shows it.
#[derive(Debug, Clone)]
struct ClientInfo {
    id: u64,
    user: String,
}

async fn clients(admin: &mut MultiplexedConnection) -> Vec<ClientInfo> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(admin)
        .await
        .expect("CLIENT LIST");
    list.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or_default()
                    .to_owned()
            };
            ClientInfo {
                id: field("id").parse().expect("client id"),
                user: field("user"),
            }
        })
        .collect()
}

async fn client_count(admin: &mut MultiplexedConnection) -> usize {
    clients(admin).await.len()
}

async fn clients_of(admin: &mut MultiplexedConnection, user: &str) -> usize {
    clients(admin)
        .await
        .iter()
        .filter(|c| c.user == user)
        .count()
}

async fn key_exists(admin: &mut MultiplexedConnection, name: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(lease_key(name))
        .query_async::<u32>(admin)
        .await
        .expect("EXISTS")
        == 1
}

/// The lock `name` held by an owner outside any manager of the test, for a minute.
async fn hold_elsewhere(admin: &mut MultiplexedConnection, name: &str) {
    let _: () = redis::cmd("SET")
        .arg(lease_key(name))
        .arg("a-foreign-token")
        .arg("PX")
        .arg(60_000)
        .query_async(admin)
        .await
        .expect("SET a foreign lease");
}

/// Deletes what `hold_elsewhere` (or a test) put at these locks' keys.
async fn delete_keys(admin: &mut MultiplexedConnection, names: &[String]) {
    let keys: Vec<String> = names.iter().map(|n| lease_key(n)).collect();
    let _: () = redis::cmd("DEL")
        .arg(keys)
        .query_async(admin)
        .await
        .expect("DEL");
}

/// Waits until the server has a subscriber on some distlock channel.
async fn until_subscribed(admin: &MultiplexedConnection) {
    let admin = admin.clone();
    eventually(Duration::from_secs(5), "a waiter subscribed", move || {
        let mut admin = admin.clone();
        async move { !subscribed_channels(&mut admin).await.is_empty() }
    })
    .await;
}

/// Polls `observe` every 10 ms until `done` says yes; panics with `what` and the last
/// observation after `limit`.
async fn settles<T, Fut>(
    limit: Duration,
    what: &str,
    mut observe: impl FnMut() -> Fut,
    done: impl Fn(&T) -> bool,
) where
    T: std::fmt::Debug,
    Fut: Future<Output = T>,
{
    let deadline = Instant::now() + limit;
    loop {
        let seen = observe().await;
        if done(&seen) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not within {limit:?}: {what}; last seen: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the server has no subscriber on any distlock channel.
async fn until_no_channel(admin: &MultiplexedConnection, within: Duration) {
    settles(
        within,
        "no distlock channel subscribed (count)",
        || {
            let mut admin = admin.clone();
            async move { subscribed_channels(&mut admin).await.len() }
        },
        |channels| *channels == 0,
    )
    .await;
}

/// Waits until the server counts `expected` clients (the admin's included).
async fn until_clients(admin: &MultiplexedConnection, expected: usize, within: Duration) {
    settles(
        within,
        &format!("client connections back to {expected}"),
        || {
            let mut admin = admin.clone();
            async move { client_count(&mut admin).await }
        },
        |count| *count <= expected,
    )
    .await;
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// A wait that polling cannot explain: a fixed 5 s between attempts.
fn slow_polling(wait: Duration) -> LockOptions {
    fixed_backoff(wait, Duration::from_secs(5))
}

fn fixed_backoff(wait: Duration, step: Duration) -> LockOptions {
    LockOptions::new().with_wait(wait).with_backoff(
        Backoff::new()
            .with_base(step)
            .with_cap(step)
            .with_jitter(false)
            .without_max_attempts(),
    )
}

async fn acl(admin: &mut MultiplexedConnection, rule: &[&str]) {
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(rule)
        .query_async(admin)
        .await
        .expect("ACL SETUSER");
}

/// A user made the Redis 7 default way: every key and command, no channel.
async fn user_without_channels(node: &RedisNode, admin: &mut MultiplexedConnection) -> String {
    acl(
        admin,
        &["nochan", "on", ">pw", "~*", "+@all", "resetchannels"],
    )
    .await;
    format!("redis://nochan:pw@127.0.0.1:{}", node.port())
}

/// A user that may use every channel.
async fn user_with_all_channels(node: &RedisNode, admin: &mut MultiplexedConnection) -> String {
    acl(admin, &["allchan", "on", ">pw", "~*", "+@all", "&*"]).await;
    format!("redis://allchan:pw@127.0.0.1:{}", node.port())
}

// ---------------------------------------------------------------------------------------
// Item 2: one subscription connection per manager, closed with the manager.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_managers_close_their_subscription_connections_and_reader_tasks() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let name = unique_key("dropped");
    hold_elsewhere(&mut admin, &name).await;
    let baseline = Baseline::take(&node).await;
    let clients_before = client_count(&mut admin).await;
    let tasks_before = alive_tasks();

    for round in 0..20 {
        let locks = LockManager::connect(&node.url()).await.unwrap();
        let waiter = {
            let (locks, name) = (locks.clone(), name.clone());
            tokio::spawn(async move {
                locks
                    .lock_with(&name, slow_polling(Duration::from_millis(600)))
                    .await
            })
        };
        // The waiter subscribed: the manager has a subscription connection to close.
        until_subscribed(&admin).await;
        let got = waiter.await.unwrap();
        assert!(
            matches!(got, Err(Error::Timeout { .. })),
            "round {round}: {got:?}"
        );
        drop(locks);
    }

    until_no_channel(&admin, SETTLE).await;
    until_clients(&admin, clients_before, SETTLE).await;
    settles(
        SETTLE,
        &format!("the runtime's alive tasks back to {tasks_before}"),
        || async { alive_tasks() },
        |alive| *alive <= tasks_before,
    )
    .await;
    delete_keys(&mut admin, &[name]).await;
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channel_permission_waiters_open_at_most_one_extra_connection() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let url = user_without_channels(&node, &mut admin).await;
    let name = unique_key("nochan-pile");
    hold_elsewhere(&mut admin, &name).await;
    let baseline = Baseline::take(&node).await;

    let locks = LockManager::connect(&url).await.unwrap();
    let own = clients_of(&mut admin, "nochan").await;
    assert_eq!(own, 1, "the manager's own connection");
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let (locks, name) = (locks.clone(), name.clone());
            tokio::spawn(async move {
                locks
                    .lock_with(
                        &name,
                        fixed_backoff(Duration::from_secs(3), Duration::from_millis(50)),
                    )
                    .await
            })
        })
        .collect();

    // Sample the server's view while they wait.
    let mut most = own;
    while waiters.iter().any(|w| !w.is_finished()) {
        most = most.max(clients_of(&mut admin, "nochan").await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for waiter in waiters {
        let got = waiter.await.unwrap();
        assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
    }
    assert!(
        most <= own + 1,
        "4 waiters opened {} connections beside the manager's own at one time",
        most - own
    );

    drop(locks);
    settles(
        SETTLE,
        "no connection of the user left",
        || {
            let mut admin = admin.clone();
            async move { clients_of(&mut admin, "nochan").await }
        },
        |count| *count == 0,
    )
    .await;
    delete_keys(&mut admin, &[name]).await;
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// ACL as deployed (items 2 and 3): releases are correct without channel permission, and
// waiters then poll; with every channel permitted, waiters are woken.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channel_permission_release_succeeds_and_deletes_the_key() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let url = user_without_channels(&node, &mut admin).await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&url).await.unwrap();
    let name = unique_key("nochan-release");

    let guard = locks.lock(&name).await.unwrap();
    assert!(key_exists(&mut admin, &name).await);
    let released = guard.release().await;
    assert!(
        released.is_ok(),
        "release under a user without channel permission: {released:?}"
    );
    assert!(!key_exists(&mut admin, &name).await, "the lease is gone");

    // The same through try_lock, with an extend in between.
    let guard = locks.try_lock(&name).await.unwrap();
    guard.extend(Duration::from_secs(5)).await.unwrap();
    let released = guard.release().await;
    assert!(released.is_ok(), "second release: {released:?}");
    assert!(!key_exists(&mut admin, &name).await, "the lease is gone");
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_channel_permission_a_waiter_polls_and_acquires_after_the_release() {
    const STEP: Duration = Duration::from_millis(300);
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let url = user_without_channels(&node, &mut admin).await;
    let baseline = Baseline::take(&node).await;
    let holder = LockManager::connect(&url).await.unwrap();
    let waiters = LockManager::connect(&url).await.unwrap();
    let name = unique_key("nochan-poll");

    let guard = holder.lock(&name).await.unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            let got = waiters
                .lock_with(&name, fixed_backoff(Duration::from_secs(10), STEP))
                .await;
            (got, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );
    let released_at = Instant::now();
    let released = guard.release().await;
    assert!(released.is_ok(), "release: {released:?}");

    let (got, at) = tokio::time::timeout(HANG, waiter)
        .await
        .expect("the waiter hung")
        .unwrap();
    let got = got.expect("the waiter acquires once the lock is free");
    // Polling every 300 ms finds the free lock within a step or two.
    let handoff = at.duration_since(released_at);
    assert!(
        handoff < STEP * 2 + Duration::from_millis(500),
        "handoff took {handoff:?} with a {STEP:?} poll step"
    );
    got.release().await.unwrap();
    assert!(!key_exists(&mut admin, &name).await);
    assert!(subscribed_channels(&mut admin).await.is_empty());
    drop((holder, waiters));
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_channels_permitted_releases_succeed_and_wake_the_waiter() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let url = user_with_all_channels(&node, &mut admin).await;
    let baseline = Baseline::take(&node).await;
    let holder = LockManager::connect(&url).await.unwrap();
    let waiters = LockManager::connect(&url).await.unwrap();
    let name = unique_key("allchan");

    let guard = holder.lock(&name).await.unwrap();
    let waiter = {
        let (waiters, name) = (waiters.clone(), name.clone());
        tokio::spawn(async move {
            let got = waiters
                .lock_with(&name, slow_polling(Duration::from_secs(20)))
                .await;
            (got, Instant::now())
        })
    };
    until_subscribed(&admin).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released_at = Instant::now();
    let released = guard.release().await;
    assert!(released.is_ok(), "release: {released:?}");

    let (got, at) = tokio::time::timeout(HANG, waiter)
        .await
        .expect("the waiter hung")
        .unwrap();
    let handoff = at.duration_since(released_at);
    // Polling would take 5 s; a notification takes a round trip or two.
    assert!(
        handoff < Duration::from_secs(1),
        "handoff took {handoff:?}: the waiter was not woken"
    );
    let released = got.unwrap().release().await;
    assert!(released.is_ok(), "the waiter's release: {released:?}");
    assert!(!key_exists(&mut admin, &name).await);
    until_no_channel(&admin, SETTLE).await;
    drop((holder, waiters));
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// Item 4: a hanging subscription link never holds a waiter past its budget.
// ---------------------------------------------------------------------------------------

/// A manager whose leases live on a direct connection and whose subscription goes through
/// `proxy`.
async fn manager_notified_via(node: &RedisNode, proxy: &FaultProxy) -> LockManager {
    let notify = redis::Client::open(proxy.url()).unwrap();
    LockManager::builder()
        .with_notify_via(notify)
        .build(node.conn().await)
        .unwrap()
}

/// Spawns a waiter with a 1 s budget; it reports what it got and how long it took.
fn one_second_waiter(
    locks: &LockManager,
    name: &str,
) -> tokio::task::JoinHandle<(distlock::Result<distlock::LockGuard>, Duration)> {
    let (locks, name) = (locks.clone(), name.to_owned());
    tokio::spawn(async move {
        let started = Instant::now();
        let got = locks
            .lock_with(&name, LockOptions::new().with_wait(Duration::from_secs(1)))
            .await;
        (got, started.elapsed())
    })
}

async fn assert_each_returned_by_budget(
    waiters: Vec<tokio::task::JoinHandle<(distlock::Result<distlock::LockGuard>, Duration)>>,
) {
    let mut took = Vec::new();
    for waiter in waiters {
        let (got, elapsed) = tokio::time::timeout(HANG, waiter)
            .await
            .expect("a waiter hung")
            .unwrap();
        assert!(matches!(got, Err(Error::Timeout { .. })), "{got:?}");
        took.push(elapsed);
    }
    let bound = Duration::from_secs(1) + BUDGET_SLACK;
    assert!(
        took.iter().all(|t| *t <= bound),
        "waiters with a 1 s budget returned after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_return_by_their_budget_when_the_subscription_link_hangs_mid_wait() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let name = unique_key("link-hangs");
    hold_elsewhere(&mut admin, &name).await;
    let baseline = Baseline::take(&node).await;
    let proxy = FaultProxy::start(node.port()).await;
    let locks = manager_notified_via(&node, &proxy).await;

    let waiters: Vec<_> = (0..4).map(|_| one_second_waiter(&locks, &name)).collect();
    until_subscribed(&admin).await;
    // The subscription link dies and every new one hangs: waiters that re-subscribe
    // find a server that accepts and never answers.
    proxy.set(Fault::Blackhole);
    proxy.reset_connections();
    assert_each_returned_by_budget(waiters).await;
    drop(locks);
    drop(proxy);
    delete_keys(&mut admin, &[name]).await;
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_queued_behind_a_hanging_subscribe_return_by_their_budget() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let name = unique_key("subscribe-hangs");
    hold_elsewhere(&mut admin, &name).await;
    let baseline = Baseline::take(&node).await;
    let proxy = FaultProxy::start(node.port()).await;
    proxy.set(Fault::Blackhole);
    let locks = manager_notified_via(&node, &proxy).await;

    let mut waiters = Vec::new();
    for _ in 0..4 {
        waiters.push(one_second_waiter(&locks, &name));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_each_returned_by_budget(waiters).await;
    drop(locks);
    drop(proxy);
    delete_keys(&mut admin, &[name]).await;
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// Item 5: at least one attempt, always.
// ---------------------------------------------------------------------------------------

/// Acquire commands the server ran: the plain `SET NX` (and fenced acquire scripts).
async fn acquire_calls(admin: &mut MultiplexedConnection) -> u64 {
    command_calls(admin, "set").await
        + command_calls(admin, "evalsha").await
        + command_calls(admin, "eval").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_attempt_call_attempts_even_while_another_task_of_the_manager_waits() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("one-attempt");
    hold_elsewhere(&mut admin, &name).await;

    // Another task of the same manager queues on the key and sleeps for long.
    let queued = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move {
            locks
                .lock_with(&name, slow_polling(Duration::from_secs(30)))
                .await
        })
    };
    until_subscribed(&admin).await;

    let mut wrong = Vec::new();
    for (what, options) in [
        ("wait 0", LockOptions::new().with_wait(Duration::ZERO)),
        (
            "max_attempts(1)",
            LockOptions::new()
                .with_wait(Duration::from_secs(5))
                .with_backoff(Backoff::new().with_max_attempts(1)),
        ),
    ] {
        let calls_before = acquire_calls(&mut admin).await;
        let started = Instant::now();
        let got = locks.lock_with(&name, options).await;
        let took = started.elapsed();
        let sent = acquire_calls(&mut admin).await - calls_before;
        match got {
            Err(Error::Timeout { attempts, .. }) if attempts >= 1 && sent >= 1 => {}
            other => wrong.push(format!(
                "held, {what}: {other:?} after {took:?}, {sent} acquire commands reached the server"
            )),
        }
        if took >= Duration::from_secs(1) {
            wrong.push(format!("{what}: a single attempt took {took:?}"));
        }
    }

    queued.abort();
    if let Ok(Ok(guard)) = queued.await {
        guard.release().await.unwrap();
    }

    // The holder's lease vanishes without a release message: the queued task sleeps on,
    // the lock is free, and a single attempt takes it. A fresh lock per case, so the
    // release of one case cannot wake the queued task of the next.
    for (what, options) in [
        ("wait 0", LockOptions::new().with_wait(Duration::ZERO)),
        (
            "max_attempts(1)",
            LockOptions::new().with_backoff(Backoff::new().with_max_attempts(1)),
        ),
    ] {
        let name = unique_key("one-attempt-free");
        hold_elsewhere(&mut admin, &name).await;
        let queued = {
            let (locks, name) = (locks.clone(), name.clone());
            tokio::spawn(async move {
                locks
                    .lock_with(&name, slow_polling(Duration::from_secs(30)))
                    .await
            })
        };
        until_subscribed(&admin).await;
        let _: () = redis::cmd("DEL")
            .arg(lease_key(&name))
            .query_async(&mut admin)
            .await
            .unwrap();
        let got = locks.lock_with(&name, options).await;
        queued.abort();
        if let Ok(Ok(guard)) = queued.await {
            guard.release().await.unwrap();
        }
        match got {
            Ok(guard) => guard.release().await.unwrap(),
            Err(e) => wrong.push(format!("free, {what}: {e:?}")),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    delete_keys(&mut admin, &[name]).await;
    drop(locks);
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// Item 10: no subscription outlives its last waiter, whatever is cancelled when.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_cancelled_at_random_points_leave_no_channel_subscribed() {
    const CALLS: usize = 400;
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let names: Vec<String> = (0..CALLS).map(|_| unique_key("cancelled")).collect();
    for name in &names {
        hold_elsewhere(&mut admin, name).await;
    }
    let cuts: Vec<Duration> = {
        let mut rng = rand::rng();
        (0..CALLS)
            .map(|_| Duration::from_micros(rng.random_range(0..1500)))
            .collect()
    };

    let mut cut = 0;
    for (name, after) in names.iter().zip(&cuts) {
        let call = locks.lock_with(name, LockOptions::new().with_wait(Duration::from_secs(10)));
        match tokio::time::timeout(*after, call).await {
            Err(_) => cut += 1,
            Ok(other) => panic!("a held lock answered {other:?} within {after:?}"),
        }
    }
    assert_eq!(cut, CALLS);

    until_no_channel(&admin, SETTLE).await;
    drop(locks);
    delete_keys(&mut admin, &names).await;
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// Item 13: a `rediss://` URL without TLS support is a typed error, never a panic.
// ---------------------------------------------------------------------------------------

/// Runs `connect` in its own task: a panic shows as a failed join, not as this test's.
async fn connect_without_panic(
    what: &str,
    connect: impl Future<Output = distlock::Result<LockManager>> + Send + 'static,
) -> Error {
    let joined = tokio::time::timeout(HANG, tokio::spawn(connect))
        .await
        .unwrap_or_else(|_| panic!("{what}: hung"));
    match joined {
        Err(e) if e.is_panic() => panic!("{what} panicked: {e}"),
        Err(e) => panic!("{what}: task failed: {e}"),
        Ok(Ok(_)) => panic!("{what}: a TLS connection to a plain-text server succeeded"),
        Ok(Err(e)) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_returns_an_error_not_a_panic() {
    // A plain-text server behind the TLS URL: no handshake can succeed, with or without
    // TLS support compiled in.
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let url = format!("rediss://127.0.0.1:{}", node.port());
    let error = connect_without_panic("LockManager::connect", async move {
        LockManager::connect(&url).await
    })
    .await;
    match &error {
        Error::InvalidArgument(bad) => assert_eq!(bad.what(), "url", "{error}"),
        Error::Redis(_) => {}
        other => panic!("unexpected error {other:?}"),
    }
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redlock_over_rediss_urls_returns_an_error_not_a_panic() {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let urls: Vec<String> = [node.port(), free_port(), free_port()]
        .iter()
        .map(|port| format!("rediss://127.0.0.1:{port}"))
        .collect();
    let error = connect_without_panic("connect_redlock", async move {
        LockManager::builder().connect_redlock(urls).await
    })
    .await;
    match &error {
        Error::InvalidArgument(bad) => assert_eq!(bad.what(), "url", "{error}"),
        Error::Redis(_) | Error::Quorum(_) => {}
        other => panic!("unexpected error {other:?}"),
    }
    baseline.assert_settled(&node, SETTLE).await;
}

// ---------------------------------------------------------------------------------------
// Item 14: connection-level errors inside a wait are retried within the budget;
// server-answered errors return at once.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_survives_its_connections_being_killed_and_acquires_after_the_release() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("killed");
    let guard = holder
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(10)))
        .await
        .unwrap();
    // Everything connected so far survives: the admin and the holder.
    let survivors: HashSet<u64> = clients(&mut admin).await.iter().map(|c| c.id).collect();

    let locks = LockManager::connect(&node.url()).await.unwrap();
    let waiter = {
        let (locks, name) = (locks.clone(), name.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let got = locks
                .lock_with(&name, LockOptions::new().with_wait(Duration::from_secs(5)))
                .await;
            (got, started.elapsed())
        })
    };
    until_subscribed(&admin).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Kill every connection of the waiting manager, as `CLIENT KILL TYPE normal` and a
    // failover would.
    let mut killed = 0;
    for client in clients(&mut admin).await {
        if !survivors.contains(&client.id) {
            let n: u32 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(client.id)
                .query_async(&mut admin)
                .await
                .unwrap();
            killed += n;
        }
    }
    assert!(killed >= 1, "the waiting manager's connections were killed");

    tokio::time::sleep(Duration::from_millis(300)).await;
    if waiter.is_finished() {
        let (got, took) = waiter.await.unwrap();
        panic!("the wait ended early, after {took:?}: {got:?}");
    }
    guard.release().await.unwrap();

    let (got, took) = tokio::time::timeout(HANG, waiter)
        .await
        .expect("the waiter hung")
        .unwrap();
    let got = got.unwrap_or_else(|e| panic!("the wait gave up after {took:?}: {e:?}"));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    got.release().await.unwrap();
    assert!(!key_exists(&mut admin, &name).await);
    drop((holder, locks));
    baseline.assert_settled(&node, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answered_error_inside_a_wait_returns_at_once() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&node.url()).await.unwrap();

    // WRONGTYPE: the lock key holds a hash.
    let name = unique_key("wrongtype");
    let _: () = redis::cmd("HSET")
        .arg(lease_key(&name))
        .arg("field")
        .arg("value")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    let got = locks
        .lock_with(&name, LockOptions::new().with_wait(Duration::from_secs(5)))
        .await;
    let took = started.elapsed();
    match &got {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("WRONGTYPE"), "{e}"),
        other => panic!("expected WRONGTYPE, got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "WRONGTYPE took {took:?}");

    // NOPERM: a user that may not touch the lock's keys.
    acl(&mut admin, &["otherkeys", "on", ">pw", "~other:*", "+@all"]).await;
    let url = format!("redis://otherkeys:pw@127.0.0.1:{}", node.port());
    let restricted = LockManager::connect(&url).await.unwrap();
    let started = Instant::now();
    let got = restricted
        .lock_with(
            unique_key("noperm"),
            LockOptions::new().with_wait(Duration::from_secs(5)),
        )
        .await;
    let took = started.elapsed();
    match &got {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("NOPERM"), "{e}"),
        other => panic!("expected NOPERM, got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "NOPERM took {took:?}");
    drop((locks, restricted));
    delete_keys(&mut admin, &[name]).await;
    baseline.assert_settled(&node, SETTLE).await;
}

/// One thread, so the capturing subscriber (thread-local default) sees the subscription
/// task's events too.
#[tokio::test(flavor = "current_thread")]
async fn without_channel_permission_notifications_turn_off_with_one_warning() {
    let capture = support::logs::Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    let url = user_without_channels(&node, &mut admin).await;
    let holder = LockManager::connect(&node.url()).await.unwrap();
    let locks = LockManager::connect(&url).await.unwrap();
    let quick = LockOptions::new()
        .with_wait(Duration::from_millis(300))
        .with_backoff(Backoff::new().with_cap(Duration::from_millis(50)));
    // Three waits, one after the other, on a lock held elsewhere: each would subscribe.
    let names: Vec<String> = (0..3).map(|_| unique_key("one-warning")).collect();
    for name in &names {
        let guard = holder.try_lock(name).await.unwrap();
        match locks.lock_with(name, quick).await {
            Err(Error::Timeout { .. }) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
        guard.release().await.unwrap();
    }
    let warnings = capture.find(tracing::Level::WARN, "refuses release notifications");
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    drop((holder, locks));
}
