//! What the client believes about a lease's deadline, kept no later than the server's
//! truth whatever order the server runs the lease's commands in. Plain data: no clock is
//! read here, every instant comes from the caller, and the unit tests pin the rules down.

use std::time::Instant;

use crate::error::LostReason;
use crate::options::Ttl;

/// What is known locally about a lease. Every change is broadcast, so `lost()` futures
/// wake up on it.
///
/// # Belief never exceeds truth
///
/// The server keeps the TTL of whichever command that sets it (the acquire, an extend, a
/// auto-extension) it *executed* last, and commands sent over pools, several connections or a
/// reconnect may execute in another order than they were sent. So the deadline believed
/// here is the earliest expiry any still-possible last command can have left:
///
/// - a command sent at `s` with TTL `t` that runs last leaves the key until at least
///   `max(s, s*) + t`, where `s*` is the latest send time of a command confirmed done (it ran
///   before the last one, which cannot have run before it was sent);
/// - a confirmed command whose reply arrived before another confirmed command was sent ran
///   before it, so it can no longer be the last one and stops counting;
/// - a command whose outcome is unknown (failed, timed out, cancelled) may still run at any
///   time, so it keeps counting for the life of the lease.
///
/// A command counts from the moment it is *begun* (just before it is sent), so a shorter
/// extend in flight lowers the deadline at once.
#[derive(Debug, Clone)]
pub(crate) struct LeaseState {
    /// When the lease is known to end at the latest, on the monotonic clock.
    pub(crate) valid_until: Instant,
    /// The TTL the lease was last asked for; auto-extensions reuse it.
    pub(crate) ttl: Ttl,
    /// Once set, the lease is gone for good.
    pub(crate) lost: Option<LostReason>,
    /// The auto-extension task keeps this lease alive: if its deadline passes, auto-extensions did not
    /// get through in time.
    pub(crate) auto_extended: bool,
    /// Auto-extension stopped because the hold-time cap was reached.
    pub(crate) hold_capped: bool,
    /// The last auto-extension reached the primary but too few replicas acknowledged it.
    pub(crate) short_of_replicas: bool,
    /// The latest send time of a command the server confirmed (acquire, extend, auto-extension).
    confirmed_sent: Instant,
    /// Commands that may be the last one the server ran (see the type's docs).
    candidates: Candidates,
    next_op: u64,
}

/// One command that set (or may set) the lease's TTL.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    op: OpId,
    sent: Instant,
    ttl: Ttl,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Sent, no reply yet.
    InFlight,
    /// The server confirmed it; the reply arrived at this instant.
    Confirmed(Instant),
    /// Failed, timed out or cancelled: it may run on the server at any time.
    Unknown,
}

/// The candidates of one lease: a few inline (a lease has one or two at a time), more in a
/// vector, so the common case allocates nothing.
#[derive(Debug, Clone)]
struct Candidates {
    inline: [Option<Candidate>; 3],
    spill: Vec<Candidate>,
}

