//! Locks on a Redis Cluster (feature `cluster`): three primaries, three replicas.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{Backoff, Error, LockManager, LockOptions};
use redis::AsyncCommands;
use support::cluster::Cluster;
use support::{blocked_in_wait, lease_key, unique_key};

/// A wait whose polls are 5 s apart: a quick handoff can only come from a notification.
pub(crate) fn five_second_polls() -> LockOptions {
    LockOptions::new()
        .with_wait(Duration::from_secs(20))
        .with_backoff(
            Backoff::new()
                .with_base(Duration::from_secs(5))
                .with_cap(Duration::from_secs(5))
                .with_jitter(false),
        )
}

pub(crate) async fn manager(cluster: &Cluster) -> LockManager {
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
    // `distlock:{tag}rest}`): 1,000 leases in three slots.
    let run = uuid::Uuid::new_v4().simple().to_string();
    let groups = ["a", "b", "c"].map(|g| format!("{g}{run}"));
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(900))
        .with_auto_extend(true);
    let mut guards = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for i in 0..(if g == 0 { 334 } else { 333 }) {
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
        "auto-extension on the cluster: {calls} script calls in {:?} (1,000 leases, 3 slots)",
        started.elapsed()
    );
    assert!(
        (3..=3 * ticks_at_most).contains(&calls),
        "{calls} calls for 1,000 leases in 3 slots over at most {ticks_at_most} ticks"
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

/// Where the waiter's channel is subscribed, per node: (port, sharded, classic).
async fn subscriptions(cluster: &Cluster, channel: &str) -> Vec<(u16, u64, u64)> {
    let mut found = Vec::new();
    for port in cluster.ports() {
        if let Some((sharded, classic)) = cluster.subscribers(port, channel).await {
            found.push((port, sharded, classic));
        }
    }
    found
}

/// Waits until `channel` is subscribed (sharded) on exactly the node on `port` and
/// nowhere else, sharded or classic; panics after `limit`.
pub(crate) async fn until_subscribed_only_on(
    cluster: &Cluster,
    channel: &str,
    port: u16,
    limit: Duration,
) {
    let started = Instant::now();
    loop {
        let found = subscriptions(cluster, channel).await;
        let only_there = found
            .iter()
            .all(|&(p, sharded, classic)| classic == 0 && sharded == u64::from(p == port));
        if only_there && found.iter().any(|&(p, _, _)| p == port) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "not within {limit:?}: {channel} subscribed only on {port}; (port, sharded, \
             classic): {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no node has a subscriber of `channel`, sharded or classic.
pub(crate) async fn until_unsubscribed(cluster: &Cluster, channel: &str) {
    let started = Instant::now();
    loop {
        let found = subscriptions(cluster, channel).await;
        if found
            .iter()
            .all(|&(_, sharded, classic)| sharded + classic == 0)
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{channel} still subscribed after the managers were dropped: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A release is announced with `SPUBLISH` and heard with `SSUBSCRIBE` on the lock's own
/// primary: no node carries a classic subscription or publication, the waiter of another
/// manager is woken at once, and the subscription ends with the managers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_a_waiter_through_sharded_pub_sub_on_the_locks_primary() {
    let cluster = Cluster::start().await;
    let tasks = alive_tasks();
    let locks = manager(&cluster).await;
    let waiting = manager(&cluster).await;
    let name = unique_key("cluster-notify");
    let channel = format!("{}:released", lease_key(&name));
    let owner = cluster.owner(lease_key(&name).as_bytes()).await;
    let (spublished, published) = (
        cluster.calls("spublish").await,
        cluster.calls("publish").await,
    );
    let holder = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // Polling alone would sleep at least 5 s between attempts: only the notification
    // can hand the lock over quickly.
    let slow = five_second_polls();
    let waiter = tokio::spawn(async move {
        let guard = waiting.lock_with(&name, slow).await;
        (guard, Instant::now(), waiting)
    });
    until_subscribed_only_on(&cluster, &channel, owner, Duration::from_secs(5)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let (guard, granted, waiting) = waiter.await.unwrap();
    guard.unwrap().release().await.unwrap();
    assert!(
        granted.duration_since(released) < Duration::from_secs(2),
        "woken by the release after {:?}",
        granted.duration_since(released)
    );
    assert!(cluster.calls("spublish").await >= spublished + 2);
    assert_eq!(
        cluster.calls("publish").await,
        published,
        "no classic publication"
    );
    drop((locks, waiting));
    until_unsubscribed(&cluster, &channel).await;
    assert_eq!(cluster.keys().await, 0);
    until_nothing_left(&cluster, tasks).await;
}

/// Tasks alive on the current runtime.
fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until no node has a client connection but the one that asks (replication links
/// aside) and the runtime is back to `tasks` alive tasks: the managers' connections and
/// tasks, their subscription links included, end once they are dropped. Panics after
/// 10 s with what is left.
async fn until_nothing_left(cluster: &Cluster, tasks: usize) {
    let started = Instant::now();
    loop {
        let mut counts = Vec::new();
        for port in cluster.ports() {
            counts.push((port, cluster.clients(port).await));
        }
        let alive = alive_tasks();
        if counts.iter().all(|&(_, n)| n == Some(1)) && alive <= tasks {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "left 10 s after the managers were dropped: {alive} tasks ({tasks} before), \
             (port, clients): {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A name whose lock lives on the primary `owner`.
async fn name_on(cluster: &Cluster, owner: u16, prefix: &str) -> String {
    loop {
        let name = unique_key(prefix);
        if cluster.owner(lease_key(&name).as_bytes()).await == owner {
            return name;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_acknowledged_leases_wait_on_the_locks_own_primary() {
    let cluster = Cluster::start().await;
    let locks = manager(&cluster).await;
    let primaries = cluster.primaries().await;
    let acked = |timeout: Duration| {
        LockOptions::new()
            .with_ttl(Duration::from_secs(30))
            .with_replicas(1, timeout)
    };
    // On every primary: the lease and its extension are on that primary's replica when the
    // calls return, and `WAIT` ran there (never broadcast to the other primaries).
    for &owner in &primaries {
        let name = name_on(&cluster, owner, "cluster-acked").await;
        let replica = cluster.replica_of(owner).await;
        let mut on_replica = cluster.node_conn(replica).await;
        // A cluster replica answers reads of its primary's slots only after READONLY.
        let _: () = redis::cmd("READONLY")
            .query_async(&mut on_replica)
            .await
            .unwrap();
        let mut waits = Vec::new();
        for &p in &primaries {
            waits.push(support::command_calls(&mut cluster.node_conn(p).await, "wait").await);
        }
        for fenced in [false, true] {
            let guard = locks
                .try_lock_with(&name, acked(Duration::from_secs(1)).with_fencing(fenced))
                .await
                .unwrap();
            assert_eq!(guard.fencing_token().is_some(), fenced);
            let there: Option<Vec<u8>> = on_replica.get(lease_key(&name)).await.unwrap();
            assert!(
                there.is_some(),
                "on the replica of {owner} (fenced: {fenced})"
            );
            guard.extend(Duration::from_secs(60)).await.unwrap();
            let pttl: i64 = on_replica.pttl(lease_key(&name)).await.unwrap();
            assert!(pttl > 50_000, "extended on the replica: PTTL {pttl}");
            guard.release().await.unwrap();
        }
        for (&p, before) in primaries.iter().zip(waits) {
            let now = support::command_calls(&mut cluster.node_conn(p).await, "wait").await;
            if p == owner {
                // Two acquires and two extends (and a script resent once by body, if
                // the primary did not have it yet).
                assert!(now - before >= 4, "{} WAITs on {p}", now - before);
            } else {
                assert_eq!(now, before, "no WAIT on {p}, which does not own the lock");
            }
        }
    }
    // The replica of one primary frozen: an acquire there is short of replicas, fails with
    // a typed error and leaves no key; a plain lock on the same primary is not held up by
    // the pending `WAIT`.
    let owner = primaries[0];
    let replica = cluster.replica_of(owner).await;
    let mut on_owner = cluster.node_conn(owner).await;
    let short = name_on(&cluster, owner, "cluster-short").await;
    let plain = name_on(&cluster, owner, "cluster-plain").await;
    cluster.pause(replica, true);
    let waiting = {
        let locks = locks.clone();
        let short = short.clone();
        tokio::spawn(async move {
            locks
                .try_lock_with(&short, acked(Duration::from_millis(1500)))
                .await
        })
    };
    let started = Instant::now();
    while blocked_in_wait(&mut on_owner).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no WAIT pending"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let guard = locks.try_lock(&plain).await.unwrap();
    guard.release().await.unwrap();
    assert_eq!(
        blocked_in_wait(&mut on_owner).await,
        1,
        "the plain lock and release ran while the WAIT was pending"
    );
    match waiting.await.unwrap() {
        Err(Error::NotReplicated {
            acknowledged,
            requested,
            ..
        }) => assert_eq!((acknowledged, requested), (0, 1)),
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    let left: bool = on_owner.exists(lease_key(&short)).await.unwrap();
    assert!(!left, "the unacknowledged lease was deleted");
    cluster.pause(replica, false);
    // Acknowledged again once the replica is back.
    let started = Instant::now();
    let guard = loop {
        match locks
            .try_lock_with(&short, acked(Duration::from_secs(2)))
            .await
        {
            Ok(guard) => break guard,
            Err(e) if e.is_not_replicated() && started.elapsed() < Duration::from_secs(10) => {}
            Err(e) => panic!("after the replica came back: {e}"),
        }
    };
    guard.release().await.unwrap();
}

/// The lock's primary dies and its replica is promoted: the waiter's sharded subscription
/// moves to the new primary, and the release there wakes it.
///
/// Ignored: it passed in every local run (10+, some loaded), but in two CI runs (process
/// backend, after the same tests on docker) no node had the subscription 5 s, then 10 s,
/// after the promotion. The cause is not found; the link may believe itself subscribed on
/// the dead primary. Run it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the sharded subscription failed to follow a failover in two CI runs; see its doc comment"]
async fn sharded_notifications_follow_the_locks_shard_through_a_failover() {
    let cluster = Cluster::start().await;
    let waiting = manager(&cluster).await;
    let locks = manager(&cluster).await;
    let name = unique_key("cluster-failover-notify");
    let channel = format!("{}:released", lease_key(&name));
    let owner = cluster.owner(lease_key(&name).as_bytes()).await;
    let replica = cluster.replica_of(owner).await;
    let holder = locks
        .lock_with(&name, LockOptions::new().with_ttl(Duration::from_secs(30)))
        .await
        .unwrap();
    // The lease reaches the replica before the primary dies.
    let mut primary = cluster.node_conn(owner).await;
    let _: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(&mut primary)
        .await
        .unwrap();
    let slow = five_second_polls();
    let waiter = tokio::spawn(async move {
        let guard = waiting.lock_with(&name, slow).await;
        (guard, Instant::now(), waiting)
    });
    until_subscribed_only_on(&cluster, &channel, owner, Duration::from_secs(5)).await;
    cluster.kill(owner);
    let killed = Instant::now();
    cluster.until_primary(replica).await;
    let promoted = killed.elapsed();
    // Left on the dead node, the waiter would poll every 5 s. The bound: a subscription
    // try that met the dead primary ends within the command timeout (2 s), the next comes
    // at most 250 ms later, through a new cluster connection (connect timeout 2 s) that
    // knows the new primary; 10 s leaves room for a loaded machine.
    until_subscribed_only_on(&cluster, &channel, replica, Duration::from_secs(10)).await;
    let subscribed = killed.elapsed();
    let released = Instant::now();
    // The holder's manager may meet the dead link first: a transient error, and the
    // guard's drop releases in the background on the new primary.
    if let Err(e) = holder.release().await {
        assert!(e.is_transient(), "{e}");
    }
    // A client whose slot map still names the dead primary tries it first, and redis-rs
    // tries again 1.28 s later: the bound leaves room for that, and stays below the
    // waiter's 5 s polls.
    let (guard, granted, waiting) = waiter.await.unwrap();
    guard.unwrap().release().await.unwrap();
    println!(
        "promoted {promoted:?} after the kill, subscribed on the new primary {subscribed:?} \
         after the kill, granted {:?} after the release",
        granted.duration_since(released)
    );
    assert!(
        granted.duration_since(released) < Duration::from_secs(4),
        "woken by the release after {:?}",
        granted.duration_since(released)
    );
    drop((locks, waiting));
    until_unsubscribed(&cluster, &channel).await;
}

/// Fair mode on a cluster: the queue lives beside the lease in the lock's slot, so the
/// waiters of four managers are served in the order they queued, whichever primary owns
/// the lock; nothing is left but the fencing counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fair_mode_serves_waiters_of_many_managers_in_arrival_order() {
    const WAITERS: usize = 8;
    let cluster = Cluster::start().await;
    let mut locks = Vec::new();
    for _ in 0..4 {
        locks.push(manager(&cluster).await);
    }
    let name = unique_key("cluster-fair");
    let queue = format!("{}:q", lease_key(&name));
    let mut owner = cluster
        .node_conn(cluster.owner(lease_key(&name).as_bytes()).await)
        .await;
    let opts = support::contended(Duration::from_secs(30)).with_fair(true);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let guard = locks[0].lock_with(&name, opts).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        // Managers in a scrambled order, so arrival order is not manager order.
        let manager = &locks[(i * 3 + 1) % 4];
        tasks.push(support::fifo_waiter(manager, &name, i, &order, opts));
        support::eventually(Duration::from_secs(5), "queued", || {
            let (queue, mut owner) = (queue.clone(), owner.clone());
            async move {
                let n: usize = owner.zcard(&queue).await.unwrap();
                n == i + 1
            }
        })
        .await;
    }
    guard.release().await.unwrap();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("every waiter got its turn")
            .unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
    drop(locks);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("distlock:*")
        .query_async(&mut owner)
        .await
        .unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}
