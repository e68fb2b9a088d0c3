//! The failover table of replica-acknowledged leases, through Sentinel (feature
//! `sentinel`): leases taken, the primary killed with SIGKILL, the replica promoted by the
//! Sentinels; then who holds what on the new primary.
//!
//! `DISTLOCK_FAILOVER_TRIALS` sets the failovers per scenario (2 by default); each takes
//! [`LEASES`] leases. The table is printed on stderr (`--nocapture` shows it).

use crate::support;

use std::io::Write;
use std::time::Duration;

use distlock::{Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::sentinel::{SERVICE, SentinelSet};
use support::{lease_key, unique_key};

const LEASES: usize = 20;

fn trials() -> usize {
    std::env::var("DISTLOCK_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// How one failover went for [`LEASES`] lease attempts.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    /// Acquires that returned a guard.
    held: usize,
    /// Acquires refused with `NotReplicated` (nothing believed held).
    refused: usize,
    /// Guards whose lease is missing on the promoted replica.
    lost: usize,
    /// Of those, locks a second client could take while the guard was still valid.
    taken_twice: usize,
}

/// One failover: `fault` before the leases (`partition`: the replica frozen and cut off
/// from the primary, so nothing reaches it), leases with `opts`, SIGKILL of the primary,
/// the replica thawed and promoted.
async fn failover(opts: LockOptions, partition: bool) -> Outcome {
    let set = SentinelSet::start().await;
    let [first, second] = set.servers();
    let locks = LockManager::builder()
        .connect_sentinel(set.sentinel_urls(), SERVICE)
        .await
        .unwrap();
    if partition {
        set.signal_server(second, libc::SIGSTOP);
        // The primary drops its link to the replica: what it writes from now on stays in
        // its own memory.
        let mut primary = set.server_conn(first).await;
        let _: () = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("replica")
            .query_async(&mut primary)
            .await
            .unwrap();
    }
    let mut outcome = Outcome::default();
    let mut guards = Vec::new();
    for i in 0..LEASES {
        let name = unique_key(&format!("failover-{i}"));
        match locks.try_lock_with(&name, opts).await {
            Ok(guard) => {
                outcome.held += 1;
                guards.push((name, guard));
            }
            Err(Error::NotReplicated { .. }) => outcome.refused += 1,
            Err(e) => panic!("unexpected acquire error: {e}"),
        }
    }
    set.signal_server(first, libc::SIGKILL);
    if partition {
        set.signal_server(second, libc::SIGCONT);
    }
    set.wait_promoted(second).await;
    let mut promoted = set.server_conn(second).await;
    let rival = LockManager::connect(&format!("redis://127.0.0.1:{second}"))
        .await
        .unwrap();
    for (name, guard) in &guards {
        let there: Option<Vec<u8>> = promoted.get(lease_key(name)).await.unwrap();
        if there.is_none() {
            outcome.lost += 1;
            if let Ok(other) = rival.try_lock(name).await {
                if guard.is_held() {
                    outcome.taken_twice += 1;
                }
                other.release().await.unwrap();
            }
        } else {
            assert!(
                rival.try_lock(name).await.unwrap_err().is_held_by_other(),
                "a lease on the promoted replica still excludes"
            );
        }
    }
    // The guards' releases go to the new primary (or find nothing).
    drop(guards);
    outcome
}

async fn table_row(label: &str, opts: LockOptions, partition: bool) -> Outcome {
    let mut total = Outcome::default();
    let n = trials();
    for _ in 0..n {
        let o = failover(opts, partition).await;
        total.held += o.held;
        total.refused += o.refused;
        total.lost += o.lost;
        total.taken_twice += o.taken_twice;
    }
    let _ = writeln!(
        std::io::stderr(),
        "| {label} | {n} failovers x {LEASES} | {} | {} | {} | {} |",
        total.held,
        total.refused,
        total.lost,
        total.taken_twice
    );
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_table_with_and_without_replica_acknowledgement() {
    let ttl = Duration::from_secs(60);
    let plain = LockOptions::new().with_ttl(ttl);
    let acked = plain.with_replicas(1, Duration::from_millis(200));
    let _ = writeln!(
        std::io::stderr(),
        "| scenario | trials | acquired | refused (NotReplicated) | lost in the failover | taken by a second client |\n|---|---|---|---|---|---|"
    );
    let healthy = table_row("with_replicas(1, 200 ms), healthy replica", acked, false).await;
    assert_eq!(healthy.held, trials() * LEASES);
    assert_eq!(
        healthy.lost, 0,
        "every acknowledged lease survives the failover"
    );

    let refused = table_row("with_replicas(1, 200 ms), replica cut off", acked, true).await;
    assert_eq!(
        refused.refused,
        trials() * LEASES,
        "every acquire fails cleanly"
    );
    assert_eq!(refused.lost, 0);

    let without = table_row("without, replica cut off", plain, true).await;
    assert_eq!(without.held, trials() * LEASES);
    assert_eq!(without.lost, without.held, "the failover loses every lease");
    assert_eq!(
        without.taken_twice, without.lost,
        "and a second client gets each lock"
    );
}
