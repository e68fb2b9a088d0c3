//! The read-write lock's guards under random schedules: a read guard believed held is a
//! member of the reader set with its token and a score not earlier than the belief; a write
//! guard believed held is the writer key with its token and a TTL not shorter than the
//! belief; never a writer believed held together with a reader or another writer, and
//! never a live writer key together with a live reader on the server.

use super::*;

use support::unique_key;

const SLOTS: usize = 4;

#[derive(Debug, Clone)]
enum Step {
    /// `read_with` / `write_with` with a wait budget of `wait_ms` (zero: one attempt).
    Acquire {
        slot: usize,
        write: bool,
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
    managers: usize,
    chaos: Vec<Chaos>,
    steps: Vec<Step>,
}

fn acquire(slots: std::ops::Range<usize>) -> impl Strategy<Value = Step> {
    (
        slots,
        any::<bool>(),
        0usize..2,
        acquire_ttl(),
        wait_ms(),
        auto(),
        cancel(),
    )
        .prop_map(
            |(slot, write, mgr, ttl_ms, wait_ms, auto, cancel_ms)| Step::Acquire {
                slot,
                write,
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
        1usize..=2,
        chaos(),
        acquire(0..1),
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

struct Held {
    guard: LockGuard,
    write: bool,
    token: String,
}

fn readers_key(name: &str) -> String {
    format!("{}rw:{{{name}}}", distlock::DEFAULT_PREFIX)
}

async fn check_all(
    slots: &[Option<Held>],
    keys: &[String],
    check: &mut MultiplexedConnection,
    context: &str,
) -> Result<(), TestCaseError> {
    let beliefs: Vec<Option<Belief>> = slots
        .iter()
        .map(|h| h.as_ref().map(|h| Belief::of(&h.guard)))
        .collect();
    let view = view(check, keys).await;
    let (readers, writer) = (&view.keys[0], &view.keys[1]);
    let (mut believed_readers, mut believed_writers) = (Vec::new(), Vec::new());
    for (i, (h, belief)) in slots.iter().zip(&beliefs).enumerate() {
        let (Some(h), Some(belief)) = (h, belief) else {
            continue;
        };
        let (left, kind) = if h.write {
            (writer.string_left(&h.token), "write")
        } else {
            (readers.member_left(&h.token, view.now_ms), "read")
        };
        within_truth(
            belief,
            left,
            view.replied,
            &format!("{context}: {kind} guard in slot {i}"),
        )?;
        if belief.held {
            match h.write {
                true => believed_writers.push(i),
                false => believed_readers.push(i),
            }
        }
    }
    if believed_writers.len() > 1 || (!believed_writers.is_empty() && !believed_readers.is_empty())
    {
        return Err(fail(format!(
            "{context}: believed held at once: writers in slots {believed_writers:?}, readers in slots {believed_readers:?}"
        )));
    }
    let live_readers = readers.live_members(view.now_ms);
    let live_writer = writer.kind == "string" && writer.pttl != 0;
    if live_writer && live_readers > 0 {
        return Err(fail(format!(
            "{context}: the server has a writer {writer:?} and {live_readers} live readers {readers:?}"
        )));
    }
    Ok(())
}

async fn run(node: Arc<RedisNode>, case: Case) -> Result<(), TestCaseError> {
    let mut check = node.conn().await;
    let baseline = Baseline::take(&node).await;
    let name = unique_key("prop-rw");
    let keys = [readers_key(&name), format!("{}:w", readers_key(&name))];
    let hostile = HostileConnection::connect(&node.client(), 2).await;
    apply(&hostile, case.chaos.clone());
    let managers = managers(&node, &hostile, case.managers).await;
    let locks: Vec<_> = managers
        .iter()
        .map(|m| m.rw_lock(&name).expect("rw_lock"))
        .collect();
    let mut slots: Vec<Option<Held>> = (0..SLOTS).map(|_| None).collect();
    for (n, step) in case.steps.iter().enumerate() {
        let context = format!("after step {n} {step:?}");
        match step {
            Step::Acquire {
                slot,
                write,
                mgr,
                ttl_ms,
                wait_ms,
                auto,
                cancel_ms,
            } => {
                drop(slots[*slot].take());
                let rw = &locks[mgr % locks.len()];
                let opts = options(*ttl_ms, *wait_ms, *auto);
                let budget = Duration::from_millis(*wait_ms) + CMD_TIMEOUT;
                let out = if *write {
                    call(rw.write_with(opts), *cancel_ms, budget, "write").await?
                } else {
                    call(rw.read_with(opts), *cancel_ms, budget, "read").await?
                };
                if let Some(Ok(guard)) = out {
                    let token = token_prefix(&guard);
                    slots[*slot] = Some(Held {
                        guard,
                        write: *write,
                        token,
                    });
                }
            }
            Step::Common(common) => {
                run_common(&mut slots, common, &mut check, |h| &h.guard, |h| h.guard, 1).await?
            }
        }
        check_all(&slots, &keys, &mut check, &context).await?;
    }
    hostile.clear_plan();
    drop(slots);
    drop(locks);
    drop(managers);
    drop(hostile);
    settled(&baseline, &node).await
}

/// Proptest schedules of up to four read and write guards of one read-write lock, taken
/// through one or two managers (one on the hostile connection): after every step every
/// guard believed held is on the server with its token and at least its believed time
/// left, no writer is believed held with a reader or another writer, and the server never
/// has a live writer with live readers; after every case nothing is left behind (intents
/// included).
#[test]
fn rwlock_guards_never_believed_beyond_the_server_under_random_schedules() {
    run_property("read-write lock belief property", 24, case(), run);
}
