//! Fair mode with replies delayed, reordered and lost (issue 12's "mutual exclusion in fair
//! mode" and "cancellation at every await leaves no entry", searched by a generator rather
//! than replayed): concurrent waiters over three managers, two of them on hostile
//! connections (tests/support/hostile.rs) with a random plan per case, one on a plain
//! connection with release notifications; on one primary, and over three (Redlock). Waiters
//! start at random times, take a lock (fairly or not), a semaphore's permit, or a
//! read-write lock as reader or writer, wait or try once, are cancelled at a random point
//! (before, during or after any of their round trips), hold for a while and release or drop
//! their guard.
//!
//! Invariants, per case (a guard's belief: from its acquire's return to the earlier of its
//! `valid_until()` and its release):
//! - (a) no two beliefs in the lock overlap, no more than [`PERMITS`] in the semaphore, and
//!   none with a writer's in the read-write lock;
//! - (b) a guard is returned with validity left;
//! - (c) every call returns within its wait budget plus one command timeout (and slack);
//! - (d) once every waiter is done and the managers are dropped, nothing is left behind:
//!   no lease, no queue key, no subscription, connection or task.

use crate::support;

use std::time::{Duration, Instant};

use distlock::{LockManager, LockOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use support::hostile::{Action, HostileConnection};
use support::{Baseline, RedisNode, unique_key};

/// The command timeout of every manager: every call's budget includes it once.
const CMD_TIMEOUT: Duration = Duration::from_secs(1);
/// What a call may take beyond its wait budget and one command timeout.
const SLACK: Duration = Duration::from_millis(300);
/// How long before the caller saw `Ok` a guard may have run out without failing (b):
/// this thread may be descheduled right after the library returned.
const B_TOLERANCE: Duration = Duration::from_millis(3);

/// How a hostile connection treats the commands whose sequence number falls on it.
#[derive(Debug, Clone)]
struct Chaos {
    route: usize,
    send_ms: u64,
    reply_ms: u64,
    lose_ms: Option<u64>,
}

/// What a waiter takes: the lock, a permit of a semaphore of [`PERMITS`], or a read-write
/// lock as a reader or the writer (each on a name of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lock,
    Permit,
    Read,
    Write,
}

/// The semaphore's permits.
const PERMITS: u32 = 2;

#[derive(Debug, Clone)]
struct Waiter {
    kind: Kind,
    /// 0 and 1: hostile connections; 2: a plain connection with notifications.
    mgr: usize,
    start_ms: u64,
    ttl_ms: u64,
    /// 0: `try_lock_with`; otherwise `lock_with` with this budget.
    wait_ms: u64,
    fair: bool,
    queue_lease_ms: u64,
    auto: bool,
    hold_ms: u64,
    cancel_ms: Option<u64>,
    /// Release explicitly (else drop the guard).
    release: bool,
}

#[derive(Debug, Clone)]
struct Case {
    chaos: Vec<Chaos>,
    waiters: Vec<Waiter>,
}

fn chaos() -> impl Strategy<Value = Chaos> {
    (
        0usize..2,
        prop_oneof![1 => Just(0u64), 1 => 0u64..120],
        prop_oneof![1 => Just(0u64), 1 => 0u64..200],
        prop_oneof![5 => Just(None), 1 => (0u64..200).prop_map(Some)],
    )
        .prop_map(|(route, send_ms, reply_ms, lose_ms)| Chaos {
            route,
            send_ms,
            reply_ms,
            lose_ms,
        })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => Just(Kind::Lock),
        2 => Just(Kind::Permit),
        1 => Just(Kind::Read),
        1 => Just(Kind::Write),
    ]
}

