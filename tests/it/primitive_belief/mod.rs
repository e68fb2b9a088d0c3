//! "Belief never exceeds truth" for the semaphore's permits, the read-write lock's read and
//! write guards and `lock_all`'s `MultiGuard`, under schedules proptest generates: replies
//! delayed, reordered and lost by the hostile connection (tests/support/hostile.rs),
//! futures cancelled part-way. After every step each guard that believes it holds is
//! checked against the real server (its entry with its token, an expiry not earlier than
//! its belief), and the primitive's own exclusion is checked on beliefs and on the server;
//! after every case, that nothing is left behind.
//!
//! This module holds what the three properties share: the chaos plan, the steps every
//! guard kind takes (extend, two racing extends, release, drop, `SCRIPT FLUSH`, sleep),
//! one atomic read of the server's keys, and the runner.

use crate::support;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use distlock::{LockGuard, LockManager, LockOptions, MIN_TTL, MultiGuard};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use redis::aio::MultiplexedConnection;
use support::hostile::{Action, HostileConnection};
use support::{Baseline, RedisNode};

mod multi;
mod rwlock;
mod semaphore;

/// The command timeout of every manager here.
pub(super) const CMD_TIMEOUT: Duration = Duration::from_secs(1);
/// Beyond its wait budget and command timeouts, how long a call may take before it counts
/// as hung: generous, so a loaded machine never trips it.
const HANG: Duration = Duration::from_secs(5);
/// Slack on the server's side of a comparison: `PTTL` and the script's clock round down
/// to the millisecond, and the reply is read after the server computed it.
const ROUNDING: Duration = Duration::from_millis(3);

/// How the hostile connection treats the commands whose sequence number falls on it.
#[derive(Debug, Clone)]
pub(super) struct Chaos {
    route: usize,
    send_ms: u64,
    reply_ms: u64,
    lose_ms: Option<u64>,
}

pub(super) fn chaos() -> impl Strategy<Value = Vec<Chaos>> {
    let one = (
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
        });
    proptest::collection::vec(one, 1..6)
}

/// Sets the hostile connection's plan: command `seq` gets `chaos[seq % len]`.
pub(super) fn apply(hostile: &HostileConnection, chaos: Vec<Chaos>) {
    hostile.set_plan(move |cmd| {
        let c = &chaos[cmd.seq as usize % chaos.len()];
        let mut action = Action::pass()
            .via(c.route)
            .delay_send(Duration::from_millis(c.send_ms))
            .delay_reply(Duration::from_millis(c.reply_ms));
        if let Some(ms) = c.lose_ms {
            action = action.lose_reply(Duration::from_millis(ms));
        }
        action
    });
}

/// `Some(ms)`: the call's future is dropped after that long, if still running.
pub(super) fn cancel() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![4 => Just(None), 1 => (0u64..60).prop_map(Some)]
}

/// Mostly short TTLs: that is where replies can come back after the lease's time.
pub(super) fn acquire_ttl() -> impl Strategy<Value = u64> {
    prop_oneof![2 => 50u64..300, 1 => 50u64..2_000]
}

pub(super) fn wait_ms() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 1 => 0u64..400]
}

/// `None`: not auto-extended; `Some(cap)`: auto-extended, with an optional hold-time cap.
pub(super) fn auto() -> impl Strategy<Value = Option<Option<u64>>> {
    prop_oneof![
        1 => Just(None),
        1 => prop_oneof![1 => Just(None), 1 => (50u64..3_000).prop_map(Some)].prop_map(Some),
    ]
}

/// The options of one acquire step.
pub(super) fn options(ttl_ms: u64, wait_ms: u64, auto: Option<Option<u64>>) -> LockOptions {
    let mut opts = LockOptions::new()
        .with_ttl(Duration::from_millis(ttl_ms))
        .with_wait(Duration::from_millis(wait_ms))
        .with_auto_extend(auto.is_some());
    if let Some(Some(hold)) = auto {
        opts = opts.with_max_hold(Duration::from_millis(hold));
    }
    opts
}

/// A manager on the hostile connection and, for `managers == 2`, one on a plain one.
pub(super) async fn managers(
    node: &RedisNode,
    hostile: &HostileConnection,
    managers: usize,
) -> Vec<LockManager> {
    let mut out = vec![
        LockManager::builder()
            .with_command_timeout(CMD_TIMEOUT)
            .build(hostile.clone())
            .expect("hostile manager"),
    ];
    if managers == 2 {
        out.push(
            LockManager::builder()
                .with_command_timeout(CMD_TIMEOUT)
                .build(node.conn().await)
                .expect("plain manager"),
        );
    }
    out
}

