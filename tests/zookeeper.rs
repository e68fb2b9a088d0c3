//! The ZooKeeper backend (`zookeeper` feature) against real ZooKeeper servers, started as
//! processes by `support/zk.rs` (the Debian `zookeeper` package and a JRE).
//!
//! Most tests share one standalone server, each under a chroot of its own; tests that stop,
//! pause or partition a server start their own or go through the fault proxy. After every
//! scenario no znode is left under the lock's node.

#[path = "support/child.rs"]
mod child;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/zk.rs"]
mod zk;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions, LostReason};
use proxy::{Fault, FaultProxy};
use zk::ZkServer;
use zookeeper_client as zkc;

/// The session timeout the tests ask for.
const SESSION: Duration = Duration::from_millis(1500);

/// How late a timer may fire on a loaded 2-core machine (JVMs and tests side by side).
const SCHEDULING_SLACK: Duration = Duration::from_millis(250);

fn options(session: Duration) -> LockOptions {
    LockOptions::new()
        .with_ttl(session)
        .with_wait(Duration::from_secs(20))
}

async fn manager_at(url: &str, session: Duration) -> LockManager {
    LockManager::builder()
        .with_default_options(options(session))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

async fn manager(server: &ZkServer, chroot: &str) -> LockManager {
    manager_at(&server.url(chroot), SESSION).await
}

/// A plain client for looking at the tree.
async fn observer(server: &ZkServer) -> zkc::Client {
    zkc::Client::connect(&server.host())
        .await
        .expect("observer session")
}

/// The children of the lock `name`'s node (none if the node is gone).
async fn nodes(client: &zkc::Client, chroot: &str, name: &str) -> Vec<String> {
    match client
        .list_children(&format!("{chroot}/distlock/{name}"))
        .await
    {
        Ok(children) => children,
        Err(zkc::Error::NoNode) => Vec::new(),
        Err(e) => panic!("list {chroot}/{name}: {e}"),
    }
}

/// Waits until the lock `name` has exactly `n` contender nodes.
async fn until_nodes(client: &zkc::Client, chroot: &str, name: &str, n: usize) {
    let start = Instant::now();
    loop {
        let now = nodes(client, chroot, name).await;
        if now.len() == n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{chroot}/{name}: expected {n} nodes, still {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn require_zookeeper() -> bool {
    if zk::available() {
        return true;
    }
    assert!(
        std::env::var_os("DISTLOCK_REQUIRE_ZOOKEEPER").is_none(),
        "DISTLOCK_REQUIRE_ZOOKEEPER is set but java or the zookeeper jars are missing"
    );
    eprintln!("skipped: no ZooKeeper (apt-get install default-jre-headless zookeeper)");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_with_an_exact_counter_across_managers() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-mutex";
    let mut managers = Vec::new();
    for _ in 0..3 {
        managers.push(manager(server, chroot).await);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let inside = Arc::new(AtomicUsize::new(0));
    let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for shared in &managers {
        for _ in 0..3 {
            let locks = shared.clone();
            let (counter, inside, fences) = (counter.clone(), inside.clone(), fences.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..8 {
                    let guard = locks.lock("counter").await.expect("lock");
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    fences
                        .lock()
                        .unwrap()
                        .push(guard.fencing_token().expect("zxid"));
                    // A non-atomic read-modify-write: exact only under mutual exclusion.
                    let v = counter.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    counter.store(v + 1, Ordering::SeqCst);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    guard.release().await.expect("release");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(counter.load(Ordering::SeqCst), 72);
    let fences = fences.lock().unwrap().clone();
    assert!(
        fences.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens in acquisition order must strictly increase: {fences:?}"
    );
    let obs = observer(server).await;
    until_nodes(&obs, chroot, "counter", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_the_lock_in_arrival_order_and_watch_only_their_predecessor() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-fifo";
    let holder = manager(server, chroot).await;
    let obs = observer(server).await;
    let guard = holder.try_lock("queue").await.expect("first");
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for i in 0..5 {
        // Each waiter on a manager (session) of its own, queued before the next arrives.
        let locks = manager(server, chroot).await;
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let guard = locks.lock("queue").await.expect("waiter");
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            guard.release().await.expect("release");
            locks
        }));
        until_nodes(&obs, chroot, "queue", i + 2).await;
    }
    // No herd: every contender node but the last is watched by exactly one session (its
    // successor), and the last by none.
    let dir = format!("{chroot}/distlock/queue/");
    let watching = || {
        server
            .watches()
            .into_iter()
            .filter(|(path, _)| path.starts_with(&dir))
            .collect::<Vec<(String, usize)>>()
    };
    // The last waiter's watch may still be on its way.
    let start = Instant::now();
    while watching().len() < 5 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let watched = watching();
    assert_eq!(watched.len(), 5, "one watched node per waiter: {watched:?}");
    assert!(
        watched.iter().all(|(_, sessions)| *sessions == 1),
        "each node watched by one session: {watched:?}"
    );
    guard.release().await.expect("release the first");
    for w in waiters {
        w.await.expect("waiter task");
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    until_nodes(&obs, chroot, "queue", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_or_is_cancelled_leaves_no_node() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-cancel";
    let locks = manager(server, chroot).await;
    let obs = observer(server).await;
    let guard = locks.try_lock("busy").await.expect("holder");
    // The budget runs out: a typed timeout, and the waiter's node is deleted.
    let started = Instant::now();
    let err = locks
        .lock_with(
            "busy",
            options(SESSION).with_wait(Duration::from_millis(300)),
        )
        .await
        .expect_err("held");
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(300 + 1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(nodes(&obs, chroot, "busy").await.len(), 1);
    // try_lock on a held lock: contended, nothing left queued.
    let err = locks.try_lock("busy").await.expect_err("held");
    assert!(err.is_held_by_other(), "{err}");
    assert_eq!(nodes(&obs, chroot, "busy").await.len(), 1);
    // Cancelled at every await: dropped after 0, 1, 2, ... ms.
    for delay in [0u64, 1, 2, 5, 10, 50] {
        let waiting = locks.lock("busy");
        let _ = tokio::time::timeout(Duration::from_millis(delay), waiting).await;
        until_nodes(&obs, chroot, "busy", 1).await;
    }
    guard.release().await.expect("release");
    until_nodes(&obs, chroot, "busy", 0).await;
    // A waiter cancelled while queued never gets the lock later: a new one gets it at once.
    let again = locks.try_lock("busy").await.expect("free");
    drop(again);
    until_nodes(&obs, chroot, "busy", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_drop_delete_the_node() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-release";
    let locks = manager(server, chroot).await;
    let obs = observer(server).await;
    let guard = locks.try_lock("r").await.expect("lock");
    assert_eq!(nodes(&obs, chroot, "r").await.len(), 1);
    assert!(guard.is_held() && guard.is_auto_extended());
    let handle = guard.handle();
    guard.release().await.expect("release");
    assert_eq!(handle.lost_reason(), Some(LostReason::Released));
    assert!(nodes(&obs, chroot, "r").await.is_empty());
    let guard = locks.try_lock("r").await.expect("lock again");
    drop(guard);
    until_nodes(&obs, chroot, "r", 0).await;
    // with_lock: runs, releases.
    let out = locks
        .with_lock("r", |_| async { 7 })
        .await
        .expect("with_lock");
    assert_eq!(out, 7);
    until_nodes(&obs, chroot, "r", 0).await;
    // A lease outlives many session timeouts while the guard lives.
    let guard = locks.lock("r").await.expect("lock");
    tokio::time::sleep(SESSION * 3).await;
    assert!(guard.is_held(), "the session keeps the lease");
    assert!(guard.remaining() > SESSION / 6, "{:?}", guard.remaining());
    guard
        .extend(Duration::from_secs(3600))
        .await
        .expect("extend");
    assert!(
        guard.remaining() <= SESSION,
        "belief never past the session: {:?}",
        guard.remaining()
    );
    guard.release().await.expect("release");
    until_nodes(&obs, chroot, "r", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_get_typed_errors_and_create_nothing() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-hostile";
    let locks = manager(server, chroot).await;
    let huge = vec![b'x'; 100_000];
    let hostile: Vec<&[u8]> = vec![
        b"a/b",
        b"/",
        b"",
        b".",
        b"..",
        b"zookeeper",
        b"nul\0byte",
        &[0xff, 0xfe],
        &huge,
    ];
    for name in hostile {
        for err in [
            locks.try_lock(name).await.expect_err("refused"),
            locks.lock(name).await.expect_err("refused"),
        ] {
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{:?}: {err}",
                String::from_utf8_lossy(&name[..name.len().min(20)])
            );
        }
    }
    let obs = observer(server).await;
    let children = match obs.list_children(&format!("{chroot}/distlock")).await {
        Ok(children) => children,
        Err(zkc::Error::NoNode) => Vec::new(),
        Err(e) => panic!("{e}"),
    };
    assert!(children.is_empty(), "{children:?}");
    // Bad URLs are typed too.
    for url in ["zk://", "zk://a,,b", "zk://127.0.0.1:1/a//b"] {
        let err = LockManager::connect(url).await.expect_err(url);
        assert!(matches!(err, Error::InvalidArgument(_)), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_holder_loses_the_lease_before_the_server_expires_its_session() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-partition";
    let obs = observer(server).await;
    let proxy = FaultProxy::start(server.port()).await;
    let holder = manager_at(&format!("zk://{}{chroot}", proxy_host(&proxy)), SESSION).await;
    let waiter = manager(server, chroot).await;
    let guard = holder.lock("p").await.expect("holder");
    let first = guard.fencing_token().expect("zxid");
    let lost = guard.lost();
    let waiting = tokio::spawn(async move {
        let g = waiter.lock("p").await.expect("waiter");
        (Instant::now(), g, waiter)
    });
    until_nodes(&obs, chroot, "p", 2).await;
    let cut = Instant::now();
    let believed = guard.valid_until();
    proxy.set(Fault::Blackhole);
    let reason = lost.await;
    let lost_at = Instant::now();
    assert_eq!(reason, LostReason::Unreachable);
    assert!(
        lost_at <= cut + SESSION + SCHEDULING_SLACK,
        "lost() by the session timeout after the cut"
    );
    // The server expires the session later: the holder's node is still there now.
    let left = nodes(&obs, chroot, "p").await;
    assert_eq!(
        left.len(),
        2,
        "the server still holds the session at lost(): {left:?}"
    );
    let (acquired_at, g, _waiter) = waiting.await.expect("waiter task");
    assert!(
        acquired_at >= lost_at && acquired_at >= believed,
        "never before the holder's belief ended"
    );
    eprintln!(
        "partition: lost() {:?} after the cut, the waiter got the lock {:?} after the cut \
         (margin {:?})",
        lost_at - cut,
        acquired_at - cut,
        acquired_at - lost_at
    );
    assert!(g.fencing_token().expect("zxid") > first);
    g.release().await.expect("release");
    proxy.set(Fault::Pass);
    // The holder's manager opens a new session for later locks.
    drop(guard);
    let again = holder.lock("p").await.expect("new session");
    again.release().await.expect("release");
    until_nodes(&obs, chroot, "p", 0).await;
}

fn proxy_host(proxy: &FaultProxy) -> String {
    format!("127.0.0.1:{}", proxy.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_loses_leases_then_tokens_keep_increasing_after_restart() {
    if !require_zookeeper() {
        return;
    }
    let mut server = ZkServer::start();
    let chroot = "/t-restart";
    let locks = manager(&server, chroot).await;
    let guard = locks.lock("s").await.expect("lock");
    let first = guard.fencing_token().expect("zxid");
    server.stop();
    // Measured once the server is dead: no request sent after this can be confirmed.
    let stopped = Instant::now();
    let reason = guard.lost().await;
    assert_eq!(reason, LostReason::Unreachable);
    // Within the session timeout, give or take the timer's lateness on a loaded machine.
    assert!(
        stopped.elapsed() <= SESSION + SCHEDULING_SLACK,
        "{:?}",
        stopped.elapsed()
    );
    drop(guard);
    server.restart();
    server.wait_ready(Duration::from_secs(30));
    let guard = locks
        .lock_with("s", options(SESSION).with_wait(Duration::from_secs(30)))
        .await
        .expect("lock after restart");
    assert!(guard.fencing_token().expect("zxid") > first);
    guard.release().await.expect("release");
    let obs = observer(&server).await;
    until_nodes(&obs, chroot, "s", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_increase_across_sessions() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-fence";
    let mut last = 0;
    for _ in 0..3 {
        let locks = manager(server, chroot).await;
        for _ in 0..3 {
            let guard = locks.try_lock("f").await.expect("lock");
            let token = guard.fencing_token().expect("zxid");
            assert!(token > last, "{token} after {last}");
            last = token;
            guard.release().await.expect("release");
        }
    }
    let obs = observer(server).await;
    until_nodes(&obs, chroot, "f", 0).await;
}

/// The child of `a_killed_holders_lock_passes_on_only_when_its_session_expires`: takes the
/// lock, reports, and holds it until it is killed.
async fn holder_child() {
    let url = child::param("URL");
    let locks = manager_at(&url, SESSION).await;
    let guard = locks.lock("killed").await.expect("child lock");
    child::report(&format!("held {}", guard.fencing_token().expect("zxid")));
    tokio::time::sleep(Duration::from_secs(120)).await;
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holders_lock_passes_on_only_when_its_session_expires() {
    if child::role().is_some() {
        return holder_child().await;
    }
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-killed";
    let obs = observer(server).await;
    let mut holder = child::spawn(
        "a_killed_holders_lock_passes_on_only_when_its_session_expires",
        "holder",
        &[("URL", server.url(chroot))],
    );
    let line = holder.next_line(Duration::from_secs(60));
    let first: u64 = line
        .strip_prefix("held ")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("child said {line:?}"));
    let locks = manager(server, chroot).await;
    let waiting = tokio::spawn(async move {
        let guard = locks.lock("killed").await.expect("waiter");
        (Instant::now(), guard, locks)
    });
    until_nodes(&obs, chroot, "killed", 2).await;
    let killed = Instant::now();
    holder.kill();
    let (acquired, guard, _locks) = waiting.await.expect("waiter task");
    let after = acquired - killed;
    eprintln!(
        "killed holder: the waiter got the lock {after:?} after the kill (session timeout {SESSION:?})"
    );
    // The holder touched its session at most a third of the timeout before the kill (its
    // extensions), so the server cannot expire it sooner than two thirds after.
    assert!(
        after >= SESSION * 2 / 3,
        "the lock passed on {after:?} after the kill"
    );
    assert!(after <= SESSION + Duration::from_millis(1000), "{after:?}");
    assert!(guard.fencing_token().expect("zxid") > first);
    guard.release().await.expect("release");
    until_nodes(&obs, chroot, "killed", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_keeps_locks_through_a_lost_member_and_recovers_its_quorum() {
    if !require_zookeeper() {
        return;
    }
    let mut servers = ZkServer::ensemble(3);
    let hosts: Vec<String> = servers.iter().map(ZkServer::host).collect();
    let url = format!("zk://{}/t-ensemble", hosts.join(","));
    let session = Duration::from_secs(4);
    let a = manager_at(&url, session).await;
    let b = manager_at(&url, session).await;
    let guard = a.lock("e").await.expect("lock");
    let first = guard.fencing_token().expect("zxid");
    // Kill the leader: the holder's session moves to a follower, the lock stays held.
    let leader = servers
        .iter()
        .position(|s| {
            s.four_letter("srvr")
                .is_some_and(|t| t.contains("Mode: leader"))
        })
        .expect("a leader");
    servers[leader].stop();
    tokio::time::sleep(session * 2).await;
    assert!(guard.is_held(), "{:?}", guard.handle().lost_reason());
    let err = b.try_lock("e").await.expect_err("still held");
    assert!(err.is_held_by_other(), "{err}");
    guard
        .release()
        .await
        .expect("release after the leader change");
    let guard = b.lock("e").await.expect("lock on two of three");
    let second = guard.fencing_token().expect("zxid");
    assert!(second > first, "{second} after {first}");
    // Lose the quorum: the holder loses its lease within the session timeout, calls fail
    // with typed errors within their bounds.
    let other = (0..3)
        .find(|&i| i != leader && servers[i].is_running())
        .expect("a live member");
    let cut = Instant::now();
    servers[other].stop();
    let reason = tokio::time::timeout(session * 2, guard.lost())
        .await
        .expect("lost() within the session timeout");
    assert_eq!(reason, LostReason::Unreachable);
    assert!(cut.elapsed() <= session, "{:?}", cut.elapsed());
    drop(guard);
    let started = Instant::now();
    let err = a
        .lock_with("e", options(session).with_wait(Duration::from_secs(1)))
        .await
        .expect_err("no quorum");
    assert!(
        matches!(err, Error::ZooKeeper(_) | Error::Timeout { .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1) + Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The quorum comes back: locks work again, tokens keep increasing.
    servers[leader].restart();
    let guard = b
        .lock_with("e", options(session).with_wait(Duration::from_secs(60)))
        .await
        .expect("lock after recovery");
    assert!(guard.fencing_token().expect("zxid") > second);
    guard.release().await.expect("release");
}

/// A holder whose server is a follower that stops (SIGSTOP: cut off from the leader and
/// from its client at once): the leader expires the session from its own clock, and the
/// holder's belief must end first. A waiter on the other two members gets the lock, never
/// before the holder's `valid_until()` and `lost()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_behind_a_stopped_follower_stops_believing_before_the_leader_expires_it() {
    if !require_zookeeper() {
        return;
    }
    let servers = ZkServer::ensemble(3);
    let session = Duration::from_secs(4);
    let mode = |i: usize| servers[i].four_letter("srvr").unwrap_or_default();
    let follower = (0..3)
        .find(|&i| mode(i).contains("Mode: follower"))
        .expect("a follower");
    let others: Vec<String> = (0..3)
        .filter(|&i| i != follower)
        .map(|i| servers[i].host())
        .collect();
    // The holder knows only the follower: it cannot move its session elsewhere.
    let holder = manager_at(
        &format!("zk://{}/t-follower", servers[follower].host()),
        session,
    )
    .await;
    let waiter = manager_at(&format!("zk://{}/t-follower", others.join(",")), session).await;
    let guard = holder.lock("f").await.expect("holder");
    let first = guard.fencing_token().expect("zxid");
    let lost = guard.lost();
    let waiting = tokio::spawn(async move {
        let g = waiter
            .lock_with("f", options(session).with_wait(Duration::from_secs(60)))
            .await
            .expect("waiter");
        (Instant::now(), g, waiter)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = Instant::now();
    servers[follower].pause(true);
    let reason = tokio::time::timeout(session * 2, lost)
        .await
        .expect("lost() within twice the session timeout");
    let lost_at = Instant::now();
    let believed = guard.valid_until();
    assert_eq!(reason, LostReason::Unreachable);
    let (acquired_at, g, _waiter) = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the waiter gets the lock once the session expires")
        .expect("waiter task");
    servers[follower].pause(false);
    assert!(
        acquired_at >= lost_at && acquired_at >= believed,
        "the waiter got the lock {:?} before the holder stopped believing",
        believed.max(lost_at).saturating_duration_since(acquired_at)
    );
    eprintln!(
        "follower stopped: lost() {:?} after the cut, the waiter got the lock {:?} after it \
         (margin {:?})",
        lost_at - cut,
        acquired_at - cut,
        acquired_at - lost_at
    );
    assert!(g.fencing_token().expect("zxid") > first);
    g.release().await.expect("release");
    drop(guard);
}

/// The child of `mutual_exclusion_across_processes`: increments the counter file under
/// the lock, non-atomically.
async fn counting_child() {
    let locks = manager_at(&child::param("URL"), SESSION).await;
    let file = child::param("FILE");
    for _ in 0..10 {
        let guard = locks.lock("file").await.expect("child lock");
        let v: u64 = std::fs::read_to_string(&file)
            .expect("read")
            .trim()
            .parse()
            .expect("number");
        tokio::time::sleep(Duration::from_millis(2)).await;
        std::fs::write(&file, format!("{}", v + 1)).expect("write");
        guard.release().await.expect("release");
    }
    child::report("done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_across_processes() {
    if child::role().is_some() {
        return counting_child().await;
    }
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-processes";
    let file = std::env::temp_dir().join(format!("distlock-zk-counter-{}", std::process::id()));
    std::fs::write(&file, "0").expect("counter file");
    let children: Vec<_> = (0..3)
        .map(|_| {
            child::spawn(
                "mutual_exclusion_across_processes",
                "counter",
                &[
                    ("URL", server.url(chroot)),
                    ("FILE", file.display().to_string()),
                ],
            )
        })
        .collect();
    for c in children {
        let (status, lines) = c.finish(Duration::from_secs(120));
        assert!(status.success(), "{status}: {lines:?}");
        assert_eq!(lines, vec!["done".to_string()]);
    }
    let total = std::fs::read_to_string(&file).expect("read");
    let _ = std::fs::remove_file(&file);
    assert_eq!(total.trim(), "30");
    let obs = observer(server).await;
    until_nodes(&obs, chroot, "file", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_manager_closes_its_session_and_leaves_nothing() {
    if !require_zookeeper() {
        return;
    }
    let server = ZkServer::start();
    let sessions = || {
        server
            .four_letter("cons")
            .unwrap_or_default()
            .matches("sid=")
            .count()
    };
    let chroot = "/t-drop";
    let obs = observer(&server).await;
    let before = sessions();
    let locks = manager(&server, chroot).await;
    assert_eq!(sessions(), before + 1);
    let guard = locks.lock("d").await.expect("lock");
    let waiting = locks.clone();
    let waiter = tokio::spawn(async move { waiting.lock("d").await.map(drop) });
    until_nodes(&obs, chroot, "d", 2).await;
    waiter.abort();
    let _ = waiter.await;
    drop(guard);
    drop(locks);
    until_nodes(&obs, chroot, "d", 0).await;
    let start = Instant::now();
    while sessions() != before && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sessions(), before, "the manager's session is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_reply_is_lost_finds_its_own_node() {
    if !require_zookeeper() {
        return;
    }
    // ZOOKEEPER-1262: the create reaches the server, the reply never comes back, the
    // connection drops. The contender must find its node by name, not create a second one
    // (which would sit in the queue with nobody to delete it).
    let server = zk::shared();
    let chroot = "/t-lost-reply";
    let obs = observer(server).await;
    let proxy = FaultProxy::start(server.port()).await;
    let locks = manager_at(&format!("zk://{}{chroot}", proxy_host(&proxy)), SESSION).await;
    // A holder on a direct connection (it also keeps the lock's node in place).
    let direct = manager(server, chroot).await;
    let held = direct.try_lock("r").await.expect("holder");
    proxy.set(Fault::HoldReplies);
    let taking = locks.clone();
    let attempt = tokio::spawn(async move { taking.lock("r").await });
    until_nodes(&obs, chroot, "r", 2).await;
    proxy.reset_connections();
    proxy.set(Fault::Pass);
    // Time to reconnect and look for its node; then the lock is handed on. An orphan node
    // (a second create with the first one left behind) would sit before the contender in the
    // queue and keep it waiting for good.
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.release().await.expect("release");
    let guard = attempt
        .await
        .expect("task")
        .expect("lock after the lost reply");
    until_nodes(&obs, chroot, "r", 1).await;
    assert!(guard.is_held());
    guard.release().await.expect("release");
    until_nodes(&obs, chroot, "r", 0).await;
}

/// A create issued while the session is disconnected waits in the client and reaches the
/// server when the session reconnects, after its caller has given up. On Redis such a lease
/// would end with its TTL; on ZooKeeper the node lives as long as the session, so the
/// manager must find and delete it once the session is back, or the lock stays taken by
/// nobody for as long as the manager lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_reaches_the_server_after_its_caller_gave_up_is_deleted() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-late-create";
    let obs = observer(server).await;
    let proxy = FaultProxy::start(server.port()).await;
    let session = Duration::from_secs(4);
    let locks = LockManager::builder()
        .with_default_options(options(session))
        .with_command_timeout(Duration::from_millis(300))
        .connect(&format!("zk://{}{chroot}", proxy_host(&proxy)))
        .await
        .expect("connect through the proxy");
    // A holder on a direct connection keeps the lock's node in place, so the node's
    // child version counts every create and delete under it.
    let direct = manager(server, chroot).await;
    let held = direct.try_lock("late").await.expect("holder");
    let dir = format!("{chroot}/distlock/late");
    let version = || async {
        obs.check_stat(&dir)
            .await
            .expect("stat")
            .expect("the lock's node")
            .cversion
    };
    let before = version().await;
    // Cut the link: the session is disconnected (not expired) and its requests wait in the
    // client. The attempt gives up within its budget.
    proxy.set(Fault::Reset);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = locks
        .lock_with(
            "late",
            // A hold-time cap below the session's TTL gives the attempt its own short TTL,
            // which also bounds how long a background release of it is tried.
            options(session)
                .with_ttl(Duration::from_millis(200))
                .with_max_hold(Duration::from_millis(200))
                .with_wait(Duration::from_millis(300)),
        )
        .await
        .expect_err("cut off");
    assert!(
        err.is_transient() || matches!(err, Error::Timeout { .. }),
        "{err}"
    );
    // Longer than the abandoned attempt's TTL and command timeout, well within the
    // session's 4 s (and before the client's reconnect backoff grows past a second): the
    // link comes back, the session reconnects, the create runs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    proxy.set(Fault::Pass);
    let started = Instant::now();
    loop {
        let children = nodes(&obs, chroot, "late").await;
        let made = version().await - before;
        // Every create the client sent is answered by a delete: an even count, and only
        // the holder's node left.
        if made >= 2 && made % 2 == 0 && children.len() == 1 {
            eprintln!(
                "late create: {made} changes under the lock, cleared {:?} after the link came back (the attempt failed with: {err})",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the late create's node is still there (children {children:?}, {made} changes)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The queue is clear: the lock passes on at once.
    held.release().await.expect("release");
    let guard = locks
        .lock_with("late", options(session).with_wait(Duration::from_secs(3)))
        .await
        .expect("the lock after the holder's release");
    guard.release().await.expect("release");
    until_nodes(&obs, chroot, "late", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_time_cap_bounds_the_belief_and_drop_frees_the_node() {
    if !require_zookeeper() {
        return;
    }
    let server = zk::shared();
    let chroot = "/t-cap";
    let obs = observer(server).await;
    let locks = manager(server, chroot).await;
    let cap = Duration::from_millis(400);
    let started = Instant::now();
    let guard = locks
        .lock_with("c", options(SESSION).with_max_hold(cap))
        .await
        .expect("lock");
    let acquired = Instant::now();
    assert!(
        guard.valid_until() <= acquired + cap,
        "the cap, not the session timeout"
    );
    assert_eq!(guard.lost().await, LostReason::MaxHoldReached);
    assert!(started.elapsed() <= cap + Duration::from_millis(200));
    // The node stays until the guard goes: nobody else holds in between.
    assert_eq!(nodes(&obs, chroot, "c").await.len(), 1);
    drop(guard);
    until_nodes(&obs, chroot, "c", 0).await;
}
