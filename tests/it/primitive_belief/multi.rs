//! `lock_all`'s guards under random schedules: while a `MultiGuard` believes it holds,
//! every lock of its set is on the server with its token until at least the set's
//! `valid_until`; each lock of a set is checked on its own too, and no name is believed
//! held by two sets at once.

use super::*;

use support::{lease_key, unique_key};

const SLOTS: usize = 3;
const NAMES: usize = 3;

#[derive(Debug, Clone)]
enum Step {
    /// `lock_all_with` on the names whose bits are set in `mask` (never zero).
    LockAll {
        slot: usize,
        mgr: usize,
        mask: u8,
        ttl_ms: u64,
        wait_ms: u64,
        auto: Option<Option<u64>>,
        cancel_ms: Option<u64>,
    },
    Common(Common),
}

#[derive(Debug, Clone)]
struct Case {
    managers: usize,
    chaos: Vec<Chaos>,
    steps: Vec<Step>,
}

fn lock_all(slots: std::ops::Range<usize>) -> impl Strategy<Value = Step> {
    (
        slots,
        0usize..2,
        1u8..(1 << NAMES),
        acquire_ttl(),
        wait_ms(),
        auto(),
        cancel(),
    )
        .prop_map(
            |(slot, mgr, mask, ttl_ms, wait_ms, auto, cancel_ms)| Step::LockAll {
                slot,
                mgr,
                mask,
                ttl_ms,
                wait_ms,
                auto,
                cancel_ms,
            },
        )
}

fn case() -> impl Strategy<Value = Case> {
    let step = prop_oneof![
        4 => lock_all(0..SLOTS),
        6 => common(SLOTS).prop_map(Step::Common),
    ];
    (
        1usize..=2,
        chaos(),
        lock_all(0..1),
        proptest::collection::vec(step, 1..10),
    )
        .prop_map(|(managers, chaos, first, mut steps)| {
            steps.insert(0, first);
            Case {
                managers,
                chaos,
                steps,
            }
        })
}

async fn check_all(
    slots: &[Option<MultiGuard>],
    names: &[String],
    check: &mut MultiplexedConnection,
    context: &str,
) -> Result<(), TestCaseError> {
    // Beliefs first: the set's, then each lock's.
    let beliefs: Vec<Option<(Belief, Vec<Belief>)>> = slots
        .iter()
        .map(|m| {
            m.as_ref().map(|m| {
                let valid_until = m.valid_until();
                let held = m.is_held() && valid_until > Instant::now();
                let set = Belief {
                    held,
                    valid_until,
                    read_at: Instant::now(),
                };
                (set, m.guards().iter().map(Belief::of).collect())
            })
        })
        .collect();
    let keys: Vec<String> = names.iter().map(|n| lease_key(n)).collect();
    let view = view(check, &keys).await;
    let mut holder = [None::<usize>; NAMES];
    for (i, (m, belief)) in slots.iter().zip(&beliefs).enumerate() {
        let (Some(m), Some((set, each))) = (m, belief) else {
            continue;
        };
        for (guard, belief) in m.guards().iter().zip(each) {
            let n = names
                .iter()
                .position(|n| n.as_bytes() == guard.key())
                .expect("one of the case's names");
            let left = view.keys[n].string_left(&token_prefix(guard));
            let what = format!("{context}: set in slot {i}");
            within_truth(set, left, view.replied, &what)?;
            within_truth(belief, left, view.replied, &format!("{what}, lock {n}"))?;
            if belief.held
                && let Some(other) = holder[n].replace(i)
            {
                return Err(fail(format!(
                    "{context}: lock {n} believed held by the sets in slots {other} and {i}"
                )));
            }
        }
    }
    Ok(())
}

async fn run(node: Arc<RedisNode>, case: Case) -> Result<(), TestCaseError> {
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let tag = unique_key("prop-multi");
    let names: Vec<String> = (0..NAMES).map(|i| format!("{tag}:{i}")).collect();
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    apply(&hostile, case.chaos.clone());
    let managers = managers(&node, &hostile, case.managers).await;
    let mut slots: Vec<Option<MultiGuard>> = (0..SLOTS).map(|_| None).collect();
    for (n, step) in case.steps.iter().enumerate() {
        let context = format!("after step {n} {step:?}");
        match step {
            Step::LockAll {
                slot,
                mgr,
                mask,
                ttl_ms,
                wait_ms,
                auto,
                cancel_ms,
            } => {
                drop(slots[*slot].take());
                let locks = &managers[mgr % managers.len()];
                let set: Vec<&String> = (0..NAMES)
                    .filter(|b| mask & (1 << b) != 0)
                    .map(|b| &names[b])
                    .collect();
                let opts = options(*ttl_ms, *wait_ms, *auto);
                // One acquire and, on failure, one release per lock.
                let budget = Duration::from_millis(*wait_ms) + CMD_TIMEOUT * 2 * set.len() as u32;
                let out = call(
                    locks.lock_all_with(&set, opts),
                    *cancel_ms,
                    budget,
                    "lock_all",
                )
                .await?;
                if let Some(Ok(all)) = out {
                    slots[*slot] = Some(all);
                }
            }
            Step::Common(common) => {
                let calls = NAMES as u32;
                run_common(&mut slots, common, &mut check, |m| m, |m| m, calls).await?
            }
        }
        check_all(&slots, &names, &mut check, &context).await?;
    }
    hostile.clear_plan();
    drop(slots);
    drop(managers);
    drop(hostile);
    settled(&baseline, &node).await
}

/// Proptest schedules of up to three `lock_all` sets over three names, taken through one
/// or two managers (one on the hostile connection): after every step every set believed
/// held has each of its locks on the server with its token until at least the set's
/// `valid_until`, each lock believed held on its own likewise, and no name is believed
/// held by two sets; after every case nothing is left behind.
#[test]
fn multi_guards_never_believed_beyond_the_server_under_random_schedules() {
    run_property("lock_all belief property", 24, case(), run);
}
