//! Bad input gets a typed error before anything is sent, never a panic.

mod support;

use std::time::Duration;

use distlock::{Backoff, Error, LockManager, LockOptions, MAX_KEY_LEN, MAX_TTL};
use support::{RedisNode, unique_key};

fn rejected(result: distlock::Result<impl std::fmt::Debug>) -> &'static str {
    match result {
        Err(Error::InvalidArgument(arg)) => arg.what(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_invalid_input_gives_its_typed_error() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let key = unique_key("valid");

    assert_eq!(rejected(locks.lock("").await), "key");
    assert_eq!(rejected(locks.try_lock("").await), "key");
    let long = vec![b'k'; MAX_KEY_LEN + 1];
    assert_eq!(rejected(locks.lock(&long).await), "key");
    assert_eq!(rejected(locks.try_lock(&long).await), "key");

    let ttl = |d| LockOptions::new().with_ttl(d);
    assert_eq!(
        rejected(locks.lock_with(&key, ttl(Duration::ZERO)).await),
        "ttl"
    );
    assert_eq!(
        rejected(locks.lock_with(&key, ttl(Duration::from_micros(500))).await),
        "ttl"
    );
    assert_eq!(
        rejected(
            locks
                .lock_with(&key, ttl(MAX_TTL + Duration::from_secs(1)))
                .await
        ),
        "ttl"
    );
    assert_eq!(
        rejected(locks.lock_with(&key, ttl(Duration::MAX)).await),
        "ttl"
    );
    assert_eq!(
        rejected(locks.try_lock_with(&key, ttl(Duration::ZERO)).await),
        "ttl"
    );

    let wait = LockOptions::new().with_wait(Duration::MAX);
    assert_eq!(rejected(locks.lock_with(&key, wait).await), "wait");
    let backoff = LockOptions::new().with_backoff(Backoff::new().with_factor(f64::NAN));
    assert_eq!(rejected(locks.lock_with(&key, backoff).await), "backoff");

    // Nothing was left behind by any of the rejected calls: the key is free.
    let guard = locks.try_lock(&key).await.unwrap();
    assert_eq!(rejected(guard.extend(Duration::ZERO).await), "ttl");
    assert_eq!(rejected(guard.extend(Duration::MAX).await), "ttl");
    assert!(guard.is_held(), "a rejected extend leaves the lease alone");
    guard.release().await.unwrap();

    // The longest accepted name and TTL work end to end.
    let longest = vec![b'k'; MAX_KEY_LEN];
    let guard = locks.try_lock_with(&longest, ttl(MAX_TTL)).await.unwrap();
    guard.release().await.unwrap();
}

#[tokio::test]
async fn unparsable_urls_are_invalid_arguments() {
    for url in [
        "",
        "not a url",
        "http://127.0.0.1:6379",
        "redis://:99999999",
    ] {
        assert_eq!(rejected(LockManager::connect(url).await), "url", "{url:?}");
    }
}

#[tokio::test]
async fn bad_manager_settings_are_rejected() {
    let b = LockManager::builder;
    let url = "redis://127.0.0.1:1";
    assert_eq!(
        rejected(b().with_prefix(vec![b'p'; 257]).connect(url).await),
        "prefix"
    );
    assert_eq!(
        rejected(b().with_command_timeout(Duration::ZERO).connect(url).await),
        "timeout"
    );
    assert_eq!(
        rejected(b().with_connect_timeout(Duration::ZERO).connect(url).await),
        "timeout"
    );
    let bad = LockOptions::new().with_ttl(Duration::ZERO);
    assert_eq!(
        rejected(b().with_default_options(bad).connect(url).await),
        "ttl"
    );
}
