//! Bad input and hostile server state: typed errors or correct behaviour, never a panic.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use distlock::{
    Backoff, Error, LockManager, LockOptions, MAX_KEY_LEN, MAX_PREFIX_LEN, MAX_TTL, MIN_TTL,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis::AsyncCommands;
use support::{RedisNode, lease_key, unique_key};

/// The name of the argument an `InvalidArgument` result names; panics on anything else.
fn rejected(result: distlock::Result<impl std::fmt::Debug>) -> &'static str {
    match result {
        Err(Error::InvalidArgument(arg)) => arg.what(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Property cases per run: each is a full lock, extend and release against the server.
const CASES: u32 = 1000;

/// Each field is usually fine and sometimes hostile, so that both the rejections and the
/// leases taken with odd but valid values get exercised.
fn keys() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        1 => Just(vec![b'k'; 1 << 20]),
        3 => proptest::collection::vec(any::<u8>(), 1..64),
        2 => proptest::collection::vec(any::<u8>(), MAX_KEY_LEN - 2..MAX_KEY_LEN + 3),
        3 => "[{}\\n\\r\\t :*?\\[\\]a-z]{1,40}".prop_map(String::into_bytes),
        3 => "\\PC{1,40}".prop_map(String::into_bytes),
    ]
}

fn hostile_durations() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_nanos(1)),
        Just(MIN_TTL - Duration::from_nanos(1)),
        Just(MIN_TTL),
        Just(MAX_TTL),
        Just(MAX_TTL + Duration::from_nanos(1)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_secs),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

fn durations() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => (1u64..5_000).prop_map(Duration::from_millis),
        1 => hostile_durations(),
    ]
}

fn factors() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 1.0f64..10.0,
        1 => prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(-1.0),
            Just(0.0),
            Just(0.5),
            Just(f64::MAX),
        ],
    ]
}

#[derive(Debug, Clone)]
struct Input {
    key: Vec<u8>,
    prefix: Vec<u8>,
    ttl: Duration,
    wait: Duration,
    base: Duration,
    cap: Duration,
    factor: f64,
    max_attempts: Option<u32>,
    auto_extend: bool,
    max_hold: Option<Duration>,
    extend_ttl: Duration,
}

fn inputs() -> impl Strategy<Value = Input> {
    (
        keys(),
        prop_oneof![
            2 => Just(Vec::new()),
            6 => proptest::collection::vec(any::<u8>(), 0..16),
            1 => Just(vec![b'p'; MAX_PREFIX_LEN + 1]),
        ],
        (durations(), durations(), durations(), durations()),
        factors(),
        proptest::option::weighted(0.2, prop_oneof![Just(0u32), 1u32..4, Just(u32::MAX)]),
        any::<bool>(),
        proptest::option::of(durations()),
        durations(),
    )
        .prop_map(
            |(
                key,
                prefix,
                (ttl, wait, base, cap),
                factor,
                max_attempts,
                auto_extend,
                max_hold,
                extend_ttl,
            )| Input {
                key,
                prefix,
                ttl,
                wait,
                base,
                cap,
                factor,
                max_attempts,
                auto_extend,
                max_hold,
                extend_ttl,
            },
        )
}

/// The arguments the documented rules reject, by the name `InvalidArgument::what` gives.
fn invalid_fields(input: &Input) -> Vec<&'static str> {
    let mut bad = Vec::new();
    // A name starting with `}` would leave the Redis Cluster hash tag empty.
    if input.key.is_empty() || input.key.len() > MAX_KEY_LEN || input.key[0] == b'}' {
        bad.push("key");
    }
    let empty_tag = input
        .prefix
        .iter()
        .position(|&b| b == b'{')
        .is_some_and(|open| input.prefix.get(open + 1) == Some(&b'}'));
    if input.prefix.len() > MAX_PREFIX_LEN || empty_tag {
        bad.push("prefix");
    }
    if input.max_hold.is_some_and(|hold| hold < MIN_TTL) {
        bad.push("max_hold");
    }
    if input.ttl < MIN_TTL || input.ttl > MAX_TTL {
        bad.push("ttl");
    }
    if Instant::now().checked_add(input.wait).is_none() {
        bad.push("wait");
    }
    if input.base.is_zero()
        || !input.factor.is_finite()
        || input.factor < 1.0
        || input.cap < input.base
        || input.max_attempts == Some(0)
    {
        bad.push("backoff");
    }
    bad
}

fn ttl_valid(ttl: Duration) -> bool {
    (MIN_TTL..=MAX_TTL).contains(&ttl)
}