pub(super) fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// The 8 hex digits a guard's Debug output shows of its token (enough to tell the few
/// tokens of a case apart).
pub(super) fn token_prefix(guard: &LockGuard) -> String {
    let debug = format!("{:?}", guard.handle());
    let at = debug.find("token: ").expect("the handle shows its token") + "token: ".len();
    let hex: String = debug[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert!(hex.len() >= 8, "a token prefix in {debug}");
    hex
}

/// `Some(out)` if `fut` finished before its cancel point (or there is none); a call that
/// outlives `budget` by [`HANG`] fails the case.
pub(super) async fn call<T>(
    fut: impl Future<Output = T>,
    cancel_ms: Option<u64>,
    budget: Duration,
    what: &str,
) -> Result<Option<T>, TestCaseError> {
    let limit = match cancel_ms {
        Some(ms) => Duration::from_millis(ms),
        None => budget + HANG,
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => Ok(Some(out)),
        Err(_) if cancel_ms.is_some() => Ok(None),
        Err(_) => Err(fail(format!(
            "{what} still running {limit:?} after it began (budget {budget:?})"
        ))),
    }
}

/// What a guard said, read before the server is asked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Belief {
    pub(super) held: bool,
    pub(super) valid_until: Instant,
    pub(super) read_at: Instant,
}

impl Belief {
    pub(super) fn of(guard: &LockGuard) -> Belief {
        let valid_until = guard.valid_until();
        let held = guard.is_held();
        Belief {
            held: held && valid_until > Instant::now(),
            valid_until,
            read_at: Instant::now(),
        }
    }
}

/// One key as the server had it.
#[derive(Debug, Clone, Default)]
pub(super) struct KeyView {
    pub(super) kind: String,
    pub(super) pttl: i64,
    /// A sorted set's members and scores (expiry in ms on the server's clock).
    pub(super) members: Vec<(String, i64)>,
    /// A string's value.
    pub(super) value: Option<String>,
}

/// Several keys read in one script: their views, the server's clock in ms, and when the
/// reply arrived.
#[derive(Debug, Clone)]
pub(super) struct View {
    pub(super) now_ms: i64,
    pub(super) replied: Instant,
    pub(super) keys: Vec<KeyView>,
}

const READ_KEYS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local body = {}
  if kind == 'zset' then body = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif kind == 'string' then body = {redis.call('GET', key)} end
  out[i] = {kind, redis.call('PTTL', key), body}
end
return {now, out}
"#;

pub(super) async fn view(check: &mut MultiplexedConnection, keys: &[String]) -> View {
    let script = redis::Script::new(READ_KEYS);
    let mut script = script.prepare_invoke();
    for key in keys {
        script.key(key);
    }
    let (now_ms, raw): (i64, Vec<(String, i64, Vec<String>)>) = script
        .invoke_async(check)
        .await
        .expect("read the primitive's keys");
    let replied = Instant::now();
    let keys = raw
        .into_iter()
        .map(|(kind, pttl, body)| {
            let mut view = KeyView {
                kind: kind.clone(),
                pttl,
                ..KeyView::default()
            };
            if kind == "zset" {
                view.members = body
                    .chunks(2)
                    .map(|p| (p[0].clone(), p[1].parse().expect("a score")))
                    .collect();
            } else {
                view.value = body.into_iter().next();
            }
            view
        })
        .collect();
    View {
        now_ms,
        replied,
        keys,
    }
}

impl KeyView {
    /// Milliseconds the member with token `prefix` has left, as the scripts count it (live
    /// while its score is above the server's clock, and never past the set's own expiry);
    /// `None` without such a member.
    pub(super) fn member_left(&self, prefix: &str, now_ms: i64) -> Option<i64> {
        let (_, score) = self.members.iter().find(|(m, _)| m.starts_with(prefix))?;
        let left = score - now_ms;
        Some(if self.pttl >= 0 {
            left.min(self.pttl)
        } else {
            left
        })
    }

    /// Members whose score is still ahead of the server's clock.
    pub(super) fn live_members(&self, now_ms: i64) -> usize {
        self.members.iter().filter(|(_, s)| *s > now_ms).count()
    }