fn waiter() -> impl Strategy<Value = Waiter> {
    (
        (kind(), 0usize..3),
        0u64..300,
        prop_oneof![2 => 60u64..400, 1 => 60u64..2_000],
        prop_oneof![1 => Just(0u64), 4 => 50u64..1_500],
        prop_oneof![4 => Just(true), 1 => Just(false)],
        prop_oneof![1 => Just(1_000u64), 1 => 60u64..1_000],
        any::<bool>(),
        0u64..80,
        prop_oneof![3 => Just(None), 1 => (0u64..600).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(
            |(
                (kind, mgr),
                start_ms,
                ttl_ms,
                wait_ms,
                fair,
                queue_lease_ms,
                auto,
                hold_ms,
                cancel_ms,
                release,
            )| {
                Waiter {
                    kind,
                    mgr,
                    start_ms,
                    ttl_ms,
                    wait_ms,
                    fair,
                    queue_lease_ms,
                    auto,
                    hold_ms,
                    cancel_ms,
                    release,
                }
            },
        )
}

/// A waiter of a queue that forms at once: fair, on the lock, arriving within 60 ms, with a
/// budget long enough to be served (where releases hand the lease from one to the next).
fn queued_waiter() -> impl Strategy<Value = Waiter> {
    (waiter(), 0u64..60, 500u64..1_500).prop_map(|(w, start_ms, wait_ms)| Waiter {
        kind: Kind::Lock,
        fair: true,
        start_ms,
        wait_ms,
        ..w
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(chaos(), 1..6),
        prop_oneof![
            proptest::collection::vec(waiter(), 2..8),
            proptest::collection::vec(queued_waiter(), 3..8),
        ],
    )
        .prop_map(|(chaos, waiters)| Case { chaos, waiters })
}

/// One guard's belief: it held the lock from `from` to `until`.
#[derive(Debug, Clone, Copy)]
struct Held {
    waiter: usize,
    kind: Kind,
    from: Instant,
    until: Instant,
}

/// Violations of (a) among the beliefs `held`: two holders of the lock at once, more
/// than [`PERMITS`] holders of the semaphore at once, a writer at the same time as anyone
/// else on the read-write lock.
fn overlaps(held: &[Held], origin: Instant) -> Vec<String> {
    let at = |t: Instant| t - origin;
    let both = |a: &Held, b: &Held| a.from < b.until && b.from < a.until;
    let mut found = Vec::new();
    for (n, a) in held.iter().enumerate() {
        for b in &held[n + 1..] {
            let conflict = matches!(
                (a.kind, b.kind),
                (Kind::Lock, Kind::Lock)
                    | (Kind::Write, Kind::Read | Kind::Write)
                    | (Kind::Read, Kind::Write)
            );
            if conflict && both(a, b) {
                found.push(format!(
                    "(a) waiters {} ({:?}, {:?}..{:?}) and {} ({:?}, {:?}..{:?}) believed they held at once",
                    a.waiter, a.kind, at(a.from), at(a.until), b.waiter, b.kind, at(b.from), at(b.until)
                ));
            }
        }
        // The most permits held at once are held at the start of one of them.
        if a.kind == Kind::Permit {
            let holders: Vec<usize> = held
                .iter()
                .filter(|b| b.kind == Kind::Permit && b.from <= a.from && a.from < b.until)
                .map(|b| b.waiter)
                .collect();
            if holders.len() > PERMITS as usize {
                found.push(format!(
                    "(a) waiters {holders:?} believed they held a permit at once at {:?}, of {PERMITS}",
                    at(a.from)
                ));
            }
        }
    }
    found
}

/// Runs one waiter; returns its belief interval if it got the lock, or a violation of (b)
/// or (c).
async fn run_waiter(
    locks: LockManager,
    name: String,
    i: usize,
    w: Waiter,
    origin: Instant,
) -> Result<Option<Held>, String> {
    tokio::time::sleep(Duration::from_millis(w.start_ms)).await;
    let opts = LockOptions::new()
        .with_ttl(Duration::from_millis(w.ttl_ms))
        .with_wait(Duration::from_millis(w.wait_ms))
        .with_fair(w.fair)
        .with_queue_lease(Duration::from_millis(w.queue_lease_ms))
        .with_auto_extend(w.auto);
    let budget = Duration::from_millis(w.wait_ms) + CMD_TIMEOUT + SLACK;
    let started = Instant::now();
    let try_once = w.wait_ms == 0;
    let call = async {
        match w.kind {
            Kind::Lock if try_once => locks.try_lock_with(&name, opts).await,
            Kind::Lock => locks.lock_with(&name, opts).await,
            Kind::Permit => {
                let semaphore = locks.semaphore(format!("{name}:sem"), PERMITS)?;
                match try_once {
                    true => semaphore.try_acquire_with(opts).await,
                    false => semaphore.acquire_with(opts).await,
                }
            }
            Kind::Read | Kind::Write => {
                let rw = locks.rw_lock(format!("{name}:rw"))?;
                match (w.kind, try_once) {
                    (Kind::Read, true) => rw.try_read().await,
                    (Kind::Read, false) => rw.read_with(opts).await,
                    (_, true) => rw.try_write().await,
                    (_, false) => rw.write_with(opts).await,
                }
            }
        }
    };
    let out = match w.cancel_ms {
        None => Some(call.await),
        Some(ms) => tokio::time::timeout(Duration::from_millis(ms), call)
            .await
            .ok(),
    };
    let returned = Instant::now();
    if out.is_some() && returned - started > budget {
        return Err(format!(
            "(c) waiter {i} took {:?}, over its budget {budget:?}",
            returned - started
        ));
    }
    let Some(Ok(guard)) = out else {
        return Ok(None);
    };
    if guard.valid_until() + B_TOLERANCE <= returned {
        return Err(format!(
            "(b) waiter {i}: Ok(guard) with no validity left at return ({:?} after the start)",
            returned - origin
        ));
    }
    tokio::time::sleep(Duration::from_millis(w.hold_ms)).await;
    let until = guard.valid_until().min(Instant::now());
    if w.release {
        let _ = tokio::time::timeout(CMD_TIMEOUT + SLACK, guard.release()).await;
    } else {
        drop(guard);
    }
    Ok(Some(Held {
        waiter: i,
        kind: w.kind,
        from: returned,
        until,
    }))
}

/// A hostile connection to `node` whose plan takes the chaos entry of each command's
/// sequence number, shifted by `shift` (so that no two connections of a case behave alike).
async fn hostile_to(node: &RedisNode, chaos: &[Chaos], shift: usize) -> HostileConnection {
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    let chaos = chaos.to_vec();
    hostile.set_plan(move |cmd| {
        let c = &chaos[(cmd.seq as usize + shift) % chaos.len()];
        let mut action = Action::pass()
            .via(c.route)
            .delay_send(Duration::from_millis(c.send_ms))
            .delay_reply(Duration::from_millis(c.reply_ms));
        if let Some(ms) = c.lose_ms {
            action = action.lose_reply(Duration::from_millis(ms));
        }
        action
    });
    hostile
}

/// The three managers of a case: two on hostile connections (on one primary, the second
/// listens for releases on a plain link), one on plain connections with release
/// notifications. With one node, single-primary managers; with several,
/// Redlock managers over all of them.
async fn managers(
    nodes: &[RedisNode],
    chaos: &[Chaos],
) -> (Vec<LockManager>, Vec<HostileConnection>) {
    let builder = || LockManager::builder().with_command_timeout(CMD_TIMEOUT);
    let mut hostiles = Vec::new();
    let mut managers = Vec::new();
    for h in 0..2 {
        let mut conns = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            conns.push(hostile_to(node, chaos, h + n * 2).await);
        }
        let manager = match &conns[..] {
            // The second one listens for releases: its waiters hear a handed lease on a
            // plain link while their attempts go through the hostile one.
            [one] if h == 1 => builder()
                .with_notify_via(nodes[0].client())
                .build(one.clone()),
            [one] => builder().build(one.clone()),
            _ => builder().build_redlock(conns.iter().cloned()),
        };
        managers.push(manager.expect("manager on hostile connections"));
        hostiles.extend(conns);
    }
    let plain = match nodes {
        [one] => builder().connect(&one.url()).await,
        _ => {
            builder()
                .connect_redlock(nodes.iter().map(RedisNode::url))
                .await
        }
    };
    managers.push(plain.expect("plain manager"));
    (managers, hostiles)
}

async fn run(nodes: &[RedisNode], case: Case) -> Result<(), TestCaseError> {
    let mut baselines = Vec::new();
    for node in nodes {
        baselines.push(Baseline::take(node).await);
    }
    let name = unique_key("fair-hostile");
    let (managers, hostiles) = managers(nodes, &case.chaos).await;
    let origin = Instant::now();
    let tasks: Vec<_> = case
        .waiters
        .iter()
        .enumerate()
        .map(|(i, w)| {
            tokio::spawn(run_waiter(
                managers[w.mgr].clone(),
                name.clone(),
                i,
                w.clone(),
                origin,
            ))
        })
        .collect();
    let mut held = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(Ok(Some(h)))) => held.push(h),
            Ok(Ok(Ok(None))) => {}
            Ok(Ok(Err(violation))) => failures.push(violation),
            Ok(Err(e)) => failures.push(format!("a waiter panicked: {e}")),
            Err(_) => failures.push("a waiter hung for 30 s".to_owned()),
        }
    }
    failures.extend(overlaps(&held, origin));
    for h in &hostiles {
        h.clear_plan();
    }
    drop(managers);
    drop(hostiles);
    for (n, (node, baseline)) in nodes.iter().zip(&baselines).enumerate() {
        if let Some(left) = baseline.left_behind(node, Duration::from_secs(6)).await {
            failures.push(format!("(d) node {n} not settled after the case: {left}"));
        }
    }
    match failures.is_empty() {
        true => Ok(()),
        false => Err(TestCaseError::fail(failures.join("\n"))),
    }
}

/// Cases per run: `PROPTEST_CASES`, default 16.
fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    Config {
        cases,
        max_shrink_iters: 32,
        max_shrink_time: 180_000,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs the generated cases on `nodes` (one: a single primary; several: Redlock).
fn run_cases(nodes: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let nodes: Vec<RedisNode> = rt.block_on(async {
        let mut started = Vec::new();
        for _ in 0..nodes {
            started.push(RedisNode::start().await);
        }
        started
    });
    let result = TestRunner::new(config()).run(&case(), |case| rt.block_on(run(&nodes, case)));
    rt.block_on(async move { drop(nodes) });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Generated schedules of fair and plain waiters over hostile and plain connections to
/// one primary: invariants (a)–(d) of the module hold in every case.
#[test]
fn fair_waiters_keep_exclusion_and_leave_nothing_under_hostile_schedules() {
    run_cases(1);
}

/// The same over three primaries (Redlock; fair mode's queue on the lock's first node),
/// every node behind its own hostile connection in the hostile managers.
#[test]
fn redlock_waiters_keep_exclusion_and_leave_nothing_under_hostile_schedules() {
    run_cases(3);
}