#[test]
fn any_key_and_option_values_give_a_typed_error_or_a_working_lease() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let node = rt.block_on(RedisNode::start());
    let url = node.url();
    let tried = AtomicU64::new(0);
    let rejected = AtomicU64::new(0);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&inputs(), |input| {
            tried.fetch_add(1, Ordering::Relaxed);
            let bad = invalid_fields(&input);
            rt.block_on(async {
                let mut backoff = Backoff::new()
                    .with_base(input.base)
                    .with_cap(input.cap)
                    .with_factor(input.factor);
                if let Some(n) = input.max_attempts {
                    backoff = backoff.with_max_attempts(n);
                }
                let mut opts = LockOptions::new()
                    .with_ttl(input.ttl)
                    .with_wait(input.wait)
                    .with_backoff(backoff)
                    .with_auto_extend(input.auto_extend);
                if let Some(hold) = input.max_hold {
                    opts = opts.with_max_hold(hold);
                }
                let locks = match LockManager::builder()
                    .with_prefix(&input.prefix)
                    .connect(&url)
                    .await
                {
                    Ok(locks) => locks,
                    Err(Error::InvalidArgument(arg)) => {
                        assert_eq!(arg.what(), "prefix");
                        assert!(bad.contains(&"prefix"));
                        rejected.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(other) => panic!("connect: {other:?}"),
                };
                let call = tokio::time::timeout(
                    Duration::from_secs(20),
                    locks.lock_with(&input.key, opts),
                )
                .await
                .expect("lock_with on a free key returns at once");
                match call {
                    Err(Error::InvalidArgument(arg)) => {
                        assert!(
                            bad.contains(&arg.what()),
                            "rejected {:?}, invalid {bad:?}",
                            arg.what()
                        );
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(guard) => {
                        assert!(bad.is_empty(), "accepted invalid {bad:?}");
                        assert_eq!(guard.key(), &input.key[..]);
                        match guard.extend(input.extend_ttl).await {
                            Ok(()) => assert!(ttl_valid(input.extend_ttl)),
                            Err(Error::InvalidArgument(arg)) => {
                                assert_eq!(arg.what(), "ttl");
                                assert!(!ttl_valid(input.extend_ttl));
                            }
                            // A lease of a few ms may be gone by now, or (auto-extended) have
                            // passed its deadline before an auto-extension could run.
                            Err(Error::Lost { .. }) => {}
                            Err(other) => panic!("extend: {other:?}"),
                        }
                        match guard.release().await {
                            Ok(()) | Err(Error::Lost { .. }) => {}
                            Err(other) => panic!("release: {other:?}"),
                        }
                    }
                    Err(other) => panic!("lock_with on a free key: {other:?} for {bad:?}"),
                }
            });
            Ok(())
        })
        .unwrap();
    eprintln!(
        "bad input: {} generated inputs, {} rejected with InvalidArgument, the rest held and \
         released; no panic",
        tried.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_key_holding_a_hash_is_a_typed_error_not_contention() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let mut raw = node.conn().await;
    let name = unique_key("hash");
    let _: () = raw.hset(lease_key(&name), "field", "value").await.unwrap();

    for result in [
        locks.try_lock(&name).await,
        locks
            .lock_with(&name, LockOptions::new().with_wait(Duration::from_secs(5)))
            .await,
    ] {
        match result {
            Err(Error::Redis(e)) => assert_eq!(e.code(), Some("WRONGTYPE"), "{e}"),
            other => panic!("expected a WRONGTYPE Redis error, got {other:?}"),
        }
    }
    // A hash put there behind a holder's back: extend and release say so too.
    let other = unique_key("hash-later");
    let guard = locks.try_lock(&other).await.unwrap();
    let _: () = raw.del(lease_key(&other)).await.unwrap();
    let _: () = raw.hset(lease_key(&other), "field", "value").await.unwrap();
    match guard.extend(Duration::from_secs(5)).await {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("WRONGTYPE"), "{e}"),
        other => panic!("expected a WRONGTYPE Redis error, got {other:?}"),
    }
    match guard.release().await {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("WRONGTYPE"), "{e}"),
        other => panic!("expected a WRONGTYPE Redis error, got {other:?}"),
    }
    let kind: String = redis::cmd("TYPE")
        .arg(lease_key(&name))
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kind, "hash", "the foreign value is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_in_the_middle_of_traffic_is_transparent() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flushes = {
        let stop = Arc::clone(&stop);
        let mut raw = node.conn().await;
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _: () = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
                n += 1;
                // Spaced out like an operator's flushes, not a flush storm: redis-rs reloads
                // a missing script once per call, so a second flush between the reload and
                // the retry would surface as a NOSCRIPT error (typed, but not transparent).
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        })
    };
    let prefix = unique_key("flush");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let locks = locks.clone();
        let stop = Arc::clone(&stop);
        let name = format!("{prefix}:{t}");
        tasks.push(tokio::spawn(async move {
            let mut cycles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Every operation must succeed: NOSCRIPT is handled by reloading the script.
                let guard = locks
                    .try_lock(&name)
                    .await
                    .expect("try_lock across SCRIPT FLUSH");
                guard
                    .extend(Duration::from_secs(10))
                    .await
                    .expect("extend across SCRIPT FLUSH");
                guard.release().await.expect("release across SCRIPT FLUSH");
                cycles += 1;
            }
            cycles
        }));
    }
    // Auto-extension's batched auto-extensions go through the same reload.
    let auto_extended = locks
        .lock_with(
            format!("{prefix}:auto"),
            LockOptions::new()
                .with_ttl(Duration::from_millis(300))
                .with_auto_extend(true),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        auto_extended.is_held(),
        "auto-extensions went on across SCRIPT FLUSH"
    );
    stop.store(true, Ordering::Relaxed);
    let mut cycles = 0;
    for task in tasks {
        cycles += task.await.unwrap();
    }
    let flushes = flushes.await.unwrap();
    auto_extended.release().await.unwrap();
    assert!(
        flushes > 10 && cycles > 10,
        "{flushes} flushes, {cycles} cycles"
    );
    eprintln!("SCRIPT FLUSH: {flushes} flushes during {cycles} lock cycles, 0 errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_gets_a_clear_error() {
    let node = RedisNode::start().await;
    let mut admin = node.conn().await;
    for rule in [
        // May run anything but scripts.
        &[
            "ACL",
            "SETUSER",
            "noscripts",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-eval",
            "-evalsha",
        ][..],
        // May run scripts, on other keys only.
        &[
            "ACL",
            "SETUSER",
            "otherkeys",
            "on",
            ">pw",
            "~other:*",
            "+@all",
        ][..],
    ] {
        let _: () = redis::cmd(rule[0])
            .arg(&rule[1..])
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    for user in ["noscripts", "otherkeys"] {
        let url = format!("redis://{user}:pw@127.0.0.1:{}", node.port());
        let locks = LockManager::connect(&url)
            .await
            .expect("the user may connect");
        // A fenced acquire is a script on two keys: refused to both users.
        let fenced = LockOptions::new().with_fencing(true);
        match locks.try_lock_with(unique_key("acl"), fenced).await {
            Err(Error::Redis(e)) => {
                assert_eq!(e.code(), Some("NOPERM"), "{user}: {e}");
                assert!(e.to_string().contains("permission"), "{user}: {e}");
            }
            other => panic!("{user}: expected a NOPERM Redis error, got {other:?}"),
        }
    }
    // The plain acquire is a SET: a user without scripts may take the lease, and learns
    // at release that it may not run the compare-and-delete.
    let url = format!("redis://noscripts:pw@127.0.0.1:{}", node.port());
    let locks = LockManager::connect(&url).await.unwrap();
    let name = unique_key("acl-plain");
    let guard = locks.try_lock(&name).await.expect("SET is allowed");
    match guard.release().await {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("NOPERM"), "{e}"),
        other => panic!("expected a NOPERM release, got {other:?}"),
    }
    let _: () = redis::cmd("DEL")
        .arg(lease_key(&name))
        .query_async(&mut admin)
        .await
        .unwrap();
    // A user with no access to the keys is refused at acquire.
    let url = format!("redis://otherkeys:pw@127.0.0.1:{}", node.port());
    let locks = LockManager::connect(&url).await.unwrap();
    match locks.try_lock(unique_key("acl")).await {
        Err(Error::Redis(e)) => assert_eq!(e.code(), Some("NOPERM"), "{e}"),
        other => panic!("expected a NOPERM Redis error, got {other:?}"),
    }
    let wrong = format!("redis://noscripts:not-pw@127.0.0.1:{}", node.port());
    match LockManager::connect(&wrong).await {
        Err(Error::Redis(e)) => {
            let text = e.to_string();
            assert!(text.to_lowercase().contains("password"), "{text}");
        }
        other => panic!("expected an authentication error, got {other:?}"),
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
