//! Futures of the semaphore, the read-write lock and `lock_all` dropped at random points,
//! and after each of their awaits in turn: whatever await they were cut at, nothing is
//! left behind once the background cleanup ran (no permit, no reader, no writer key, no
//! intent, no lock key), an acquire that returned holds its entries on the server, and a
//! cut extend never leaves a guard believing more than the server grants.

use crate::primitive_belief::{Belief, KeyView, token_prefix, view, within_truth};
use crate::support;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use distlock::{Backoff, LockGuard, LockManager, LockOptions, MultiGuard};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use support::proxy::{Fault, FaultProxy};
use support::{Baseline, RedisNode, lease_key, unique_key};

/// Iterations per operation; each drops one future at a random point (or lets it finish).
const ITERATIONS: usize = 40;
/// Every entry here lives 60 s unless given back: "gone within a few seconds" can only be
/// the work of a (background) release, or of an intent's own 2 s lease.
const LONG_TTL: Duration = Duration::from_secs(60);
/// A call that waits for a blocker: always cut before this budget ends.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum Op {
    Acquire,
    TryAcquire,
    AcquireWaiting,
    Read,
    ReadWaiting,
    Write,
    WriteWaiting,
    LockAll,
    LockAllWaiting,
    Extend,
    Release,
}

const OPS: [Op; 11] = [
    Op::Acquire,
    Op::TryAcquire,
    Op::AcquireWaiting,
    Op::Read,
    Op::ReadWaiting,
    Op::Write,
    Op::WriteWaiting,
    Op::LockAll,
    Op::LockAllWaiting,
    Op::Extend,
    Op::Release,
];

fn sem_key(name: &str) -> String {
    format!("{}sem:{{{name}}}", distlock::DEFAULT_PREFIX)
}

fn rw_key(name: &str) -> String {
    format!("{}rw:{{{name}}}", distlock::DEFAULT_PREFIX)
}

/// Where a guard's entry lives: a member of a set of permits, or a string key.
#[derive(Debug, Clone)]
enum Entry {
    Member(String),
    Key(String),
}

impl Entry {
    fn key(&self) -> &str {
        match self {
            Entry::Member(k) | Entry::Key(k) => k,
        }
    }

    fn left(&self, view: &KeyView, now_ms: i64, token: &str) -> Option<i64> {
        match self {
            Entry::Member(_) => view.member_left(token, now_ms),
            Entry::Key(_) => view.string_left(token),
        }
    }
}