    /// Milliseconds a string key holding token `prefix` has left (`i64::MAX` without an
    /// expiry); `None` if it holds something else or nothing.
    pub(super) fn string_left(&self, prefix: &str) -> Option<i64> {
        let ours =
            self.kind == "string" && self.value.as_deref().is_some_and(|v| v.starts_with(prefix));
        ours.then_some(if self.pttl == -1 { i64::MAX } else { self.pttl })
    }
}

/// Invariant 1 for one guard: if it believes it holds, the server has its entry
/// (`left_ms`) and that entry lives at least as long as the belief. The server answered
/// before `replied`: an entry it no longer had had ended by then, so a missing entry
/// counts as 0 ms left at `replied` (as in `belief.rs`), and only a belief that outlives
/// that (beyond the rounding) is a violation. A belief with 2 ms left can meet a missing
/// key honestly: the check's own round trip may take longer.
pub(super) fn within_truth(
    belief: &Belief,
    left_ms: Option<i64>,
    replied: Instant,
    what: &str,
) -> Result<(), TestCaseError> {
    if !belief.held {
        return Ok(());
    }
    let believed = belief.valid_until.saturating_duration_since(belief.read_at);
    let left = left_ms.unwrap_or(0);
    if left == i64::MAX {
        return Ok(());
    }
    let truth = replied + Duration::from_millis(left.max(0) as u64) + ROUNDING;
    if belief.valid_until <= truth {
        return Ok(());
    }
    Err(fail(match left_ms {
        None => format!(
            "{what} believes it holds ({believed:?} left, {:?} past the server's answer) but \
             the server has no entry with its token",
            belief.valid_until.saturating_duration_since(replied)
        ),
        Some(_) => {
            format!(
                "belief exceeds truth: {what} believes {believed:?} left, the server grants {left} ms"
            )
        }
    }))
}

#[test]
fn a_missing_entry_is_a_violation_only_for_a_belief_that_outlives_the_servers_answer() {
    let read_at = Instant::now();
    let belief = |left_ms: u64| Belief {
        held: true,
        valid_until: read_at + Duration::from_millis(left_ms),
        read_at,
    };
    // The server answered 6 ms after the belief was read: a belief with 2 ms left may
    // have ended (and its key expired) before the server looked.
    let replied = read_at + Duration::from_millis(6);
    assert!(within_truth(&belief(2), None, replied, "short").is_ok());
    // A belief that still had 50 ms when the server answered "no entry" exceeds it.
    assert!(within_truth(&belief(56), None, replied, "long").is_err());
    // An entry with 10 ms left at the answer covers a belief up to then (and rounding).
    assert!(within_truth(&belief(16), Some(10), replied, "covered").is_ok());
    assert!(within_truth(&belief(30), Some(10), replied, "beyond").is_err());
}

/// What every kind of guard can be asked.
pub(super) trait Guardlike {
    fn extend(&self, ttl: Duration) -> impl Future<Output = distlock::Result<()>>;
    fn release(self) -> impl Future<Output = distlock::Result<()>>;
}

impl Guardlike for LockGuard {
    fn extend(&self, ttl: Duration) -> impl Future<Output = distlock::Result<()>> {
        LockGuard::extend(self, ttl)
    }
    fn release(self) -> impl Future<Output = distlock::Result<()>> {
        LockGuard::release(self)
    }
}

impl Guardlike for MultiGuard {
    fn extend(&self, ttl: Duration) -> impl Future<Output = distlock::Result<()>> {
        MultiGuard::extend(self, ttl)
    }
    fn release(self) -> impl Future<Output = distlock::Result<()>> {
        MultiGuard::release(self)
    }
}

/// The steps every guard kind takes, on the guard in `slot`.
#[derive(Debug, Clone)]
pub(super) enum Common {
    Extend {
        slot: usize,
        ttl_ms: u64,
        cancel_ms: Option<u64>,
    },
    /// Two extends of one guard, the second `gap_ms` after the first: the server may run
    /// them in either order.
    TwoExtends {
        slot: usize,
        first_ms: u64,
        second_ms: u64,
        gap_ms: u64,
        cancel_ms: Option<u64>,
    },
    Release {
        slot: usize,
        cancel_ms: Option<u64>,
    },
    Drop {
        slot: usize,
    },
    /// Scripts go missing: every call must fall back to sending them again.
    ScriptFlush,
    Sleep {
        ms: u64,
    },
}

