//! Locks on connection pools (features `deadpool` and `bb8`): every scenario runs on both
//! pools, against a real server, and checks that nothing is left behind.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Backoff, LockManager, LockManagerBuilder, LockOptions};
use redis::AsyncCommands;
use support::{Baseline, RedisNode, lease_key, unique_key};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Deadpool,
    Bb8,
}

type Bb8Pool = ::bb8::Pool<bb8_redis::RedisConnectionManager>;

/// One pool of either kind.
#[derive(Clone)]
enum Pool {
    Deadpool(deadpool_redis::Pool),
    Bb8(Bb8Pool),
}

/// A connection checked out of a [`Pool`] by the test itself.
enum Held {
    Deadpool(deadpool_redis::Connection),
    Bb8(::bb8::PooledConnection<'static, bb8_redis::RedisConnectionManager>),
}

impl Held {
    fn conn(&mut self) -> &mut redis::aio::MultiplexedConnection {
        match self {
            Held::Deadpool(c) => c,
            Held::Bb8(c) => c,
        }
    }
}

impl Pool {
    async fn new(kind: Kind, node: &RedisNode, max_size: usize) -> Pool {
        match kind {
            Kind::Deadpool => {
                let mut config = deadpool_redis::Config::from_url(node.url());
                config.pool = Some(deadpool_redis::PoolConfig::new(max_size));
                Pool::Deadpool(
                    config
                        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                        .expect("deadpool"),
                )
            }
            Kind::Bb8 => {
                let manager = bb8_redis::RedisConnectionManager::new(node.url()).expect("bb8");
                let pool = ::bb8::Pool::builder()
                    .max_size(u32::try_from(max_size).expect("small"))
                    // No reaper task: the test counts the runtime's tasks.
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .build(manager)
                    .await
                    .expect("bb8 pool");
                Pool::Bb8(pool)
            }
        }
    }

    fn manager(&self, command_timeout: Duration) -> LockManager {
        self.manager_from(LockManager::builder().with_command_timeout(command_timeout))
    }

    fn manager_from(&self, builder: LockManagerBuilder) -> LockManager {
        match self {
            Pool::Deadpool(pool) => builder.build_pool(pool.clone()),
            Pool::Bb8(pool) => builder.build_pool(pool.clone()),
        }
        .expect("manager on a pool")
    }

    async fn hold(&self) -> Held {
        match self {
            Pool::Deadpool(pool) => Held::Deadpool(pool.get().await.expect("checkout")),
            Pool::Bb8(pool) => Held::Bb8(pool.get_owned().await.expect("checkout")),
        }
    }

    /// `CLIENT ID` of the connection the pool hands out next.
    async fn client_id(&self) -> i64 {
        let mut held = self.hold().await;
        redis::cmd("CLIENT")
            .arg("ID")
            .query_async(held.conn())
            .await
            .expect("CLIENT ID")
    }
}

/// Acquire, extend, release and auto-extension through the pool.
async fn lock_extend_release_and_auto_extend(kind: Kind) {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let pool = Pool::new(kind, &node, 4).await;
    let locks = pool.manager(Duration::from_secs(2));
    let name = unique_key("pool");

    let guard = locks.lock(&name).await.expect("lock");
    assert!(check.exists::<_, bool>(lease_key(&name)).await.unwrap());
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());
    guard.extend(Duration::from_secs(60)).await.expect("extend");
    let pttl: i64 = check.pttl(lease_key(&name)).await.unwrap();
    assert!(pttl > 50_000, "extended on the server: {pttl} ms left");
    guard.release().await.expect("release");
    assert!(!check.exists::<_, bool>(lease_key(&name)).await.unwrap());

    let short = LockOptions::new()
        .with_ttl(Duration::from_millis(300))
        .with_auto_extend(true);
    let guard = locks.lock_with(&name, short).await.expect("lock");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(guard.is_held(), "auto-extended through the pool");
    let pttl: i64 = check.pttl(lease_key(&name)).await.unwrap();
    assert!(pttl > 0, "the key lives on: {pttl}");
    guard.release().await.expect("release");

    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// A non-atomic counter under a lock taken through a pool smaller than the crowd ends exact.
async fn mutual_exclusion(kind: Kind) {
    const TASKS: usize = 6;
    const CYCLES: usize = 30;
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    // Gone with the racy tasks that own them.
    let mut conns = Vec::new();
    for _ in 0..TASKS {
        conns.push(node.conn().await);
    }
    let pool = Pool::new(kind, &node, 3).await;
    let locks = pool.manager(Duration::from_secs(2));
    let name = unique_key("pool-counter");
    let counter = format!("{name}:value");
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            support::racy_increments(
                locks.clone(),
                name.clone(),
                counter.clone(),
                conn,
                CYCLES,
                support::contended(Duration::from_secs(60)),
            )
        })
        .collect();
    for task in tasks {
        task.await.expect("increments");
    }
    let total: u64 = check.get(&counter).await.unwrap();
    assert_eq!(total, (TASKS * CYCLES) as u64);
    let _: () = check.del(&counter).await.unwrap();

    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// Pool of one, its connection held: a typed, transient error within the command timeout,
