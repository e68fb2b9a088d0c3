//! A primary of a Redis Cluster killed under held leases (feature `cluster`): its replica
//! is promoted by the other primaries, and what the promoted replica holds is what the
//! replica had received. Replica-acknowledged leases survive; leases written while the
//! replica was cut off vanish, and a second client can take them (the window
//! `with_replicas` closes).

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions};
use support::cluster::Cluster;
use support::{lease_key, unique_key};

const LEASES: usize = 5;

async fn manager(cluster: &Cluster) -> LockManager {
    LockManager::builder()
        .connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster")
}

/// `n` names whose locks live on the primary `owner`.
async fn names_on(cluster: &Cluster, owner: u16, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let name = unique_key(prefix);
        if cluster.owner(lease_key(&name).as_bytes()).await == owner {
            out.push(name);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_a_killed_primary_and_unacknowledged_ones_can_vanish() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    let owner = cluster.primaries().await[0];
    let replica = cluster.replica_of(owner).await;
    let ttl = Duration::from_secs(60);
    let acked_opts = LockOptions::new()
        .with_ttl(ttl)
        .with_replicas(1, Duration::from_secs(2));
    let plain_opts = LockOptions::new().with_ttl(ttl);
    // Acknowledged while the replica is well.
    let acked_names = names_on(&cluster, owner, "failover-acked", LEASES).await;
    let mut acked = Vec::new();
    for name in &acked_names {
        acked.push(locks.try_lock_with(name, acked_opts).await.unwrap());
    }
    // Then the replica is frozen and the primary drops its link: what the primary writes
    // from now on stays in its own memory.
    cluster.pause(replica, true);
    let mut primary = cluster.node_conn(owner).await;
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut primary)
        .await
        .unwrap();
    let plain_names = names_on(&cluster, owner, "failover-plain", LEASES).await;
    let mut plain = Vec::new();
    for name in &plain_names {
        plain.push(locks.try_lock_with(name, plain_opts).await.unwrap());
    }
    // Asked for acknowledgement now, the acquire is refused and nothing is believed held.
    let refused_names = names_on(&cluster, owner, "failover-refused", LEASES).await;
    for name in &refused_names {
        let err = locks
            .try_lock_with(
                name,
                LockOptions::new()
                    .with_ttl(ttl)
                    .with_replicas(1, Duration::from_millis(200)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotReplicated { .. }), "{err}");
    }
    // The primary dies; the replica, thawed, is promoted by the other primaries.
    let killed = Instant::now();
    cluster.kill(owner);
    cluster.pause(replica, false);
    cluster.until_primary(replica).await;
    let promoted = killed.elapsed();
    // A second client on the new primary.
    let other = manager(&cluster).await;
    for name in &acked_names {
        let err = other.try_lock(name).await.unwrap_err();
        assert!(
            err.is_held_by_other(),
            "an acknowledged lease survived: {err}"
        );
    }
    let mut taken = 0;
    for name in &plain_names {
        if let Ok(guard) = other.try_lock(name).await {
            taken += 1;
            guard.release().await.unwrap();
        }
    }
    assert_eq!(
        taken, LEASES,
        "leases the replica never received are gone from the promoted replica"
    );
    for name in &refused_names {
        other.try_lock(name).await.unwrap().release().await.unwrap();
    }
    eprintln!(
        "cluster failover (replica promoted {promoted:?} after the kill): {LEASES}/{LEASES} \
         acknowledged leases held on the promoted replica; {taken}/{LEASES} unacknowledged \
         leases taken by a second client; {LEASES} acquires refused with NotReplicated"
    );
    let releasing = Instant::now();
    // The first manager follows the failover: its acknowledged guards are released on the
    // new primary, by the call or (if the call met the old topology) in the background.
    for guard in acked {
        let _ = guard.release().await;
    }
    drop(plain);
    for name in &acked_names {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match other.try_lock(name).await {
                Ok(guard) => {
                    guard.release().await.unwrap();
                    break;
                }
                Err(e) if e.is_held_by_other() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{name} after the first manager released it: {e}"),
            }
        }
    }
    eprintln!(
        "cluster failover: the first manager's releases done {:?} after the promotion was seen",
        releasing.elapsed()
    );
}
