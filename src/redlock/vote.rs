//! The vote of a lock over several primaries: what the nodes' answers add up to. Pure
//! functions, no I/O: the unit tests below pin every case down.

use std::time::Duration;

use crate::error::{LostReason, Result};
use crate::store::{Acquire, NodeAnswer, Verdict};

/// The number of nodes that make a majority of `n`.
pub(crate) fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// What an acquire's answers add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcquireDecision {
    /// A majority set the lease and validity is left.
    Taken,
    /// A majority answered, but not a majority for us: another owner holds the lock on
    /// enough nodes that we cannot have it (or two contenders split the vote). Retrying
    /// after a backoff is the right reaction.
    Held { retry_after: Option<Duration> },
    /// Fewer than a majority answered at all, or a majority answered too late.
    NoQuorum { validity_ran_out: bool },
}

/// Classifies an acquire. "Held by another" needs a majority of *answers*: when too few
/// nodes answered to decide anything, the fault is the nodes', not contention.
pub(crate) fn decide_acquire(
    answers: &[Result<Acquire>],
    quorum: usize,
    in_time: bool,
) -> AcquireDecision {
    let taken = answers
        .iter()
        .filter(|a| matches!(a, Ok(Acquire::Taken { .. })))
        .count();
    let mut held: Vec<Option<Duration>> = answers
        .iter()
        .filter_map(|a| match a {
            Ok(Acquire::Held { pttl, .. }) => Some(*pttl),
            _ => None,
        })
        .collect();
    if taken >= quorum {
        return if in_time {
            AcquireDecision::Taken
        } else {
            AcquireDecision::NoQuorum {
                validity_ran_out: true,
            }
        };
    }
    if taken + held.len() < quorum {
        return AcquireDecision::NoQuorum {
            validity_ran_out: false,
        };
    }
    // The lock can be ours once enough of the other owner's node leases are gone to make
    // a majority with the nodes that were free: a hint, not a promise (failed nodes and
    // keys without a TTL are unknown).
    held.sort_unstable_by_key(|pttl| pttl.unwrap_or(Duration::MAX));
    let retry_after = held
        .get(quorum.saturating_sub(taken + 1))
        .copied()
        .flatten();
    AcquireDecision::Held { retry_after }
}

/// Whether an acquire that took some nodes but not a majority split the vote: no other
/// holder has a majority either, as far as the answers tell. "Held" answers that name
/// their holder are counted per holder; those that do not could all be one holder's, so
/// they count for whichever holder has the most.
pub(crate) fn split_vote(answers: &[Result<Acquire>], quorum: usize) -> bool {
    let took = answers
        .iter()
        .filter(|a| matches!(a, Ok(Acquire::Taken { .. })))
        .count();
    if took == 0 || took >= quorum {
        return false;
    }
    let mut named: Vec<(u64, usize)> = Vec::new();
    let mut unnamed = 0;
    for answer in answers {
        match answer {
            Ok(Acquire::Held {
                holder: Some(holder),
                ..
            }) => match named.iter_mut().find(|(h, _)| h == holder) {
                Some((_, n)) => *n += 1,
                None => named.push((*holder, 1)),
            },
            Ok(Acquire::Held { holder: None, .. }) => unnamed += 1,
            _ => {}
        }
    }
    let most = named.iter().map(|&(_, n)| n).max().unwrap_or(0);
    most + unnamed < quorum
}

