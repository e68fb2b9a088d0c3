//! One lock over five independent Redis primaries (Redlock), with nodes stopped, paused,
//! slowed and restarted empty.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{Error, LockManager, LockOptions, LostReason, NodeOutcome, QuorumOperation};
use redis::AsyncCommands;
use support::proxy::{Fault, FaultProxy};
use support::{Data, NodeOptions, RedisNode, lease_key, unique_key};

/// Generous next to a loopback round trip, so a loaded machine does not fail a node by
/// accident; tests that want a node to time out make it slower than this on purpose.
const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a test waits for something that should happen at once (bounds every wait).
const PROMPTLY: Duration = Duration::from_secs(10);

fn ttl(secs: u64) -> LockOptions {
    LockOptions::new().with_ttl(Duration::from_secs(secs))
}

async fn five_nodes() -> Vec<RedisNode> {
    five_nodes_with(NodeOptions::default()).await
}

async fn five_nodes_with(options: NodeOptions) -> Vec<RedisNode> {
    let (a, b, c, d, e) = tokio::join!(
        RedisNode::start_opts(options.clone()),
        RedisNode::start_opts(options.clone()),
        RedisNode::start_opts(options.clone()),
        RedisNode::start_opts(options.clone()),
        RedisNode::start_opts(options)
    );
    vec![a, b, c, d, e]
}

async fn redlock(nodes: &[RedisNode]) -> LockManager {
    redlock_at(nodes.iter().map(RedisNode::url)).await
}

async fn redlock_at(urls: impl IntoIterator<Item = String>) -> LockManager {
    LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .connect_redlock(urls)
        .await
        .unwrap()
}

fn name_of(node: &RedisNode) -> String {
    format!("127.0.0.1:{}", node.port())
}

/// The lease's token on `node`, read behind distlock's back.
async fn token_on(node: &RedisNode, name: &str) -> Option<String> {
    let mut raw = node.conn().await;
    raw.get(lease_key(name)).await.unwrap()
}

async fn tokens_on(nodes: &[RedisNode], name: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(token_on(node, name).await);
    }
    out
}

