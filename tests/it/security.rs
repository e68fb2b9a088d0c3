//! Tokens: 128-bit random values, never repeated, never leaked in logs; knowing a key
//! without its token buys nothing.

use crate::support;

use std::collections::HashSet;
use std::time::Duration;

use distlock::{Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::{RedisNode, lease_key, unique_key};

const ACQUISITIONS: usize = 100_000;
const TASKS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_distinct_random_128_bit_values_across_100_000_acquisitions() {
    let node = RedisNode::start().await;
    let locks = LockManager::connect(&node.url()).await.unwrap();
    let prefix = unique_key("tokens");
    let opts = LockOptions::new().with_ttl(Duration::from_secs(120));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let locks = locks.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut guards = Vec::new();
            for i in (t..ACQUISITIONS).step_by(TASKS) {
                guards.push(
                    locks
                        .try_lock_with(format!("{prefix}:{i}"), opts)
                        .await
                        .unwrap(),
                );
            }
            guards
        }));
    }
    let mut guards = Vec::with_capacity(ACQUISITIONS);
    for task in tasks {
        guards.extend(task.await.unwrap());
    }

    // Read every token from the server, where an attacker would have to guess it.
    let mut raw = node.conn().await;
    let mut tokens: Vec<String> = Vec::with_capacity(ACQUISITIONS);
    for chunk in (0..ACQUISITIONS).collect::<Vec<_>>().chunks(1000) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|i| lease_key(&format!("{prefix}:{i}")))
            .collect();
        let values: Vec<Option<String>> = raw.mget(&keys).await.unwrap();
        tokens.extend(
            values
                .into_iter()
                .map(|v| v.expect("every lease is on the server")),
        );
    }
    let distinct: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), ACQUISITIONS, "no token repeats");

    // 32 hex digits = 128 bits, a UUID v4: 122 of them random. Each random bit must be set
    // in about half the tokens: a counter, a clock or a constant would be far off. 6σ of a
    // fair coin over 100,000 draws is ±949; no honest generator strays that far.
    let mut ones = [0u32; 128];
    for token in &tokens {
        assert_eq!(token.len(), 32, "{token}");
        let bits = u128::from_str_radix(token, 16).expect("hex");
        for (b, count) in ones.iter_mut().enumerate() {
            *count += ((bits >> (127 - b)) & 1) as u32;
        }
    }
    // UUID v4 fixes the version nibble (bits 48..52 = 0100) and the variant (bits 64..66 = 10).
    let fixed: HashSet<usize> = (48..52).chain(64..66).collect();
    let half = ACQUISITIONS as f64 / 2.0;
    for (b, &count) in ones.iter().enumerate() {
        if fixed.contains(&b) {
            continue;
        }
        assert!(
            (count as f64 - half).abs() < 949.0,
            "bit {b} set in {count} of {ACQUISITIONS} tokens"
        );
    }

    // Nothing prints a token: not the guard's Debug, not an error.
    let guard = &guards[0];
    let shown = format!("{guard:?}");
    assert!(
        !shown.contains(tokens[0].as_str()),
        "Debug leaks the token: {shown}"
    );
    let _: () = redis::cmd("FLUSHALL").query_async(&mut raw).await.unwrap();
    eprintln!(
        "tokens: {ACQUISITIONS} acquisitions, {} distinct tokens, 122 random bits balanced",
        distinct.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_token_can_neither_release_nor_extend() {
    let node = RedisNode::start().await;
    let mut raw = node.conn().await;
    let name = unique_key("owned");
    // The "attacker" is a second client process's manager with the same prefix: it knows
    // the lock name, and held the lock earlier, but does not hold the current token.
    let attacker = LockManager::connect(&node.url()).await.unwrap();
    let owner = LockManager::connect(&node.url()).await.unwrap();

    let stale = attacker
        .try_lock_with(
            &name,
            LockOptions::new().with_ttl(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = owner.try_lock(&name).await.unwrap();
    let token: String = raw.get(lease_key(&name)).await.unwrap();

    for _ in 0..100 {
        // Lost either way: Taken when the server is asked, Expired when the guard already
        // knows its deadline passed. What matters is that nothing was extended.
        match stale.extend(Duration::from_secs(60)).await {
            Err(Error::Lost { .. }) => {}
            other => panic!("a stale guard extended another's lease: {other:?}"),
        }
    }
    match stale.release().await {
        Err(Error::Lost { .. }) => {}
        other => panic!("a stale guard released another's lease: {other:?}"),
    }
    // Nor can it take the lock, wait as it may.
    let taken = attacker
        .lock_with(
            &name,
            LockOptions::new().with_wait(Duration::from_millis(300)),
        )
        .await;
    assert!(matches!(taken, Err(Error::Timeout { .. })), "{taken:?}");

    let now: String = raw.get(lease_key(&name)).await.unwrap();
    assert_eq!(now, token, "the owner's lease is untouched");
    let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
    assert!(
        pttl <= 30_000,
        "and was not extended by the attacker: pttl {pttl}"
    );
    held.release().await.unwrap();
}