impl Candidates {
    fn one(first: Candidate) -> Self {
        Candidates {
            inline: [Some(first), None, None],
            spill: Vec::new(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Candidate> {
        self.inline.iter().flatten().chain(self.spill.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Candidate> {
        self.inline
            .iter_mut()
            .flatten()
            .chain(self.spill.iter_mut())
    }

    fn push(&mut self, c: Candidate) {
        match self.inline.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(c),
            None => self.spill.push(c),
        }
    }

    fn retain(&mut self, keep: impl Fn(&Candidate) -> bool) {
        for slot in &mut self.inline {
            if slot.as_ref().is_some_and(|c| !keep(c)) {
                *slot = None;
            }
        }
        self.spill.retain(keep);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.iter().count()
    }
}

/// Names one begun command of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpId(u64);

/// More unknown outcomes than this are folded into one, earlier-sent and shorter (so more
/// cautious) entry: the list stays small whatever happens.
const MAX_UNKNOWN: usize = 8;

impl LeaseState {
    pub(crate) fn new(ttl: Ttl, sent: Instant, replied: Instant) -> Self {
        let mut state = LeaseState {
            valid_until: sent,
            ttl,
            lost: None,
            auto_extended: false,
            hold_capped: false,
            short_of_replicas: false,
            confirmed_sent: sent,
            candidates: Candidates::one(Candidate {
                op: OpId(0),
                sent,
                ttl,
                outcome: Outcome::Confirmed(replied),
            }),
            next_op: 1,
        };
        state.recompute();
        state
    }

    /// The earliest expiry a candidate can leave if it runs last.
    fn bound(&self, c: &Candidate) -> Instant {
        c.ttl.valid_until(c.sent.max(self.confirmed_sent))
    }

    fn recompute(&mut self) {
        let mut until: Option<Instant> = None;
        for c in self.candidates.iter() {
            let b = self.bound(c);
            until = Some(until.map_or(b, |u| u.min(b)));
        }
        // Never empty: the newest confirmed command is never pruned.
        if let Some(until) = until {
            self.valid_until = until;
        }
    }

    /// When the auto-extension task should next extend: a third of the way from the send time to
    /// the deadline of the candidate that bounds the lease.
    pub(crate) fn extend_due(&self) -> Instant {
        let mut best: Option<(Instant, Instant)> = None;
        for c in self.candidates.iter() {
            let b = self.bound(c);
            if best.is_none_or(|(until, _)| b < until) {
                let base = c.sent.max(self.confirmed_sent);
                best = Some((b, base + c.ttl.as_duration() / 3));
            }
        }
        best.map_or(self.valid_until, |(_, at)| at)
    }

    pub(crate) fn begin(&mut self, ttl: Ttl, sent: Instant) -> OpId {
        let op = OpId(self.next_op);
        self.next_op += 1;
        self.candidates.push(Candidate {
            op,
            sent,
            ttl,
            outcome: Outcome::InFlight,
        });
        // Only lowers the deadline: a new or folded candidate is never less cautious.
        self.recompute();
        op
    }

    pub(crate) fn confirm(&mut self, op: OpId, replied: Instant) {
        let Some(c) = self.candidates.iter_mut().find(|c| c.op == op) else {
            return;
        };
        let sent = c.sent;
        c.outcome = Outcome::Confirmed(replied);
        self.confirmed_sent = self.confirmed_sent.max(sent);
        // Confirmed commands whose reply came back before this one was sent ran before it.
        self.candidates.retain(|c| match c.outcome {
            Outcome::Confirmed(at) => at >= sent || c.op == op,
            _ => true,
        });
        self.recompute();
    }

    pub(crate) fn abandon(&mut self, op: OpId) {
        let Some(c) = self.candidates.iter_mut().find(|c| c.op == op) else {
            return;
        };
        if c.outcome != Outcome::InFlight {
            return;
        }
        c.outcome = Outcome::Unknown;
        let unknown = self
            .candidates
            .iter()
            .filter(|c| c.outcome == Outcome::Unknown)
            .count();
        if unknown > MAX_UNKNOWN {
            // Fold every unknown into one that is at least as cautious as each of them.
            let mut folded: Option<Candidate> = None;
            for c in self
                .candidates
                .iter()
                .filter(|c| c.outcome == Outcome::Unknown)
            {
                folded = Some(match folded {
                    None => *c,
                    Some(f) => Candidate {
                        op: f.op,
                        sent: f.sent.min(c.sent),
                        ttl: if f.ttl.as_millis() <= c.ttl.as_millis() {
                            f.ttl
                        } else {
                            c.ttl
                        },
                        outcome: Outcome::Unknown,
                    },
                });
            }
            self.candidates.retain(|c| c.outcome != Outcome::Unknown);
            if let Some(folded) = folded {
                self.candidates.push(folded);
            }
        }
        // Only lowers the deadline: a new or folded candidate is never less cautious.
        self.recompute();
    }
}

impl LeaseState {
    /// Why a lease whose deadline passed without an extension is gone.
    pub(crate) fn deadline_reason(&self) -> LostReason {
        if self.hold_capped {
            LostReason::MaxHoldReached
        } else if self.auto_extended && self.short_of_replicas {
            // Auto-extensions got through, but never with their acknowledgement.
            LostReason::NotReplicated
        } else if self.auto_extended {
            // No auto-extension got through before the deadline: failed, or stuck in flight.
            LostReason::Unreachable
        } else {
            LostReason::Expired
        }
    }

    /// Forgets a command the server refused (key gone or another owner's): it changed
    /// nothing, so it no longer counts.
    pub(crate) fn forget(&mut self, op: OpId) {
        self.candidates.retain(|c| c.op != op);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ttl(ms: u64) -> Ttl {
        Ttl::new(Duration::from_millis(ms)).unwrap()
    }

    fn ms(base: Instant, at: u64) -> Instant {
        base + Duration::from_millis(at)
    }

    /// The earliest expiry the server can have if it ran these (sent, ttl) commands in
    /// this order: the last one decides, executed no earlier than it was sent and no
    /// earlier than the ones before it.
    fn truth(order: &[(Instant, Ttl)]) -> Instant {
        let mut exec = order[0].0;
        let mut until = order[0].1.valid_until(exec);
        for &(sent, t) in order {
            exec = exec.max(sent);
            until = t.valid_until(exec);
        }
        until
    }

    #[test]
    fn a_longer_extend_confirmed_first_does_not_hide_a_shorter_one_still_in_flight() {
        let t0 = Instant::now();
        let mut state = LeaseState::new(ttl(10_000), t0, ms(t0, 1));
        let short = state.begin(ttl(1_000), ms(t0, 100));
        let long = state.begin(ttl(30_000), ms(t0, 150));
        state.confirm(long, ms(t0, 152));
        // The server may run the 1 s extend last.
        assert!(state.valid_until <= ttl(1_000).valid_until(ms(t0, 150)));
        state.confirm(short, ms(t0, 200));
        let either_order = truth(&[(ms(t0, 150), ttl(30_000)), (ms(t0, 100), ttl(1_000))]);
        assert!(state.valid_until <= either_order);
    }

    #[test]
    fn sequential_extends_end_on_the_last_one() {
        let t0 = Instant::now();
        let mut state = LeaseState::new(ttl(10_000), t0, ms(t0, 1));
        let a = state.begin(ttl(1_000), ms(t0, 10));
        state.confirm(a, ms(t0, 11));
        let b = state.begin(ttl(30_000), ms(t0, 20));
        state.confirm(b, ms(t0, 21));
        assert_eq!(state.valid_until, ttl(30_000).valid_until(ms(t0, 20)));
        assert_eq!(state.candidates.len(), 1);
    }

    #[test]
    fn an_extend_with_unknown_outcome_keeps_bounding_the_lease() {
        let t0 = Instant::now();
        let mut state = LeaseState::new(ttl(10_000), t0, ms(t0, 1));
        let lost_reply = state.begin(ttl(1_000), ms(t0, 10));
        state.abandon(lost_reply);
        let later = state.begin(ttl(30_000), ms(t0, 2_000));
        state.confirm(later, ms(t0, 2_001));
        // It may still run after the later one: at the latest-confirmed send + its TTL.
        assert_eq!(state.valid_until, ttl(1_000).valid_until(ms(t0, 2_000)));
        assert_eq!(
            state.extend_due(),
            ms(t0, 2_000) + Duration::from_millis(1_000) / 3
        );
    }

    #[test]
    fn a_shorter_extend_lowers_the_deadline_as_soon_as_it_is_sent() {
        let t0 = Instant::now();
        let mut state = LeaseState::new(ttl(30_000), t0, ms(t0, 1));
        let _in_flight = state.begin(ttl(1_000), ms(t0, 10));
        assert_eq!(state.valid_until, ttl(1_000).valid_until(ms(t0, 10)));
    }

    #[test]
    fn unknown_outcomes_fold_into_a_bounded_list_that_stays_cautious() {
        let t0 = Instant::now();
        let mut state = LeaseState::new(ttl(30_000), t0, ms(t0, 1));
        for i in 0..100 {
            let op = state.begin(ttl(1_000 + i), ms(t0, 10 + i));
            state.abandon(op);
        }
        assert!(state.candidates.len() <= MAX_UNKNOWN + 1);
        assert!(state.valid_until <= ttl(1_000).valid_until(ms(t0, 10)));
    }

    /// Every order the server may run two overlapping extends in, for many TTL pairs and
    /// reply orders: the belief is never later than the truth.
    #[test]
    fn belief_never_exceeds_any_server_order_of_two_overlapping_extends() {
        let t0 = Instant::now();
        let ttls = [10, 50, 400, 1_000, 30_000];
        for &a in &ttls {
            for &b in &ttls {
                for a_first_reply in [true, false] {
                    let mut state = LeaseState::new(ttl(30_000), t0, ms(t0, 1));
                    let (sa, sb) = (ms(t0, 100), ms(t0, 105));
                    let oa = state.begin(ttl(a), sa);
                    let ob = state.begin(ttl(b), sb);
                    if a_first_reply {
                        state.confirm(oa, ms(t0, 110));
                        state.confirm(ob, ms(t0, 111));
                    } else {
                        state.confirm(ob, ms(t0, 110));
                        state.confirm(oa, ms(t0, 111));
                    }
                    let worst = truth(&[(sa, ttl(a)), (sb, ttl(b))])
                        .min(truth(&[(sb, ttl(b)), (sa, ttl(a))]));
                    assert!(state.valid_until <= worst, "a={a} b={b}");
                }
            }
        }
    }
}