/// never a hang; and locks work again once the connection is back.
async fn exhausted_pool_fails_in_time(kind: Kind) {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let pool = Pool::new(kind, &node, 1).await;
    let timeout = Duration::from_millis(300);
    let locks = pool.manager(timeout);
    let name = unique_key("pool-exhausted");
    let held = pool.hold().await;

    let started = Instant::now();
    let err = locks
        .try_lock(&name)
        .await
        .expect_err("no connection to be had");
    let took = started.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(20) && took < timeout + Duration::from_millis(700),
        "bounded by the command timeout: {took:?}"
    );
    assert!(err.is_redis() && err.is_transient(), "{err:?}");
    assert!(!err.is_held_by_other(), "{err:?}");
    assert!(err.to_string().contains("pool is exhausted"), "{err}");
    let exhausted = distlock::pool::exhausted(&err).expect("typed: PoolExhausted");
    assert!(exhausted.waited() >= timeout - Duration::from_millis(20));

    // A waiting call retries within its budget, then gives the same error.
    let wait = Duration::from_millis(700);
    let started = Instant::now();
    let err = locks
        .lock_with(&name, LockOptions::new().with_wait(wait))
        .await
        .expect_err("still no connection");
    let took = started.elapsed();
    assert!(
        took < wait + timeout + Duration::from_millis(700),
        "within the budget: {took:?}"
    );
    assert!(
        err.is_transient() && distlock::pool::is_exhausted(&err),
        "{err}"
    );

    drop(held);
    let guard = locks.try_lock(&name).await.expect("the connection is back");
    guard.release().await.expect("release");

    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// A server that accepts connections but does not answer (paused) with room in the pool:
/// a time-out within the command timeout that is not reported as an exhausted pool.
async fn a_connection_that_cannot_open_is_not_exhaustion(kind: Kind) {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let pool = Pool::new(kind, &node, 2).await;
    let timeout = Duration::from_millis(300);
    let locks = pool.manager(timeout);
    let name = unique_key("pool-paused");

    node.pause().await;
    let started = Instant::now();
    let err = locks.try_lock(&name).await.expect_err("no server answers");
    let took = started.elapsed();
    node.resume().await;
    assert!(
        took < timeout + Duration::from_millis(700),
        "bounded: {took:?}"
    );
    assert!(err.is_transient(), "{err:?}");
    assert!(!distlock::pool::is_exhausted(&err), "{err}");

    let guard = locks.try_lock(&name).await.expect("the server is back");
    guard.release().await.expect("release");
    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// The pooled connection is killed while a command waits on it: that call fails with a
/// connection error, and the pool replaces the connection for the next one.
async fn killed_connection_is_replaced(kind: Kind) {
    let node = RedisNode::start().await;
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let pool = Pool::new(kind, &node, 1).await;
    let locks = pool.manager(Duration::from_secs(3));
    let name = unique_key("pool-killed");
    let victim = pool.client_id().await;

    // Writes wait while the server is paused: the acquire sits on the pooled connection.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5_000)
        .arg("WRITE")
        .query_async(&mut check)
        .await
        .unwrap();
    let attempt = tokio::spawn({
        let locks = locks.clone();
        let name = name.clone();
        async move {
            let started = Instant::now();
            (locks.try_lock(&name).await, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(victim)
        .query_async(&mut check)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let (result, took) = attempt.await.unwrap();
    let err = result.expect_err("the connection died under the command");
    assert!(err.is_redis() && !err.is_held_by_other(), "{err:?}");
    assert!(!distlock::pool::is_exhausted(&err), "{err:?}");
    assert!(took < Duration::from_secs(2), "failed at once: {took:?}");
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut check)
        .await
        .unwrap();

    let guard = locks.try_lock(&name).await.expect("a fresh connection");
    guard.release().await.expect("release");
    assert_ne!(pool.client_id().await, victim, "the pool replaced it");

    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

/// With a client to subscribe with, a waiter on a pool is woken by the release, not by
/// polling; the subscription connection goes with the manager.
async fn notifications_through_a_client_of_their_own(kind: Kind) {
    let node = RedisNode::start().await;
    let baseline = Baseline::take(&node).await;
    let pool = Pool::new(kind, &node, 2).await;
    let locks = pool.manager_from(LockManager::builder().with_notify_via(node.client()));
    let name = unique_key("pool-notify");
    // Polling alone would try again only after 5 s.
    let slow_polling = LockOptions::new()
        .with_wait(Duration::from_secs(20))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        );

    let guard = locks.lock(&name).await.expect("lock");
    let waiter = tokio::spawn({
        let (locks, name) = (locks.clone(), name.clone());
        async move {
            let guard = locks.lock_with(&name, slow_polling).await;
            (guard, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    guard.release().await.expect("release");
    let (guard, at) = waiter.await.unwrap();
    guard.expect("the waiter's lock").release().await.unwrap();
    let handoff = at.duration_since(released);
    assert!(
        handoff < Duration::from_millis(1_500),
        "woken by the release: {handoff:?}"
    );

    drop(locks);
    drop(pool);
    baseline.assert_settled(&node, Duration::from_secs(5)).await;
}

macro_rules! on_both_pools {
    ($($scenario:ident),* $(,)?) => {
        mod deadpool {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Kind::Deadpool).await;
                }
            )*
        }
        mod bb8 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::Kind::Bb8).await;
                }
            )*
        }
    };
}

on_both_pools!(
    lock_extend_release_and_auto_extend,
    mutual_exclusion,
    exhausted_pool_fails_in_time,
    killed_connection_is_replaced,
    a_connection_that_cannot_open_is_not_exhaustion,
    notifications_through_a_client_of_their_own,
);