async fn wait_until_gone(node: &RedisNode, name: &str, within: Duration) {
    let started = Instant::now();
    while token_on(node, name).await.is_some() {
        assert!(
            started.elapsed() < within,
            "{} still holds {name} after {within:?}",
            name_of(node)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the lease `name` is on every one of `nodes` within `within`.
async fn on_every_node_within(nodes: &[RedisNode], name: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if tokens_on(nodes, name).await.iter().all(Option::is_some) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// After a node restarts, a client finds out on its next command (which fails) and then
/// reconnects. Waits until `locks` reaches every node again: a probe lease shows up on all.
async fn until_every_node_answers(locks: &LockManager, nodes: &[RedisNode]) {
    let started = Instant::now();
    loop {
        let probe = unique_key("probe");
        if let Ok(guard) = locks.try_lock(&probe).await {
            let everywhere = on_every_node_within(nodes, &probe, Duration::from_secs(1)).await;
            let _ = guard.release().await;
            if everywhere {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the manager did not reach every node again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One acquire and release on every node, so each has the scripts cached: a request that
/// reaches a node late then runs (instead of failing with `NOSCRIPT`, which would make a
/// late SET harmless by accident).
async fn warm_up(locks: &LockManager, nodes: &[RedisNode]) {
    let probe = unique_key("warm-up");
    let guard = locks.try_lock(&probe).await.unwrap();
    assert!(on_every_node_within(nodes, &probe, PROMPTLY).await);
    guard.release().await.unwrap();
}

/// Lease commands `node` has run so far: acquires (`SET … NX`) and scripts (releases, by
/// SHA or, in the background, by body).
async fn evalsha_calls(node: &RedisNode) -> u64 {
    let mut raw = node.conn().await;
    support::evalsha_calls(&mut raw).await
        + support::command_calls(&mut raw, "eval").await
        + support::command_calls(&mut raw, "set").await
}

/// Waits until `node` has run `calls` `EVALSHA`s in all: requests that reached it late
/// have been executed, so what the key looks like now is final.
async fn until_evalsha_calls(node: &RedisNode, calls: u64) {
    let started = Instant::now();
    loop {
        let seen = evalsha_calls(node).await;
        if seen >= calls {
            return;
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "{} ran {seen} EVALSHA calls, expected {calls}",
            name_of(node)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A crash and a restart without data: SIGKILL / `docker kill`, then a fresh data dir.
async fn restart_empty(node: &RedisNode) {
    node.restart(Data::Wipe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_five_up_the_lease_lives_on_every_node_without_a_fencing_token() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("all-up");

    let before = Instant::now();
    let guard = locks.lock_with(&name, ttl(10)).await.unwrap();
    let after = Instant::now();
    assert_eq!(guard.fencing_token(), None);
    // Validity: ttl - drift (10 000 - 102 ms) from the start of the acquire, so what
    // remains is ttl - elapsed - drift.
    let validity = Duration::from_millis(10_000 - 102);
    assert!(guard.valid_until() >= before + validity);
    assert!(guard.valid_until() <= after + validity);

    assert!(on_every_node_within(&nodes, &name, PROMPTLY).await);
    let tokens = tokens_on(&nodes, &name).await;
    let first = tokens[0].clone().expect("node 0 holds the lease");
    assert!(
        tokens.iter().all(|t| t.as_deref() == Some(first.as_str())),
        "one token on all five nodes: {tokens:?}"
    );
    // No per-node fencing counters are written.
    for node in &nodes {
        let mut raw = node.conn().await;
        let fence: bool = raw
            .exists(format!("{}:fence", lease_key(&name)))
            .await
            .unwrap();
        assert!(!fence);
    }

    guard.extend(Duration::from_secs(30)).await.unwrap();
    for node in &nodes {
        let mut raw = node.conn().await;
        let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
        assert!(pttl > 20_000, "{}: pttl {pttl}", name_of(node));
    }
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());

    guard.release().await.unwrap();
    assert_eq!(tokens_on(&nodes, &name).await, vec![None; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_down_the_lock_is_taken_extended_and_released_on_the_other_three() {
    let nodes = five_nodes().await;
    nodes[3].stop().await;
    nodes[4].stop().await;
    // A manager starts while a minority is down.
    let locks = redlock(&nodes).await;
    let name = unique_key("two-down");

    let guard = locks.try_lock_with(&name, ttl(10)).await.unwrap();
    let live = tokens_on(&nodes[..3], &name).await;
    assert!(live.iter().all(Option::is_some), "{live:?}");
    assert!(locks.try_lock(&name).await.unwrap_err().is_held_by_other());

    guard.extend(Duration::from_secs(30)).await.unwrap();
    assert!(guard.remaining() > Duration::from_secs(25));
    for node in &nodes[..3] {
        let mut raw = node.conn().await;
        let pttl: i64 = raw.pttl(lease_key(&name)).await.unwrap();
        assert!(pttl > 20_000, "{}: pttl {pttl}", name_of(node));
    }

    // Three of five confirm the release: a majority, so Ok.
    guard.release().await.unwrap();
    assert_eq!(tokens_on(&nodes[..3], &name).await, vec![None; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_nodes_down_acquire_is_a_quorum_error_within_the_budget_leaving_no_key() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("three-down");
    for node in &nodes[2..] {
        node.stop().await;
    }

    let budget = Duration::from_secs(10);
    let started = Instant::now();
    let result = locks.lock_with(&name, ttl(60).with_wait(budget)).await;
    let elapsed = started.elapsed();
    let err = match result {
        Err(e @ Error::Quorum(_)) => e,
        other => panic!("expected a quorum error, got {other:?}"),
    };
    assert!(
        !err.is_held_by_other(),
        "not enough nodes is not contention"
    );
    let Error::Quorum(q) = &err else {
        unreachable!()
    };
    assert_eq!(q.operation(), QuorumOperation::Acquire);
    assert_eq!((q.confirmed(), q.needed(), q.nodes().len()), (2, 3, 5));
    let failed: Vec<&str> = q.failures().map(|(node, _)| node).collect();
    let down: Vec<String> = nodes[2..].iter().map(name_of).collect();
    assert_eq!(failed, down, "the error names the nodes that failed: {err}");
    for node in &down {
        assert!(err.to_string().contains(node.as_str()), "{err}");
    }
    // Returned at once (not waited out), well within the wait budget.
    assert!(elapsed < budget, "took {elapsed:?}");

    // The two nodes that took the lease had it released before the error came back.
    assert_eq!(tokens_on(&nodes[..2], &name).await, vec![None; 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_slowed_past_the_node_timeout_by_a_proxy_counts_as_failed() {
    let nodes = five_nodes().await;
    // Node 4 is reached through a fault proxy.
    let proxy = FaultProxy::start(nodes[4].port()).await;
    let slow_name = format!("127.0.0.1:{}", proxy.port());
    let urls = nodes[..4].iter().map(RedisNode::url).chain([proxy.url()]);
    let locks = redlock_at(urls).await;
    warm_up(&locks, &nodes).await;
    let calls = evalsha_calls(&nodes[4]).await;
    let name = unique_key("slow");

    // A round trip through the proxy now takes 4 s, four node timeouts.
    let latency = Duration::from_secs(2);
    proxy.set(Fault::Latency(latency));
    // Four fast nodes are a majority: the lock is taken without waiting for the slow
    // node's answer.
    let started = Instant::now();
    let guard = locks.try_lock_with(&name, ttl(30)).await.unwrap();
    assert!(started.elapsed() < 2 * latency, "{:?}", started.elapsed());
    assert!(on_every_node_within(&nodes[..4], &name, PROMPTLY).await);
    guard.release().await.unwrap();
    // The slow node runs the SET and then the release, late and in order.
    until_evalsha_calls(&nodes[4], calls + 2).await;
    assert_eq!(token_on(&nodes[4], &name).await, None);

    // With two more nodes down, the slow node is what is missing for a majority, and the
    // error says it timed out.
    nodes[2].stop().await;
    nodes[3].stop().await;
    let before = evalsha_calls(&nodes[4]).await;
    let other = unique_key("slow-quorum");
    let err = locks.try_lock_with(&other, ttl(30)).await.unwrap_err();
    let Error::Quorum(q) = &err else {
        panic!("expected a quorum error, got {err:?}")
    };
    assert_eq!(q.confirmed(), 2);
    let slow = &q.nodes()[4];
    assert_eq!(slow.node(), slow_name);
    match slow.outcome() {
        NodeOutcome::Failed(Error::Redis(e)) => assert!(e.is_timeout(), "{e}"),
        other => panic!("the slow node should have timed out: {other:?}"),
    }
    assert!(err.to_string().contains(&slow_name), "{err}");
    // Undone everywhere: on the fast nodes before the error came back; on the slow node,
    // its late SET is followed by the cleanup's delete (plus the abandoned-acquire
    // release): once both ran there, nothing is left.
    assert_eq!(tokens_on(&nodes[..2], &other).await, vec![None; 2]);
    until_evalsha_calls(&nodes[4], before + 2).await;
    assert_eq!(token_on(&nodes[4], &other).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_by_another_on_a_majority_is_contention_but_too_few_answers_is_a_quorum_error() {
    let nodes = five_nodes().await;
    let (first, second) = (redlock(&nodes).await, redlock(&nodes).await);
    let name = unique_key("held");
    let guard = first.try_lock_with(&name, ttl(20)).await.unwrap();

    match second.try_lock(&name).await {
        Err(Error::Contended { retry_after, .. }) => {
            let left = retry_after.expect("the holder's remaining TTL");
            assert!(left <= Duration::from_secs(20) && left > Duration::from_secs(10));
        }
        other => panic!("expected Contended, got {other:?}"),
    }
    // Three nodes still answer "held": another owner has a majority.
    nodes[3].stop().await;
    nodes[4].stop().await;
    let waited = second
        .lock_with(&name, ttl(20).with_wait(Duration::from_millis(300)))
        .await;
    assert!(
        matches!(waited, Err(Error::Timeout { .. })),
        "got {waited:?}"
    );
    // Two answers cannot decide anything: not enough nodes, whoever holds the lock.
    nodes[2].stop().await;
    match second.try_lock(&name).await {
        Err(Error::Quorum(q)) => {
            let held = q
                .nodes()
                .iter()
                .filter(|r| matches!(r.outcome(), NodeOutcome::HeldByOther { .. }))
                .count();
            assert_eq!((held, q.failures().count()), (2, 3));
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_vote_is_undone_on_every_node_the_attempt_may_have_reached_timed_out_ones_too() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("split");
    warm_up(&locks, &nodes).await;
    // Another owner's lease on two nodes (a contender mid-acquire), one node too slow.
    for node in &nodes[2..4] {
        let mut raw = node.conn().await;
        let _: () = raw
            .pset_ex(lease_key(&name), "another-owner", 60_000)
            .await
            .unwrap();
    }
    let before = evalsha_calls(&nodes[4]).await;
    nodes[4].pause().await;

    // Two taken, two held, one timed out: a majority answered, not for us.
    let err = locks.try_lock_with(&name, ttl(60)).await.unwrap_err();
    assert!(err.is_held_by_other(), "{err:?}");
    assert_eq!(tokens_on(&nodes[..2], &name).await, vec![None; 2]);
    // The other owner's keys are left alone.
    let theirs = Some("another-owner".to_owned());
    assert_eq!(tokens_on(&nodes[2..4], &name).await, vec![theirs; 2]);
    // The slow node runs the SET late, and the delete sent after it removes it.
    nodes[4].resume().await;
    until_evalsha_calls(&nodes[4], before + 2).await;
    assert_eq!(token_on(&nodes[4], &name).await, None);
}

/// Once an acquire on five healthy nodes returns, the lease is on all five: a contender
/// that comes after it cannot take any of them (it would leave the lease on a bare
/// majority, one failed node from a release or extend without quorum). Many rounds, the
/// contender right behind the holder each time; nothing is left after each release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_acquire_returns_a_contender_finds_the_lease_on_every_healthy_node() {
    const ROUNDS: usize = 1000;
    let nodes = five_nodes().await;
    let (holder, contender) = (redlock(&nodes).await, redlock(&nodes).await);
    warm_up(&holder, &nodes).await;
    warm_up(&contender, &nodes).await;
    for round in 0..ROUNDS {
        let name = unique_key("after-return");
        let guard = holder.try_lock_with(&name, ttl(30)).await.unwrap();
        match contender.try_lock_with(&name, ttl(30)).await {
            Err(Error::Contended { .. }) => {}
            other => panic!("round {round}: expected Contended, got {other:?}"),
        }
        let tokens = tokens_on(&nodes, &name).await;
        let first = tokens[0].clone();
        assert!(
            first.is_some() && tokens.iter().all(|t| *t == first),
            "round {round}: the holder's lease is not on every node: {tokens:?}"
        );
        guard.release().await.unwrap();
        assert_eq!(
            tokens_on(&nodes, &name).await,
            vec![None; 5],
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_key_of_another_type_fails_its_node_with_wrongtype_not_contention() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("wrongtype");
    let key = lease_key(&name);
    let put_hash = async |node: &RedisNode| {
        let mut raw = node.conn().await;
        let _: () = raw.hset(&key, "f", "v").await.unwrap();
    };
    // On one node: that node fails, the other four make the majority.
    put_hash(&nodes[0]).await;
    locks
        .try_lock(&name)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    // On three: a quorum error that names the problem, not "held by another owner".
    put_hash(&nodes[1]).await;
    put_hash(&nodes[2]).await;
    match locks.try_lock(&name).await {
        Err(Error::Quorum(q)) => {
            let failures: Vec<String> = q.failures().map(|(_, e)| e.to_string()).collect();
            assert_eq!(failures.len(), 3);
            assert!(
                failures.iter().all(|e| e.contains("WRONGTYPE")),
                "{failures:?}"
            );
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }
    // The hashes are left alone.
    let mut raw = nodes[0].conn().await;
    let kind: String = redis::cmd("TYPE")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kind, "hash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_succeeds_with_two_nodes_down_and_reports_the_lease_lost_with_three() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("extend");
    let guard = locks.try_lock_with(&name, ttl(10)).await.unwrap();
    let token = token_on(&nodes[0], &name).await;

    nodes[3].stop().await;
    nodes[4].stop().await;
    guard.extend(Duration::from_secs(30)).await.unwrap();
    assert!(guard.is_held());
    assert!(guard.remaining() > Duration::from_secs(25));

    nodes[2].stop().await;
    match guard.extend(Duration::from_secs(30)).await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::NoQuorum),
        other => panic!("expected the lease lost, got {other:?}"),
    }
    assert!(!guard.is_held());
    let reason = tokio::time::timeout(PROMPTLY, guard.lost()).await.unwrap();
    assert_eq!(reason, LostReason::NoQuorum);
    // The failed extend destroyed nothing: the two live nodes still have the lease.
    assert_eq!(tokens_on(&nodes[..2], &name).await, vec![token.clone(); 2]);

    // Releasing is left to the caller, and reported honestly: two of five confirmed.
    match guard.release().await {
        Err(Error::Quorum(q)) => {
            assert_eq!(q.operation(), QuorumOperation::Release);
            assert_eq!((q.confirmed(), q.needed()), (2, 3));
            assert_eq!(q.failures().count(), 3);
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }
    assert_eq!(tokens_on(&nodes[..2], &name).await, vec![None; 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_extension_and_with_lock_work_on_a_redlock_lease() {
    let nodes = Arc::new(five_nodes().await);
    let locks = redlock(&nodes).await;
    let name = unique_key("with-lock");
    let opts = LockOptions::new().with_ttl(Duration::from_secs(2));

    // Auto-extended past its TTL while the work runs, with a minority down.
    nodes[4].stop().await;
    let out = {
        let nodes = Arc::clone(&nodes);
        let name = name.clone();
        locks
            .with_lock_with(&name.clone(), opts, |lease| async move {
                assert_eq!(lease.fencing_token(), None);
                tokio::time::sleep(Duration::from_secs(5)).await;
                assert!(lease.is_held());
                tokens_on(&nodes[..4], &name).await
            })
            .await
            .unwrap()
    };
    assert!(out.iter().all(Option::is_some), "{out:?}");
    assert_eq!(tokens_on(&nodes[..4], &name).await, vec![None; 4]);

    // Losing the majority mid-work cancels the work and reports the loss.
    let started = Instant::now();
    let result = {
        let nodes = Arc::clone(&nodes);
        locks
            .with_lock_with(&name, opts, |_lease| async move {
                nodes[2].stop().await;
                nodes[3].stop().await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                unreachable!("the work is cancelled once the lease is lost");
            })
            .await
    };
    match result {
        Err(Error::Lost { reason, .. }) => {
            assert!(
                matches!(reason, LostReason::NoQuorum | LostReason::Unreachable),
                "{reason:?}"
            );
        }
        other => panic!("expected the lease lost, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarting_empty_under_a_bare_majority_lets_a_second_owner_in() {
    // The Redlock persistence hazard, shown rather than hidden: a lease that stands on
    // exactly three of five nodes loses its majority when one of them restarts without
    // its data, and a second owner can then take the lock on the other three.
    let nodes = five_nodes().await;
    let (first, second) = (redlock(&nodes).await, redlock(&nodes).await);
    let name = unique_key("hazard");

    nodes[3].stop().await;
    nodes[4].stop().await;
    let guard = first.try_lock_with(&name, ttl(60)).await.unwrap();
    nodes[3].start_again().await;
    nodes[4].start_again().await;
    restart_empty(&nodes[2]).await;
    until_every_node_answers(&second, &nodes).await;

    let intruder = second.try_lock_with(&name, ttl(60)).await.unwrap();
    assert!(
        guard.is_held() && intruder.is_held(),
        "two owners at once: the hazard the docs warn about"
    );

    // The first owner finds out at its next extend (or auto-extension).
    until_every_node_answers(&first, &nodes).await;
    match guard.extend(Duration::from_secs(60)).await {
        Err(Error::Lost { reason, .. }) => assert_eq!(reason, LostReason::Taken),
        other => panic!("expected the lease lost to another owner, got {other:?}"),
    }
    intruder.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fsync_always_a_crashed_node_comes_back_with_the_lease_and_nobody_else_gets_in() {
    // The same bare majority as above, on nodes that persist every write before answering
    // (`appendonly yes`, `appendfsync always`): the crash loses nothing.
    let nodes = five_nodes_with(NodeOptions::default().persistent()).await;
    let (first, second) = (redlock(&nodes).await, redlock(&nodes).await);
    let name = unique_key("fsync");

    nodes[3].stop().await;
    nodes[4].stop().await;
    let guard = first.try_lock_with(&name, ttl(60)).await.unwrap();
    let token = token_on(&nodes[0], &name).await;
    nodes[3].start_again().await;
    nodes[4].start_again().await;
    nodes[2].restart(Data::Keep).await;
    assert_eq!(
        token_on(&nodes[2], &name).await,
        token,
        "the lease survived the crash"
    );
    until_every_node_answers(&second, &nodes).await;

    assert!(second.try_lock(&name).await.unwrap_err().is_held_by_other());
    until_every_node_answers(&first, &nodes).await;
    guard.extend(Duration::from_secs(60)).await.unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_sets_the_lease_again_on_nodes_that_lost_it_so_one_empty_restart_is_survived() {
    let nodes = five_nodes().await;
    let (first, second) = (redlock(&nodes).await, redlock(&nodes).await);
    let name = unique_key("repair");

    nodes[3].stop().await;
    nodes[4].stop().await;
    let guard = first.try_lock_with(&name, ttl(60)).await.unwrap();
    let token = token_on(&nodes[0], &name).await;
    nodes[3].start_again().await;
    nodes[4].start_again().await;
    until_every_node_answers(&first, &nodes).await;

    // The two nodes that were down when the lease was taken get it now.
    guard.extend(Duration::from_secs(60)).await.unwrap();
    assert_eq!(tokens_on(&nodes, &name).await, vec![token.clone(); 5]);

    // Now one node restarting empty leaves the lease on four: nobody else gets in.
    restart_empty(&nodes[2]).await;
    until_every_node_answers(&second, &nodes).await;
    assert!(second.try_lock(&name).await.unwrap_err().is_held_by_other());
    until_every_node_answers(&first, &nodes).await;
    guard.extend(Duration::from_secs(60)).await.unwrap();
    assert_eq!(tokens_on(&nodes, &name).await, vec![token; 5]);
    guard.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contention_across_five_nodes_keeps_a_non_atomic_counter_exact() {
    const MANAGERS: usize = 4;
    const TASKS_PER_MANAGER: usize = 4;
    const CYCLES: usize = 25;

    let nodes = five_nodes().await;
    let name = unique_key("counter");
    let counter = format!("{name}:value");
    let opts = support::contended(Duration::from_secs(120));
    let mut tasks = Vec::new();
    for _ in 0..MANAGERS {
        // Separate managers: separate connections to every node, like separate processes.
        let locks = redlock(&nodes).await;
        for _ in 0..TASKS_PER_MANAGER {
            tasks.push(support::racy_increments(
                locks.clone(),
                name.clone(),
                counter.clone(),
                nodes[0].conn().await,
                CYCLES,
                opts,
            ));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut raw = nodes[0].conn().await;
    let total: u64 = raw.get(&counter).await.unwrap();
    assert_eq!(total, (MANAGERS * TASKS_PER_MANAGER * CYCLES) as u64);
    assert_eq!(tokens_on(&nodes, &name).await, vec![None; 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_acquire_mid_flight_leaves_no_key_on_any_node() {
    let nodes = five_nodes().await;
    // A long node timeout keeps the acquire in flight while one node is paused.
    let locks = LockManager::builder()
        .with_node_timeout(Duration::from_secs(3))
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await
        .unwrap();
    let name = unique_key("abandon");
    warm_up(&locks, &nodes).await;
    let mut before = Vec::new();
    for node in &nodes[2..] {
        before.push(evalsha_calls(node).await);
        node.pause().await;
    }

    {
        let acquire = locks.try_lock_with(&name, ttl(60));
        tokio::pin!(acquire);
        // Drive the acquire until the two live nodes have the lease, then drop it while it
        // still waits for the paused ones (a majority is out of reach without them).
        let seen_everywhere_live = async {
            while !tokens_on(&nodes[..2], &name)
                .await
                .iter()
                .all(Option::is_some)
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            result = &mut acquire => panic!("the acquire finished with a node paused: {result:?}"),
            seen = tokio::time::timeout(PROMPTLY, seen_everywhere_live) => {
                seen.expect("the two live nodes got the lease");
            }
        }
    }

    // Released in the background long before the 60 s TTL.
    for node in &nodes[..2] {
        wait_until_gone(node, &name, PROMPTLY).await;
    }
    // Each paused node runs the SET, then the delete queued behind it.
    for (node, before) in nodes[2..].iter().zip(before) {
        node.resume().await;
        until_evalsha_calls(node, before + 2).await;
        assert_eq!(token_on(node, &name).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_with_no_validity_left_is_rejected_before_anything_is_sent() {
    let nodes = five_nodes().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("short");
    // 2 ms minus the 2 ms drift allowance: no validity can ever remain.
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(2))
        .with_wait(Duration::from_secs(30));
    let started = Instant::now();
    match locks.lock_with(&name, opts).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "ttl"),
        other => panic!("expected an invalid TTL, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "returned at once"
    );
    for node in &nodes {
        assert_eq!(token_on(node, &name).await, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_needs_a_majority_of_distinct_nodes() {
    let nodes = five_nodes().await;
    for node in &nodes[2..] {
        node.stop().await;
    }
    let result = LockManager::builder()
        .with_node_timeout(NODE_TIMEOUT)
        .connect_redlock(nodes.iter().map(RedisNode::url))
        .await;
    match result {
        Err(Error::Quorum(q)) => {
            assert_eq!(q.operation(), QuorumOperation::Connect);
            let failed: Vec<&str> = q.failures().map(|(node, _)| node).collect();
            let down: Vec<String> = nodes[2..].iter().map(name_of).collect();
            assert_eq!(failed, down);
        }
        other => panic!("expected a quorum error, got {other:?}"),
    }

    // With a majority up it connects, and the others are picked up once they are back.
    nodes[2].start_again().await;
    let locks = redlock(&nodes).await;
    let name = unique_key("connect");
    locks
        .try_lock(&name)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    nodes[3].start_again().await;
    nodes[4].start_again().await;
    until_every_node_answers(&locks, &nodes).await;

    // The same server twice would let one failure count twice.
    let twice = [nodes[0].url(), nodes[1].url(), nodes[0].url()];
    match LockManager::builder().connect_redlock(twice).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "nodes"),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
    let none: [&str; 0] = [];
    match LockManager::builder().connect_redlock(none).await {
        Err(Error::InvalidArgument(arg)) => assert_eq!(arg.what(), "nodes"),
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

/// A contended attempt (one that follows an attempt that found the lock held) asks each
/// node's `PTTL` with its `SET`: a node another owner holds costs no second round trip,
/// which the whole vote, the winner's included, would wait for. Observed through the
/// guard's validity, which counts from the winning attempt's start: with 250 ms each way
/// to every node, a winning attempt of one round trip leaves about TTL − 0.5 s, one that
/// waits for a second round trip on the held nodes at most TTL − 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_attempt_learns_a_held_nodes_ttl_in_the_same_round_trip() {
    const TTL: Duration = Duration::from_secs(3);
    const EACH_WAY: Duration = Duration::from_millis(250);
    let nodes = five_nodes().await;
    let mut proxies = Vec::new();
    for node in &nodes {
        proxies.push(FaultProxy::start(node.port()).await);
    }
    let locks = LockManager::builder()
        .with_node_timeout(Duration::from_secs(3))
        .with_command_timeout(Duration::from_secs(3))
        .with_notify(false)
        .connect_redlock(proxies.iter().map(FaultProxy::url))
        .await
        .unwrap();
    warm_up(&locks, &nodes).await;
    let name = unique_key("contended-pttl");
    // Another owner: for good on two nodes, for 600 ms on the other three, so the first
    // attempt finds the lock held and the next one (contended) takes three nodes.
    for (i, node) in nodes.iter().enumerate() {
        let px = if i < 2 { 30_000 } else { 600 };
        support::set_lease(&mut node.conn().await, &name, "another-owner", px).await;
    }
    for proxy in &proxies {
        proxy.set(Fault::Latency(EACH_WAY));
    }
    let options = LockOptions::new()
        .with_ttl(TTL)
        .with_wait(Duration::from_secs(20))
        .with_backoff(
            distlock::Backoff::new()
                .with_base(Duration::from_millis(50))
                .with_cap(Duration::from_millis(50))
                .with_jitter(false),
        );
    let guard = locks.lock_with(&name, options).await.unwrap();
    let left = guard
        .valid_until()
        .saturating_duration_since(Instant::now());
    for proxy in &proxies {
        proxy.set(Fault::Pass);
    }
    assert!(
        left > TTL - Duration::from_millis(800),
        "the winning attempt took two round trips: {left:?} of {TTL:?} left"
    );
    guard.release().await.unwrap();
    let mut expected = vec![None; nodes.len()];
    expected[0] = Some("another-owner".to_owned());
    expected[1] = Some("another-owner".to_owned());
    assert_eq!(tokens_on(&nodes, &name).await, expected);
}