pub(super) fn common(slots: usize) -> impl Strategy<Value = Common> {
    let min = MIN_TTL.as_millis() as u64;
    let extend_ttl = move || prop_oneof![2 => min..300, 1 => min..2_000];
    prop_oneof![
        3 => (0..slots, extend_ttl(), cancel())
            .prop_map(|(slot, ttl_ms, cancel_ms)| Common::Extend { slot, ttl_ms, cancel_ms }),
        2 => (0..slots, extend_ttl(), extend_ttl(), 0u64..80, cancel()).prop_map(
            |(slot, first_ms, second_ms, gap_ms, cancel_ms)| Common::TwoExtends {
                slot,
                first_ms,
                second_ms,
                gap_ms,
                cancel_ms,
            }
        ),
        1 => (0..slots, cancel()).prop_map(|(slot, cancel_ms)| Common::Release { slot, cancel_ms }),
        1 => (0..slots).prop_map(|slot| Common::Drop { slot }),
        1 => Just(Common::ScriptFlush),
        2 => (0u64..400).prop_map(|ms| Common::Sleep { ms }),
    ]
}

/// Runs one common step; `guard` picks the guard out of a slot, `calls` is how many
/// command timeouts one call of it may spend.
pub(super) async fn run_common<S, G: Guardlike>(
    slots: &mut [Option<S>],
    step: &Common,
    check: &mut MultiplexedConnection,
    guard: impl Fn(&S) -> &G,
    into_guard: impl Fn(S) -> G,
    calls: u32,
) -> Result<(), TestCaseError> {
    let budget = CMD_TIMEOUT * calls;
    match step.clone() {
        Common::Extend {
            slot,
            ttl_ms,
            cancel_ms,
        } => {
            if let Some(s) = &slots[slot] {
                let ttl = Duration::from_millis(ttl_ms);
                call(guard(s).extend(ttl), cancel_ms, budget, "extend").await?;
            }
        }
        Common::TwoExtends {
            slot,
            first_ms,
            second_ms,
            gap_ms,
            cancel_ms,
        } => {
            if let Some(s) = &slots[slot] {
                let g = guard(s);
                let both = async {
                    tokio::join!(g.extend(Duration::from_millis(first_ms)), async {
                        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
                        g.extend(Duration::from_millis(second_ms)).await
                    })
                };
                let budget = budget + Duration::from_millis(gap_ms);
                call(both, cancel_ms, budget, "two extends").await?;
            }
        }
        Common::Release { slot, cancel_ms } => {
            if let Some(s) = slots[slot].take() {
                call(into_guard(s).release(), cancel_ms, budget, "release").await?;
            }
        }
        Common::Drop { slot } => drop(slots[slot].take()),
        Common::ScriptFlush => {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(check)
                .await
                .expect("SCRIPT FLUSH");
        }
        Common::Sleep { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
    }
    Ok(())
}

/// Waits until nothing is left behind since `baseline`, or fails the case.
pub(super) async fn settled(baseline: &Baseline, node: &RedisNode) -> Result<(), TestCaseError> {
    // Leases of at most 2 s (and intents of at most 2 s) expire within the limit even if
    // every background release were lost.
    match baseline.left_behind(node, Duration::from_secs(8)).await {
        None => Ok(()),
        Some(left) => Err(fail(format!("not settled after the case: {left}"))),
    }
}

/// Cases per property: `PROPTEST_CASES`, else `default`.
fn config(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        max_shrink_iters: 48,
        max_shrink_time: 120_000,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs `run` on `default` generated cases (each on a fresh two-worker runtime, so the
/// task count of `Baseline` is the case's own) against one server; panics with the
/// shrunk failing case.
pub(super) fn run_property<S, F, Fut>(what: &str, default: u32, strategy: S, run: F)
where
    S: Strategy,
    S::Tree: ValueTree<Value = S::Value>,
    S::Value: std::fmt::Debug,
    F: Fn(Arc<RedisNode>, S::Value) -> Fut,
    Fut: Future<Output = Result<(), TestCaseError>>,
{
    let outer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = Arc::new(outer.block_on(RedisNode::start()));
    let config = config(default);
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    let result = runner.run(&strategy, |case| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("case runtime");
        let out = rt.block_on(run(Arc::clone(&node), case));
        rt.shutdown_timeout(Duration::from_secs(2));
        out
    });
    eprintln!("{what}: {cases} cases in {:?}", started.elapsed());
    if let Err(e) = result {
        panic!("{what}: {e}");
    }
    drop(node);
    drop(outer);
}
