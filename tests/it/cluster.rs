//! Locks on a Redis Cluster (feature `cluster`): three primaries, three replicas.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::cluster::Cluster;
use support::{lease_key, unique_key};

async fn manager(cluster: &Cluster) -> LockManager {
    LockManager::builder()
        .connect_cluster(cluster.urls())
        .await
        .expect("connect to the cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_on_every_primary_exclude_fence_and_release() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    let other = manager(&cluster).await;
    let primaries = cluster.primaries().await;
    assert_eq!(primaries.len(), 3);
    let mut covered = Vec::new();
    while covered.len() < primaries.len() {
        let name = unique_key("cluster");
        let owner = cluster.owner(lease_key(&name).as_bytes()).await;
        if covered.contains(&owner) {
            continue;
        }
        covered.push(owner);
        let fenced = LockOptions::new().with_fencing(true);
        let guard = locks.lock_with(&name, fenced).await.unwrap();
        assert!(guard.fencing_token().is_some());
        let mut on_owner = cluster.node_conn(owner).await;
        let there: bool = on_owner.exists(lease_key(&name)).await.unwrap();
        assert!(there, "the lease is on the primary that owns its slot");
        assert!(
            other.try_lock(&name).await.unwrap_err().is_held_by_other(),
            "excluded"
        );
        guard.extend(Duration::from_secs(20)).await.unwrap();
        guard.release().await.unwrap();
        let again = other.lock_with(&name, fenced).await.unwrap();
        assert!(again.fencing_token() > Some(0));
        again.release().await.unwrap();
        let left: bool = on_owner.exists(lease_key(&name)).await.unwrap();
        assert!(!left, "released");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_extension_sends_one_call_per_slot_per_tick() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    // Three groups of names that share a hash tag (`tag}rest` makes the key
    // `distlock:{tag}rest}`): 300 leases in three slots.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let groups = ["a", "b", "c"].map(|g| format!("{g}{run}"));
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(900))
        .with_auto_extend(true);
    let mut guards = Vec::new();
    for group in &groups {
        for i in 0..100 {
            guards.push(
                locks
                    .lock_with(&format!("{group}}}{i}"), opts)
                    .await
                    .unwrap(),
            );
        }
    }
    // Let the leases fall into one batch, then count the extension calls of ~5 periods.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = cluster.calls("evalsha").await + cluster.calls("eval").await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = cluster.calls("evalsha").await + cluster.calls("eval").await - before;
    let ticks_at_most = started.elapsed().as_millis() as u64 / 300 + 2;
    eprintln!(
        "auto-extension on the cluster: {calls} script calls in {:?} (300 leases, 3 slots)",
        started.elapsed()
    );
    assert!(
        (3..=3 * ticks_at_most).contains(&calls),
        "{calls} calls for 300 leases in 3 slots over at most {ticks_at_most} ticks"
    );
    assert!(
        guards.iter().all(|g| g.is_held()),
        "no lease lost (no CROSSSLOT)"
    );
    for guard in guards {
        guard.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_stay_exact_across_managers_on_a_cluster() {
    let cluster = Cluster::start().await;
    let name = unique_key("cluster-counter");
    let counter = format!("{{{name}}}:counter");
    let owner = cluster.owner(lease_key(&name).as_bytes()).await;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let locks = manager(&cluster).await;
        for _ in 0..3 {
            tasks.push(support::racy_increments(
                locks.clone(),
                name.clone(),
                counter.clone(),
                cluster.node_conn(owner).await,
                40,
                support::contended(Duration::from_secs(30)),
            ));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total: u64 = cluster.node_conn(owner).await.get(&counter).await.unwrap();
    assert_eq!(total, 2 * 3 * 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_on_another_primary_connection() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    let waiting = manager(&cluster).await;
    let name = unique_key("cluster-notify");
    let holder = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // Polling alone would sleep at least 5 s between attempts: only the notification
    // can hand the lock over quickly.
    let slow = LockOptions::new()
        .with_wait(Duration::from_secs(20))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        );
    let waiter = tokio::spawn(async move {
        let guard = waiting.lock_with(&name, slow).await;
        (guard, Instant::now())
    });
    // Give the waiter time to subscribe and try once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let (guard, granted) = waiter.await.unwrap();
    guard.unwrap().release().await.unwrap();
    assert!(
        granted.duration_since(released) < Duration::from_secs(2),
        "woken by the release after {:?}",
        granted.duration_since(released)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_one_cluster_node_as_a_single_primary_says_to_use_connect_cluster() {
    let cluster = Cluster::start().await;
    let url = &cluster.urls()[0];
    match LockManager::connect(url).await {
        Err(e @ Error::InvalidArgument(_)) => {
            assert!(e.to_string().contains("connect_cluster"), "{e}");
        }
        Ok(_) => panic!("a cluster node accepted as a single primary"),
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
    }
}

/// Semaphores, read-write locks and `lock_all` on a cluster: every key of one primitive
/// shares its name's slot; `lock_all` spans slots. Counted with keys read on the slots'
/// owners, and nothing is left afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphores_read_write_locks_and_lock_all_work_across_primaries() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    let other = manager(&cluster).await;

    // A semaphore of 2: two permits from two managers, the third refused.
    let sem = locks.semaphore(unique_key("cluster-sem"), 2).unwrap();
    let sem_other = other.semaphore(sem.name(), 2).unwrap();
    let fenced = LockOptions::new().with_fencing(true);
    let a = sem.try_acquire_with(fenced).await.unwrap();
    let b = sem_other.try_acquire_with(fenced).await.unwrap();
    assert!(sem.try_acquire().await.unwrap_err().is_held_by_other());
    assert!(a.fencing_token().is_some() && a.fencing_token() < b.fencing_token());
    b.release().await.unwrap();
    let c = sem_other.try_acquire().await.unwrap();
    a.release().await.unwrap();
    c.release().await.unwrap();

    // A read-write lock: readers share across managers, a writer excludes them.
    let rw = locks.rw_lock(unique_key("cluster-rw")).unwrap();
    let rw_other = other.rw_lock(rw.name()).unwrap();
    let r1 = rw.try_read().await.unwrap();
    let r2 = rw_other.try_read().await.unwrap();
    assert!(rw.try_write().await.unwrap_err().is_held_by_other());
    r1.release().await.unwrap();
    r2.release().await.unwrap();
    let w = rw_other.try_write().await.unwrap();
    assert!(rw.try_read().await.unwrap_err().is_held_by_other());
    w.release().await.unwrap();

    // lock_all over names owned by every primary: all taken, each on its own owner.
    let primaries = cluster.primaries().await;
    let mut names: Vec<String> = Vec::new();
    let mut owners = Vec::new();
    while owners.len() < primaries.len() {
        let name = unique_key("cluster-all");
        let owner = cluster.owner(lease_key(&name).as_bytes()).await;
        if !owners.contains(&owner) {
            owners.push(owner);
            names.push(name);
        }
    }
    let all = locks.lock_all(&names).await.unwrap();
    for (name, owner) in names.iter().zip(&owners) {
        let there: bool = cluster
            .node_conn(*owner)
            .await
            .exists(lease_key(name))
            .await
            .unwrap();
        assert!(there, "{name} on its slot's owner");
        assert!(other.try_lock(name).await.unwrap_err().is_held_by_other());
    }
    // Overlapping sets from the other manager wait, then get them all.
    let waiting = {
        let (other, mut reversed) = (other.clone(), names.clone());
        reversed.reverse();
        tokio::spawn(async move {
            other
                .lock_all_with(
                    &reversed,
                    LockOptions::new().with_wait(Duration::from_secs(10)),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    all.release().await.unwrap();
    let theirs = waiting
        .await
        .unwrap()
        .expect("the other set after the release");
    theirs.release().await.unwrap();

    // Nothing left but fencing counters (semaphores and read-write locks keep one per
    // name, with a TTL): every lease, permit, reader and intent key is gone.
    let mut leftover = Vec::new();
    for port in cluster.primaries().await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("distlock:*")
            .query_async(&mut cluster.node_conn(port).await)
            .await
            .unwrap();
        leftover.extend(keys.into_iter().filter(|k| !k.ends_with(":fence")));
    }
    assert!(leftover.is_empty(), "left behind: {leftover:?}");
}
