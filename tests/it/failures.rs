//! Redis down, unreachable or refusing: typed errors, bounded in time, never "contended".

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions};
use support::proxy::{Fault, FaultProxy};
use support::{RedisNode, free_port, unique_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_a_redis_error_not_a_timeout_or_contention() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("down");
    locks
        .try_lock(&name)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    node.stop().await;
    // A waiting call retries connection errors within its budget, then reports the last
    // one: a Redis error, never a timeout "held by another owner".
    let budget = Duration::from_millis(800);
    let opts = LockOptions::new().with_wait(budget);
    for _ in 0..3 {
        let started = Instant::now();
        match locks.lock_with(&name, opts).await {
            Err(Error::Redis(_)) => {}
            other => panic!("expected a Redis error, got {other:?}"),
        }
        assert!(
            started.elapsed() < budget + Duration::from_secs(3),
            "the error came by the budget"
        );
        match locks.try_lock(&name).await {
            Err(Error::Redis(_)) => {}
            other => panic!("expected a Redis error, got {other:?}"),
        }
    }

    // The manager reconnects by itself once the server is back.
    node.start_again().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match locks.try_lock(&name).await {
            Ok(guard) => {
                guard.release().await.unwrap();
                break;
            }
            Err(Error::Redis(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("expected recovery, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_gives_a_redis_timeout_within_the_command_timeout() {
    let node = RedisNode::start().await;
    let locks = LockManager::builder()
        .with_command_timeout(Duration::from_millis(300))
        .connect(&node.url())
        .await
        .unwrap();
    let name = unique_key("paused");
    let guard = locks.try_lock(&name).await.unwrap();

    node.pause().await;
    let started = Instant::now();
    let result = locks.try_lock(unique_key("other")).await;
    let elapsed = started.elapsed();
    let extend = guard.extend(Duration::from_secs(5)).await;
    node.resume().await;

    match result {
        Err(Error::Redis(e)) => assert!(e.is_timeout(), "a timeout, got {e}"),
        other => panic!("expected a Redis timeout, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_millis(1000),
        "bounded: {elapsed:?}"
    );
    assert!(matches!(extend, Err(Error::Redis(_))), "got {extend:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_closed_port_fails_with_a_redis_error_naming_the_url_and_cause() {
    let port = free_port();
    let url = format!("redis://app:hunter2@127.0.0.1:{port}");
    let started = Instant::now();
    let result = LockManager::builder()
        .with_connect_timeout(Duration::from_secs(2))
        .connect(&url)
        .await;
    assert!(started.elapsed() < Duration::from_millis(2500));
    let err = match result {
        Err(err @ Error::Redis(_)) => err,
        other => panic!("expected a Redis error, got {other:?}"),
    };
    let text = err.to_string();
    assert!(
        text.contains(&format!("redis://app:***@127.0.0.1:{port}")),
        "the URL, password redacted: {text}"
    );
    assert!(!text.contains("hunter2"), "no password: {text}");
    assert!(
        text.contains("is the Redis server running"),
        "the likely cause: {text}"
    );
    assert!(err.is_transient(), "still a connection error: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_server_that_never_answers_times_out_as_a_redis_error() {
    // The proxy accepts the connection and answers nothing: the handshake hangs until our
    // connect timeout.
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let result = LockManager::builder()
        .with_connect_timeout(Duration::from_millis(500))
        .connect(&proxy.url())
        .await;
    match result {
        Err(Error::Redis(_)) => {}
        other => panic!("expected a Redis error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_redis_error() {
    let node = RedisNode::start_with(&["--requirepass", "right"]).await;
    let url = format!("redis://:wrong@127.0.0.1:{}", node.port());
    let result = LockManager::connect(&url).await;
    match result {
        Err(Error::Redis(_)) => {}
        other => panic!("expected a Redis error, got {other:?}"),
    }
    let ok = LockManager::connect(&format!("redis://:right@127.0.0.1:{}", node.port()))
        .await
        .unwrap();
    ok.try_lock("auth").await.unwrap().release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_holding_another_type_is_a_redis_error() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let name = unique_key("wrongtype");
    let mut raw = node.conn().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{}{{{name}}}:fence", distlock::DEFAULT_PREFIX))
        .arg("f")
        .arg("v")
        .query_async(&mut raw)
        .await
        .unwrap();
    // The fence counter is only read by a fenced acquire.
    let fenced = distlock::LockOptions::new().with_fencing(true);
    match locks.try_lock_with(&name, fenced).await {
        Err(Error::Redis(e)) => assert!(e.to_string().contains("WRONGTYPE"), "{e}"),
        other => panic!("expected a Redis error, got {other:?}"),
    }
    // A hash at the lease key itself: a Redis error with or without fencing.
    let other = unique_key("wrongtype-lease");
    let _: () = redis::cmd("HSET")
        .arg(format!("{}{{{other}}}", distlock::DEFAULT_PREFIX))
        .arg("f")
        .arg("v")
        .query_async(&mut raw)
        .await
        .unwrap();
    for options in [distlock::LockOptions::new(), fenced] {
        match locks.try_lock_with(&other, options).await {
            Err(Error::Redis(e)) => assert!(e.to_string().contains("WRONGTYPE"), "{e}"),
            other => panic!("expected a Redis error, got {other:?}"),
        }
    }
}
