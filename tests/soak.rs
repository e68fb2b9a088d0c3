//! A bounded soak: mixed lock traffic through a fault proxy while random faults hit the
//! link and the server, for `DISTLOCK_SOAK_SECS` seconds (default 60). Ends with one
//! summary line and fails on any violation or leaked lease.
//!
//! `cargo test --test soak -- --ignored soak` (add `--nocapture` to see the line).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use redis::AsyncCommands;
use support::proxy::{Fault, FaultProxy};
use support::{Data, NodeOptions, RedisNode, unique_key};

const KEYS: usize = 4;
const WORKERS: usize = 16;
const TTL: Duration = Duration::from_secs(2);
/// No call may take longer than this; a longer one is a hang and fails the soak.
const CALL_BOUND: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Counters {
    cycles: AtomicU64,
    errors: AtomicU64,
    violations: AtomicU64,
}

#[derive(Default)]
struct KeyState {
    /// The fencing token and lease deadline of the holder inside the critical section.
    inside: Mutex<Option<(u64, Instant)>>,
    /// The highest fencing token that entered the critical section.
    highest_fence: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak: run with `cargo test --test soak -- --ignored soak`"]
async fn soak() {
    let secs: u64 = std::env::var("DISTLOCK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed: u64 = std::env::var("DISTLOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let node = RedisNode::start_opts(NodeOptions::default().persistent()).await;
    let proxy = Arc::new(FaultProxy::start(node.port()).await);
    let locks = LockManager::builder()
        .with_command_timeout(Duration::from_millis(400))
        .with_connect_timeout(Duration::from_secs(1))
        .connect(&proxy.url())
        .await
        .unwrap();
    let prefix = unique_key("soak");
    let counters = Arc::new(Counters::default());
    let keys: Arc<Vec<KeyState>> = Arc::new((0..KEYS).map(|_| KeyState::default()).collect());
    let stop = Arc::new(AtomicBool::new(false));

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (locks, counters, keys, stop) = (
            locks.clone(),
            Arc::clone(&counters),
            Arc::clone(&keys),
            Arc::clone(&stop),
        );
        let prefix = prefix.clone();
        let mut rng = SmallRng::seed_from_u64(seed ^ (w as u64 + 1));
        workers.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .with_fencing(true)
                .with_ttl(TTL)
                .with_wait(Duration::from_millis(500))
                .with_backoff(
                    Backoff::new()
                        .with_base(Duration::from_millis(2))
                        .with_cap(Duration::from_millis(50)),
                );
            while !stop.load(Ordering::Relaxed) {
                let k = rng.random_range(0..KEYS);
                let name = format!("{prefix}:{k}");
                let auto = rng.random_bool(0.3);
                // Fair and plain callers mix on the same keys: the queue must stay sound
                // under faults too, and a plain caller simply does not see it.
                let fair = rng.random_bool(0.4);
                let opts = opts.with_auto_extend(auto).with_fair(fair);
                let attempt = tokio::time::timeout(CALL_BOUND, async {
                    if rng.random_bool(0.5) {
                        locks.lock_with(&name, opts).await
                    } else {
                        locks.try_lock_with(&name, opts).await
                    }
                })
                .await
                .expect("an acquire hung");
                let guard = match attempt {
                    Ok(guard) => guard,
                    Err(Error::Redis(_) | Error::Timeout { .. } | Error::Contended { .. }) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                };
                let fence = guard.fencing_token().unwrap_or(0);
                let state = &keys[k];
                // Enter: nobody else may be inside, and fences only grow.
                {
                    let mut inside = state.inside.lock().unwrap();
                    // Only a holder whose lease is still valid excludes others; one that
                    // overran its lease (a fault outlasted it) is the fencing token's job.
                    if let Some((other, valid_until)) = *inside
                        && Instant::now() < valid_until
                    {
                        eprintln!("VIOLATION key {k}: fence {fence} entered while {other} held a valid lease");
                        counters.violations.fetch_add(1, Ordering::Relaxed);
                    }
                    if fence <= state.highest_fence.load(Ordering::SeqCst) {
                        eprintln!("VIOLATION key {k}: fence {fence} not above the highest seen");
                        counters.violations.fetch_add(1, Ordering::Relaxed);
                    }
                    state.highest_fence.store(fence, Ordering::SeqCst);
                    *inside = Some((fence, guard.valid_until()));
                }
                tokio::time::sleep(Duration::from_micros(rng.random_range(0..3_000))).await;
                if rng.random_bool(0.2) {
                    let _ = tokio::time::timeout(CALL_BOUND, guard.extend(TTL))
                        .await
                        .expect("extend hung");
                }
                // Leave while the lease is still valid, or the exclusion is not ours to claim.
                let still_valid = guard.is_held();
                *state.inside.lock().unwrap() = None;
                if !still_valid {
                    // The lease ended under us (a fault outlasted it): the section may have
                    // overlapped, legitimately; a fenced resource would reject it. Not ours
                    // to count as a lock violation, but nothing else may rely on it either.
                    state.highest_fence.fetch_max(fence, Ordering::SeqCst);
                }
                match rng.random_range(0..3) {
                    0 => drop(guard),
                    _ => {
                        let _ = tokio::time::timeout(CALL_BOUND, guard.release())
                            .await
                            .expect("release hung");
                    }
                }
                counters.cycles.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // The fault injector.
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut faults = 0u64;
    let started = Instant::now();
    let run = Duration::from_secs(secs);
    while started.elapsed() < run {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1_200))).await;
        let outage = Duration::from_millis(rng.random_range(50..1_500));
        faults += 1;
        match rng.random_range(0..6) {
            0 => {
                proxy.set(Fault::Latency(Duration::from_millis(
                    rng.random_range(1..150),
                )));
                tokio::time::sleep(outage).await;
            }
            1 => {
                proxy.set(Fault::Blackhole);
                tokio::time::sleep(outage).await;
            }
            2 => proxy.reset_connections(),
            3 => {
                node.pause().await;
                tokio::time::sleep(outage).await;
                node.resume().await;
            }
            4 => node.restart(Data::Keep).await,
            _ => {
                let mut raw = node.conn().await;
                let _: () = redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut raw)
                    .await
                    .unwrap();
            }
        }
        proxy.set(Fault::Pass);
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        tokio::time::timeout(CALL_BOUND * 2, worker)
            .await
            .expect("a worker hung")
            .expect("a worker panicked");
    }

    // Leaks: once every holder is done, every lease must be gone within its TTL (plus a
    // second for the server's expiry and background releases), and every fair-mode queue
    // (entries, expiries, handoff records) within its entries' lease (1 s, shorter than
    // that). One that stays is leaked.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let mut raw = node.conn().await;
    let mut leaked = 0;
    for k in 0..KEYS {
        let lease = support::lease_key(&format!("{prefix}:{k}"));
        let queue = [":q", ":qx", ":qh"].map(|suffix| format!("{lease}{suffix}"));
        for key in std::iter::once(lease.clone()).chain(queue) {
            let exists: bool = raw.exists(&key).await.unwrap();
            if exists {
                eprintln!("LEAK {key}");
            }
            leaked += u64::from(exists);
        }
    }
    let c = &*counters;
    let violations = c.violations.load(Ordering::Relaxed);
    println!(
        "soak: {} s, seed {seed}, cycles {}, faults injected {faults}, calls failed (typed) {}, \
         violations {violations}, leaks {leaked}",
        secs,
        c.cycles.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
    );
    assert_eq!(violations, 0, "mutual exclusion or fencing violated");
    assert_eq!(leaked, 0, "leases outlived their holders");
    assert!(c.cycles.load(Ordering::Relaxed) > 0, "traffic went through");
}