/// No false hold: a guard that says it is held has its entry on the server, with at least
/// its believed time left.
async fn assert_true_hold(raw: &mut MultiplexedConnection, guard: &LockGuard, entry: &Entry) {
    let belief = Belief::of(guard);
    assert!(belief.held, "a guard just returned is held: {guard:?}");
    let view = view(raw, &[entry.key().to_owned()]).await;
    let left = entry.left(&view.keys[0], view.now_ms, &token_prefix(guard));
    if let Err(e) = within_truth(&belief, left, view.replied, &format!("{entry:?}")) {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitive_futures_dropped_at_random_points_leave_nothing_behind_and_no_false_hold() {
    let seed = std::env::var("DISTLOCK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("primitive cancellation: seed {seed} (rerun with DISTLOCK_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);

    let node = RedisNode::start().await;
    // 1 ms each way widens every round trip to a few ms, so random drop points land
    // before a request, while it is in flight, and after its reply alike.
    let proxy = FaultProxy::start(node.port()).await;
    proxy.set(Fault::Latency(Duration::from_millis(1)));
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&proxy.url()).await.unwrap();
    let prefix = unique_key("pcancel");
    let long = LockOptions::new().with_ttl(LONG_TTL);
    let waiting = long.with_wait(WAIT);

    // Blockers: a full semaphore, a read-write lock with a reader, one with a writer, and
    // a lock that sorts after every `lock_all` name below (digits sort before letters).
    let full = locks.semaphore(format!("{prefix}:full"), 1).unwrap();
    let full_permit = full.acquire_with(long).await.unwrap();
    let read_held = locks.rw_lock(format!("{prefix}:read-held")).unwrap();
    let reader = read_held.read_with(long).await.unwrap();
    let write_held = locks.rw_lock(format!("{prefix}:write-held")).unwrap();
    let writer = write_held.write_with(long).await.unwrap();
    let blocker_name = format!("{prefix}:zz-blocker");
    let blocker = locks.try_lock_with(&blocker_name, long).await.unwrap();

    let (mut dropped, mut completed, mut extends_checked) = (0usize, 0usize, 0usize);
    let mut waits_cut = 0usize;
    for i in 0..ITERATIONS * OPS.len() {
        let op = OPS[i % OPS.len()];
        let name = format!("{prefix}:{i}");
        let cut = Duration::from_micros(rng.random_range(0..15_000));
        let finished = match op {
            Op::Acquire | Op::TryAcquire => {
                let sem = locks.semaphore(&name, 2).unwrap();
                let out = match op {
                    Op::Acquire => tokio::time::timeout(cut, sem.acquire_with(long)).await,
                    _ => tokio::time::timeout(cut, sem.try_acquire_with(long)).await,
                };
                let finished = out.is_ok();
                if let Ok(permit) = out {
                    let permit = permit.unwrap();
                    assert_true_hold(&mut raw, &permit, &Entry::Member(sem_key(&name))).await;
                    drop(permit);
                }
                finished
            }
            Op::Read | Op::Write => {
                let rw = locks.rw_lock(&name).unwrap();
                let (out, entry) = match op {
                    Op::Read => (
                        tokio::time::timeout(cut, rw.read_with(long)).await,
                        Entry::Member(rw_key(&name)),
                    ),
                    _ => (
                        tokio::time::timeout(cut, rw.write_with(long)).await,
                        Entry::Key(format!("{}:w", rw_key(&name))),
                    ),
                };
                let finished = out.is_ok();
                if let Ok(guard) = out {
                    let guard = guard.unwrap();
                    assert_true_hold(&mut raw, &guard, &entry).await;
                    guard.release().await.unwrap();
                }
                finished
            }
            Op::LockAll => {
                let names = [
                    format!("{name}:a"),
                    format!("{name}:b"),
                    format!("{name}:c"),
                ];
                let out = tokio::time::timeout(cut, locks.lock_all_with(&names, long)).await;
                let finished = out.is_ok();
                if let Ok(all) = out {
                    let all = all.unwrap();
                    for (guard, name) in all.guards().iter().zip(&names) {
                        assert_true_hold(&mut raw, guard, &Entry::Key(lease_key(name))).await;
                    }
                    all.release().await.unwrap();
                }
                finished
            }
            Op::AcquireWaiting | Op::ReadWaiting | Op::WriteWaiting | Op::LockAllWaiting => {
                // Held by a blocker: always dropped while waiting (after taking the first
                // two locks, for `lock_all`; after leaving an intent, for the writer).
                let cut_off = match op {
                    Op::AcquireWaiting => tokio::time::timeout(cut, full.acquire_with(waiting))
                        .await
                        .is_err(),
                    Op::ReadWaiting => tokio::time::timeout(cut, write_held.read_with(waiting))
                        .await
                        .is_err(),
                    Op::WriteWaiting => tokio::time::timeout(cut, read_held.write_with(waiting))
                        .await
                        .is_err(),
                    _ => {
                        let names = [
                            format!("{name}:a"),
                            format!("{name}:b"),
                            blocker_name.clone(),
                        ];
                        tokio::time::timeout(cut, locks.lock_all_with(&names, waiting))
                            .await
                            .is_err()
                    }
                };
                assert!(
                    cut_off,
                    "{op:?}: the blocker holds it, the call cannot finish"
                );
                waits_cut += 1;
                continue;
            }
            Op::Extend => {
                // A permit, a read guard and a write guard in turn, each with a 10 s lease;
                // a cut extend to 60 s must never leave the guard believing more than the
                // server grants (a 10 s belief of a 60 s entry is safe, not the reverse).
                let short = LockOptions::new().with_ttl(Duration::from_secs(10));
                let (guard, entry) = match (i / OPS.len()) % 3 {
                    0 => {
                        let sem = locks.semaphore(&name, 1).unwrap();
                        (
                            sem.try_acquire_with(short).await.unwrap(),
                            Entry::Member(sem_key(&name)),
                        )
                    }
                    1 => {
                        let rw = locks.rw_lock(&name).unwrap();
                        (
                            rw.read_with(short).await.unwrap(),
                            Entry::Member(rw_key(&name)),
                        )
                    }
                    _ => {
                        let rw = locks.rw_lock(&name).unwrap();
                        let key = Entry::Key(format!("{}:w", rw_key(&name)));
                        (rw.write_with(short).await.unwrap(), key)
                    }
                };
                let out = tokio::time::timeout(cut, guard.extend(LONG_TTL)).await;
                assert_true_hold(&mut raw, &guard, &entry).await;
                extends_checked += 1;
                guard.release().await.unwrap();
                out.is_ok()
            }
            Op::Release => {
                let guard = match (i / OPS.len()) % 3 {
                    0 => {
                        locks
                            .semaphore(&name, 1)
                            .unwrap()
                            .try_acquire_with(long)
                            .await
                    }
                    1 => locks.rw_lock(&name).unwrap().read_with(long).await,
                    _ => locks.rw_lock(&name).unwrap().write_with(long).await,
                };
                tokio::time::timeout(cut, guard.unwrap().release())
                    .await
                    .is_ok()
            }
        };
        if finished {
            completed += 1;
        } else {
            dropped += 1;
        }
    }
    full_permit.release().await.unwrap();
    reader.release().await.unwrap();
    writer.release().await.unwrap();
    blocker.release().await.unwrap();

    // Everything the dropped futures may have left is released in the background, far
    // sooner than its 60 s TTL; a waiting writer's intent expires within 2 s.
    let started = Instant::now();
    let left = loop {
        let left = keys_under(&mut raw, &prefix).await;
        if left.is_empty() || started.elapsed() > Duration::from_secs(15) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        dropped > ITERATIONS,
        "many operations that could finish were cut off: {dropped} dropped"
    );
    eprintln!(
        "primitive cancellation: {} operations, {waits_cut} waits and {dropped} other futures \
         dropped mid-way, {completed} completed, {extends_checked} extends checked against the \
         server, nothing left ({:?} after the last drop)",
        ITERATIONS * OPS.len(),
        started.elapsed()
    );
    drop((locks, full, read_held, write_held));
    baseline.assert_settled(&node, Duration::from_secs(8)).await;
}

/// Keys (fence counters aside) of any kind whose name contains `prefix`.
async fn keys_under(raw: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let pattern = format!("{}*{prefix}*", distlock::DEFAULT_PREFIX);
    let mut keys: Vec<String> = Vec::new();
    let mut iter: redis::AsyncIter<String> = raw.scan_match(pattern).await.unwrap();
    while let Some(key) = iter.next_item().await {
        keys.push(key.unwrap());
    }
    keys.retain(|k| !k.ends_with(":fence"));
    keys
}

/// Polls the future until it has returned `Pending` `cuts` times, then hands it back
/// unfinished (`Err`), stopped at that await, unless it finished first (`Ok`). The future
/// is only polled again when its waker fires, so each cut lands on a later await than the
/// one before.
struct CutAfter<F> {
    fut: Option<F>,
    cuts: usize,
}

impl<F: Future + Unpin> Future for CutAfter<F> {
    type Output = Result<F::Output, F>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.fut.as_mut().expect("polled after it finished");
        match Pin::new(fut).poll(cx) {
            Poll::Ready(out) => Poll::Ready(Ok(out)),
            Poll::Pending if self.cuts == 0 => {
                Poll::Ready(Err(self.fut.take().expect("still there")))
            }
            Poll::Pending => {
                self.cuts -= 1;
                Poll::Pending
            }
        }
    }
}

/// How long a cut future is kept, unpolled, before it is dropped: at once (a request not
/// yet written is never sent), or after its request left and its reply came back unread.
const LINGER: [Duration; 2] = [Duration::ZERO, Duration::from_millis(8)];

/// What a swept call returned.
enum Got {
    One(LockGuard, Entry),
    All(MultiGuard, Vec<String>),
}

type Call<'a> = Pin<Box<dyn Future<Output = distlock::Result<Got>> + Send + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primitive_futures_dropped_after_each_of_their_awaits_leave_nothing_behind() {
    let node = RedisNode::start().await;
    let proxy = FaultProxy::start(node.port()).await;
    proxy.set(Fault::Latency(Duration::from_millis(1)));
    let mut raw = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let locks = LockManager::connect(&proxy.url()).await.unwrap();
    let prefix = unique_key("psweep");
    let long = LockOptions::new().with_ttl(LONG_TTL);
    // Waiting calls poll often, so a handful of cuts reach deep into their waits.
    let waiting = long.with_wait(WAIT).with_backoff(
        Backoff::new()
            .with_base(Duration::from_millis(1))
            .with_cap(Duration::from_millis(5)),
    );
    let full = locks.semaphore(format!("{prefix}:full"), 1).unwrap();
    let full_permit = full.acquire_with(long).await.unwrap();
    let read_held = locks.rw_lock(format!("{prefix}:read-held")).unwrap();
    let reader = read_held.read_with(long).await.unwrap();
    let write_held = locks.rw_lock(format!("{prefix}:write-held")).unwrap();
    let writer = write_held.write_with(long).await.unwrap();
    let blocker_name = format!("{prefix}:zz-blocker");
    let blocker = locks.try_lock_with(&blocker_name, long).await.unwrap();

    let kinds = [
        "acquire",
        "read",
        "write",
        "lock_all",
        "acquire waiting",
        "read waiting",
        "write waiting",
        "lock_all waiting",
    ];
    let mut calls = 0usize;
    for ((o, kind), linger) in kinds
        .iter()
        .enumerate()
        .flat_map(|k| LINGER.map(|l| (k, l)))
    {
        // Free calls are swept until one finishes; waiting calls never can.
        let (mut cuts, most) = if kind.ends_with("waiting") {
            (0, 12)
        } else {
            (0, 200)
        };
        loop {
            let name = format!("{prefix}:{o}:{}:{cuts}", linger.as_millis());
            let sem = locks.semaphore(&name, 2).unwrap();
            let rw = locks.rw_lock(&name).unwrap();
            let names = vec![
                format!("{name}:a"),
                format!("{name}:b"),
                format!("{name}:c"),
            ];
            let blocked = vec![
                format!("{name}:a"),
                format!("{name}:b"),
                blocker_name.clone(),
            ];
            let call: Call<'_> = match *kind {
                "acquire" => Box::pin(async {
                    let g = sem.acquire_with(long).await?;
                    Ok(Got::One(g, Entry::Member(sem_key(&name))))
                }),
                "read" => Box::pin(async {
                    let g = rw.read_with(long).await?;
                    Ok(Got::One(g, Entry::Member(rw_key(&name))))
                }),
                "write" => Box::pin(async {
                    let g = rw.write_with(long).await?;
                    Ok(Got::One(g, Entry::Key(format!("{}:w", rw_key(&name)))))
                }),
                "lock_all" => Box::pin(async {
                    let all = locks.lock_all_with(&names, long).await?;
                    Ok(Got::All(all, names.clone()))
                }),
                "acquire waiting" => Box::pin(async {
                    let g = full.acquire_with(waiting).await?;
                    Ok(Got::One(g, Entry::Member(String::new())))
                }),
                "read waiting" => Box::pin(async {
                    let g = write_held.read_with(waiting).await?;
                    Ok(Got::One(g, Entry::Member(String::new())))
                }),
                "write waiting" => Box::pin(async {
                    let g = read_held.write_with(waiting).await?;
                    Ok(Got::One(g, Entry::Member(String::new())))
                }),
                _ => Box::pin(async {
                    let all = locks.lock_all_with(&blocked, waiting).await?;
                    Ok(Got::All(all, Vec::new()))
                }),
            };
            calls += 1;
            let out = match (CutAfter {
                fut: Some(call),
                cuts,
            })
            .await
            {
                Ok(out) => Some(out),
                Err(unfinished) => {
                    tokio::time::sleep(linger).await;
                    drop(unfinished);
                    None
                }
            };
            let Some(out) = out else {
                cuts += 1;
                if cuts < most {
                    continue;
                }
                assert!(kind.ends_with("waiting"), "{kind} never finished");
                eprintln!("{kind}: dropped at each of its first {cuts} awaits ({linger:?} later)");
                break;
            };
            assert!(
                !kind.ends_with("waiting"),
                "{kind}: the blocker holds it: {}",
                out.is_ok()
            );
            match out.unwrap() {
                Got::One(guard, entry) => {
                    assert_true_hold(&mut raw, &guard, &entry).await;
                    guard.release().await.unwrap();
                }
                Got::All(all, names) => {
                    for (guard, name) in all.guards().iter().zip(&names) {
                        assert_true_hold(&mut raw, guard, &Entry::Key(lease_key(name))).await;
                    }
                    all.release().await.unwrap();
                }
            }
            eprintln!(
                "{kind}: dropped at each of its {cuts} awaits ({linger:?} later), then let finish"
            );
            break;
        }
    }
    full_permit.release().await.unwrap();
    reader.release().await.unwrap();
    writer.release().await.unwrap();
    blocker.release().await.unwrap();
    let started = Instant::now();
    let left = loop {
        let left = keys_under(&mut raw, &prefix).await;
        if left.is_empty() || started.elapsed() > Duration::from_secs(15) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(left.is_empty(), "left behind after {calls} calls: {left:?}");
    drop((locks, full, read_held, write_held));
    baseline.assert_settled(&node, Duration::from_secs(8)).await;
}