/// Classifies the answers to a compare-and-act call (extend, release) over all N nodes.
///
/// - a majority confirmed (and, for extend, before the new validity ran out): `Done`;
/// - the nodes that answered rule a majority out, even if every failed node had confirmed:
///   the lease is gone, `Taken` when another owner has a majority, `Expired` otherwise;
/// - else too many nodes failed to know: `NoQuorum`.
pub(crate) fn decide_verdict(
    answers: &[Result<NodeAnswer>],
    quorum: usize,
    in_time: bool,
) -> Verdict {
    let count = |v: NodeAnswer| {
        answers
            .iter()
            .filter(|a| matches!(a, Ok(x) if *x == v))
            .count()
    };
    let done = count(NodeAnswer::Done);
    let taken = count(NodeAnswer::Taken);
    let failed = answers.iter().filter(|a| a.is_err()).count();
    if done >= quorum {
        return if in_time {
            Verdict::Done
        } else {
            Verdict::Lost(LostReason::NoQuorum)
        };
    }
    if done + failed < quorum {
        return Verdict::Lost(if taken >= quorum {
            LostReason::Taken
        } else {
            LostReason::Expired
        });
    }
    Verdict::Lost(LostReason::NoQuorum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn err() -> crate::error::Error {
        crate::error::Error::timed_out("no answer")
    }

    fn taken() -> Result<Acquire> {
        Ok(Acquire::Taken { fence: None })
    }

    fn held(pttl: u64) -> Result<Acquire> {
        Ok(Acquire::Held {
            pttl: Some(ms(pttl)),
            holder: None,
        })
    }

    #[test]
    fn majority_is_more_than_half() {
        assert_eq!([1, 2, 3, 4, 5, 6, 7].map(majority), [1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn acquire_needs_a_majority_of_all_nodes_and_time_left() {
        let three_of_five = [taken(), taken(), taken(), Err(err()), Err(err())];
        assert_eq!(
            decide_acquire(&three_of_five, 3, true),
            AcquireDecision::Taken
        );
        assert_eq!(
            decide_acquire(&three_of_five, 3, false),
            AcquireDecision::NoQuorum {
                validity_ran_out: true
            }
        );
        let two_of_five = [taken(), taken(), Err(err()), Err(err()), Err(err())];
        assert_eq!(
            decide_acquire(&two_of_five, 3, true),
            AcquireDecision::NoQuorum {
                validity_ran_out: false
            }
        );
    }

    #[test]
    fn acquire_answered_by_a_majority_but_not_ours_is_held_by_another() {
        // Another owner has a majority.
        let answers = [held(900), held(300), held(600), Err(err()), Err(err())];
        assert_eq!(
            decide_acquire(&answers, 3, true),
            AcquireDecision::Held {
                retry_after: Some(ms(900))
            }
        );
        // A split vote: nobody has a majority; the lock frees once one of theirs ends.
        let answers = [taken(), taken(), held(500), held(200), Err(err())];
        assert_eq!(
            decide_acquire(&answers, 3, true),
            AcquireDecision::Held {
                retry_after: Some(ms(200))
            }
        );
    }

    #[test]
    fn too_few_answers_are_a_quorum_failure_even_with_contention() {
        let answers = [taken(), held(100), Err(err()), Err(err()), Err(err())];
        assert_eq!(
            decide_acquire(&answers, 3, true),
            AcquireDecision::NoQuorum {
                validity_ran_out: false
            }
        );
    }

    #[test]
    fn extend_and_release_count_confirmations_over_all_nodes() {
        use NodeAnswer::*;
        const NO_QUORUM: Verdict = Verdict::Lost(LostReason::NoQuorum);
        const EXPIRED: Verdict = Verdict::Lost(LostReason::Expired);
        const TAKEN: Verdict = Verdict::Lost(LostReason::Taken);
        let v = |answers: &[Result<NodeAnswer>]| decide_verdict(answers, 3, true);
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Done), Err(err()), Err(err())]),
            Verdict::Done
        );
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Done), Ok(Expired), Ok(Taken)]),
            Verdict::Done
        );
        // Two confirmations of five are not enough, however many the lease was taken on.
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Err(err()), Err(err()), Err(err())]),
            NO_QUORUM
        );
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Expired), Err(err()), Err(err())]),
            NO_QUORUM
        );
        // The answers alone rule a majority out.
        assert_eq!(
            v(&[Ok(Done), Ok(Expired), Ok(Expired), Ok(Expired), Err(err())]),
            EXPIRED
        );
        assert_eq!(
            v(&[Ok(Taken), Ok(Taken), Ok(Taken), Ok(Done), Err(err())]),
            TAKEN
        );
        assert_eq!(
            v(&[Ok(Taken), Ok(Taken), Ok(Expired), Ok(Expired), Ok(Done)]),
            EXPIRED
        );
        // Confirmed too late to be of use.
        assert_eq!(
            decide_verdict(&[Ok(Done), Ok(Done), Ok(Done)], 2, false),
            NO_QUORUM
        );
    }

    fn held_by(holder: u64) -> Result<Acquire> {
        Ok(Acquire::Held {
            pttl: Some(ms(500)),
            holder: Some(holder),
        })
    }

    #[test]
    fn a_split_vote_is_nobody_with_a_majority() {
        // Two of five taken, the other three split between two holders: nobody has three.
        let split = [taken(), taken(), held_by(1), held_by(1), held_by(2)];
        assert!(split_vote(&split, 3));
        // Two of five taken, one failed, two held by one holder: nobody has three.
        let with_failure = [taken(), taken(), held_by(1), held_by(1), Err(err())];
        assert!(split_vote(&with_failure, 3));
    }

    #[test]
    fn a_race_lost_to_one_holder_is_no_split_vote() {
        // Another holder has three of five: it holds the lock.
        let lost = [taken(), taken(), held_by(1), held_by(1), held_by(1)];
        assert!(!split_vote(&lost, 3));
        // Holders not named could all be one: no split vote is claimed.
        let unnamed = [taken(), taken(), held(1), held(1), held_by(2)];
        assert!(!split_vote(&unnamed, 3));
        // Nothing taken, or a majority taken: no split either way.
        let none = [held_by(1), held_by(2), held_by(3), held_by(1), held_by(2)];
        assert!(!split_vote(&none, 3));
        let ours = [taken(), taken(), taken(), held_by(1), held_by(2)];
        assert!(!split_vote(&ours, 3));
    }
}
