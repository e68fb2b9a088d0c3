//! The semaphore's permits under random schedules: every permit believed held is a member
//! of the permit set with its token and a score not earlier than the belief; never more
//! than N permits believed held, never more than N live on the server.

use super::*;

use support::unique_key;

const SLOTS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    /// `wait_ms == 0`: `try_acquire_with`; otherwise `acquire_with` with that budget.
    Acquire {
        slot: usize,
        mgr: usize,
        ttl_ms: u64,
        wait_ms: u64,
        auto: Option<Option<u64>>,
        cancel_ms: Option<u64>,
    },
    Common(Common),
}

#[derive(Debug, Clone)]
struct Case {
    permits: u32,
    managers: usize,
    chaos: Vec<Chaos>,
    steps: Vec<Step>,
}

fn acquire(slots: std::ops::Range<usize>) -> impl Strategy<Value = Step> {
    (slots, 0usize..2, acquire_ttl(), wait_ms(), auto(), cancel()).prop_map(
        |(slot, mgr, ttl_ms, wait_ms, auto, cancel_ms)| Step::Acquire {
            slot,
            mgr,
            ttl_ms,
            wait_ms,
            auto,
            cancel_ms,
        },
    )
}

fn case() -> impl Strategy<Value = Case> {
    let step = prop_oneof![
        4 => acquire(0..SLOTS),
        6 => common(SLOTS).prop_map(Step::Common),
    ];
    (
        1u32..=3,
        1usize..=2,
        chaos(),
        acquire(0..1),
        proptest::collection::vec(step, 1..10),
    )
        .prop_map(|(permits, managers, chaos, first, mut steps)| {
            steps.insert(0, first);
            Case {
                permits,
                managers,
                chaos,
                steps,
            }
        })
}

struct Held {
    guard: LockGuard,
    token: String,
}

fn permits_key(name: &str) -> String {
    format!("{}sem:{{{name}}}", distlock::DEFAULT_PREFIX)
}

async fn check_all(
    slots: &[Option<Held>],
    permits: u32,
    key: &str,
    check: &mut MultiplexedConnection,
    context: &str,
) -> Result<(), TestCaseError> {
    let beliefs: Vec<Option<Belief>> = slots
        .iter()
        .map(|h| h.as_ref().map(|h| Belief::of(&h.guard)))
        .collect();
    let view = view(check, &[key.to_owned()]).await;
    let set = &view.keys[0];
    let mut believed = 0;
    for (i, (h, belief)) in slots.iter().zip(&beliefs).enumerate() {
        let (Some(h), Some(belief)) = (h, belief) else {
            continue;
        };
        let left = set.member_left(&h.token, view.now_ms);
        within_truth(
            belief,
            left,
            view.replied,
            &format!("{context}: permit in slot {i}"),
        )?;
        believed += usize::from(belief.held);
    }
    if believed > permits as usize {
        return Err(fail(format!(
            "{context}: {believed} permits believed held with {permits} permits"
        )));
    }
    let live = set.live_members(view.now_ms);
    if live > permits as usize {
        return Err(fail(format!(
            "{context}: {live} live permits on the server with {permits} permits: {set:?}"
        )));
    }
    Ok(())
}

async fn run(node: Arc<RedisNode>, case: Case) -> Result<(), TestCaseError> {
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("prop-sem");
    let key = permits_key(&name);
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    apply(&hostile, case.chaos.clone());
    let managers = managers(&node, &hostile, case.managers).await;
    let sems: Vec<_> = managers
        .iter()
        .map(|m| m.semaphore(&name, case.permits).expect("semaphore"))
        .collect();
    let mut slots: Vec<Option<Held>> = (0..SLOTS).map(|_| None).collect();
    for (n, step) in case.steps.iter().enumerate() {
        let context = format!("after step {n} {step:?}");
        match step {
            Step::Acquire {
                slot,
                mgr,
                ttl_ms,
                wait_ms,
                auto,
                cancel_ms,
            } => {
                drop(slots[*slot].take());
                let sem = &sems[mgr % sems.len()];
                let opts = options(*ttl_ms, *wait_ms, *auto);
                let budget = Duration::from_millis(*wait_ms) + CMD_TIMEOUT;
                let out = if *wait_ms == 0 {
                    call(
                        sem.try_acquire_with(opts),
                        *cancel_ms,
                        budget,
                        "try_acquire",
                    )
                    .await?
                } else {
                    call(sem.acquire_with(opts), *cancel_ms, budget, "acquire").await?
                };
                if let Some(Ok(guard)) = out {
                    let token = token_prefix(&guard);
                    slots[*slot] = Some(Held { guard, token });
                }
            }
            Step::Common(common) => {
                run_common(&mut slots, common, &mut check, |h| &h.guard, |h| h.guard, 1).await?
            }
        }
        check_all(&slots, case.permits, &key, &mut check, &context).await?;
    }
    hostile.clear_plan();
    drop(slots);
    drop(sems);
    drop(managers);
    drop(hostile);
    settled(&baseline, &node).await
}

/// Proptest schedules of up to four permit guards of a semaphore of 1–3 permits, taken
/// through one or two managers (one on the hostile connection): after every step each
/// permit believed held is on the server with its token and at least its believed time
/// left, at most N are believed held and at most N live on the server; after every case
/// nothing is left behind.
#[test]
fn semaphore_permits_never_believed_beyond_the_server_under_random_schedules() {
    run_property("semaphore belief property", 24, case(), run);
}
