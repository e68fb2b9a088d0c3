//! Acquiring over several primaries: every node at once, or, for a caller that already
//! found the lock held while contenders collide on it, one node first.
//!
//! Under contention, contenders that each ask all N nodes at once can split the vote (each
//! takes some nodes, nobody a majority) and all of them pay a round of cleanup. So once an
//! attempt on a key has *collided* (it took some nodes and still lost: another contender
//! got there in between), a caller that retries after finding the lock held asks the key's
//! *first node* (chosen by the key, so every contender picks the same one) alone first,
//! for [`COLLISION_MEMORY`]: one contender wins there, the others learn "held" for the
//! price of one round trip to one node and touch no other. Only the winner asks the
//! remaining nodes, and needs a majority as always: the order is an optimisation of who tries, never a
//! change of what makes a lease ours. Without a recent collision (one waiter woken per
//! release) the extra round trip is not paid. A first node that fails is skipped (every
//! node asked at once) for [`SKIP_FAILED`].

use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use super::fanout::{bounded, join_all, no_answer};
use super::vote::{AcquireDecision, decide_acquire, split_vote};
use super::{RedlockStore, count};
use crate::error::{Error, NodeOutcome, QuorumError, QuorumOperation, Result};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::store::{Acquire, Queue};

/// How long a first node that failed is left out of the one-node-first order.
pub(super) const SKIP_FAILED: Duration = Duration::from_secs(1);

/// How long after a collision on a key its retries ask the first node alone first.
pub(super) const COLLISION_MEMORY: Duration = Duration::from_secs(1);

/// Keys remembered at most; older collisions are forgotten first.
const COLLISIONS_KEPT: usize = 1024;

/// The keys whose acquires collided lately, with when.
#[derive(Default)]
pub(super) struct Collisions(std::collections::HashMap<Box<[u8]>, Instant>);

impl Collisions {
    fn note(&mut self, key: &[u8]) {
        if self.0.len() >= COLLISIONS_KEPT {
            self.0.retain(|_, at| at.elapsed() < COLLISION_MEMORY);
        }
        if self.0.len() < COLLISIONS_KEPT {
            self.0.insert(key.into(), Instant::now());
        }
    }

    fn recent(&self, key: &[u8]) -> bool {
        self.0
            .get(key)
            .is_some_and(|at| at.elapsed() < COLLISION_MEMORY)
    }
}

impl<C> RedlockStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The node a contended acquire of `key` asks first, the same for every contender:
    /// FNV-1a (32 bit) of the lease key, modulo the number of nodes.
    fn first_node(&self, key: &LockKey) -> usize {
        let hash = key.lease().iter().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
        usize::try_from(hash).unwrap_or(0) % self.nodes.len().max(1)
    }

    /// One node's part of an attempt, bounded by the node timeout: the fair acquire where
    /// `queue` is given (the key's first node in fair mode), else the card's `SET`, with
    /// its `PTTL` in the same round trip for a `contended` attempt.
    async fn ask_node(
        &self,
        i: usize,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        contended: bool,
        queue: Option<Queue<'_>>,
    ) -> Result<Acquire> {
        let store = &self.nodes[i].store;
        let limit = self.node_timeout;
        match queue {
            Some(queue) => {
                let call = store.acquire_queued_here(key, token, ttl, false, queue);
                bounded(limit, call).await
            }
            None if contended => {
                bounded(limit, store.acquire_here_contended(key, token, ttl)).await
            }
            None => bounded(limit, store.acquire_here(key, token, ttl, false)).await,
        }
    }

    /// The keys whose acquires collided lately.
    fn collisions(&self) -> std::sync::MutexGuard<'_, Collisions> {
        self.collisions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An acquire by a caller that found the lock held before: after a recent collision on
    /// the key, its first node alone, then (if it took the lease) the others; see the
    /// module docs.
    pub(super) async fn acquire_leader_first(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
    ) -> Result<Acquire> {
        let started = Instant::now();
        let first = self.first_node(key);
        let skip = self.nodes.len() < 2
            || !self.collisions().recent(key.lease())
            || self
                .failed_at(first)
                .is_some_and(|at| at.elapsed() < SKIP_FAILED);
        if skip {
            return self
                .acquire_on(key, token, ttl, started, Vec::new(), true)
                .await;
        }
        let answer = self.ask_node(first, key, token, ttl, true, None).await;
        self.then_the_rest(key, token, ttl, started, first, answer)
            .await
    }

    /// After node `first` answered `answer`: "held" ends the attempt (nothing was set
    /// anywhere); otherwise the other nodes are asked and the votes counted. A failed
    /// first node is left out of the first-node order for a while.
    async fn then_the_rest(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        started: Instant,
        first: usize,
        answer: Result<Acquire>,
    ) -> Result<Acquire> {
        if let Ok(held @ Acquire::Held { .. }) = answer {
            return Ok(held);
        }
        if let Err(e) = &answer {
            tracing::debug!(key = %key, error = %e, "the key's first node failed; asking every node");
            self.note_failed(first);
        }
        let mut known: Vec<Option<Result<Acquire>>> = self.nodes.iter().map(|_| None).collect();
        known[first] = Some(answer);
        self.acquire_on(key, token, ttl, started, known, true).await
    }

    /// Asks every node whose answer is not `known` (all of them if `known` is empty) at
    /// once, and counts the votes from `started`. A `contended` attempt sends each node's
    /// `PTTL` with its `SET` (see
    /// [`acquire_here_contended`](crate::store::RedisStore::acquire_here_contended)).
    /// Unless the lease is ours, releases it again wherever this attempt may have set it.
    pub(super) async fn acquire_on(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        started: Instant,
        known: Vec<Option<Result<Acquire>>>,
        contended: bool,
    ) -> Result<Acquire> {
        let mut known = known;
        known.resize_with(self.nodes.len(), || None);
        // The nodes to ask now, and their index among all nodes.
        let ask: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| known[i].is_none())
            .collect();
        // Every node is waited for (or its timeout): a SET abandoned before its connection
        // sent it would leave the lease on fewer nodes than answered, one failure closer to
        // losing its majority.
        let asked = join_all(
            ask.iter()
                .map(|&i| self.ask_node(i, key, token, ttl, contended, None))
                .collect(),
        )
        .await;
        for (i, answer) in ask.into_iter().zip(asked) {
            known[i] = Some(answer);
        }
        let answers: Vec<Result<Acquire>> = known
            .into_iter()
            .map(|answer| answer.unwrap_or_else(|| Err(no_answer(self.node_timeout))))
            .collect();
        self.settle(key, token, ttl, started, answers).await
    }

    /// Counts the votes of `answers` (one per node, in node order) of an attempt started at
    /// `started`; unless the lease is ours, releases it again wherever this attempt may have
    /// set it.
    async fn settle(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        started: Instant,
        answers: Vec<Result<Acquire>>,
    ) -> Result<Acquire> {
        let elapsed = started.elapsed();
        let in_time = Instant::now() < ttl.valid_until(started);
        let decision = decide_acquire(&answers, self.quorum, in_time);
        // Unless the lease is ours, undo every SET this attempt may have made: on the nodes
        // that took it and on the ones that failed or timed out (the SET may land late; a
        // delete sent now follows it on the same connection). A node
        // that answered "held" provably has no key of ours. If this future is dropped
        // during the cleanup, the manager's abandoned-acquire release (on all nodes)
        // covers it.
        let maybe_ours = maybe_ours(&answers);
        // Waiters hear of the cleanup only if it may free the lock: not when another owner
        // provably holds a majority, which a cleanup does not change.
        let held = count(&answers, |a| matches!(a, Acquire::Held { .. }));
        let announce = held < self.quorum;
        let outcome = match decision {
            AcquireDecision::Taken => return Ok(Acquire::Taken { fence: None }),
            AcquireDecision::Held { retry_after } => {
                let took = count(&answers, |a| matches!(a, Acquire::Taken { .. }));
                if took > 0 {
                    // Another contender got some nodes in between: retries of this key
                    // go to its first node alone for a while.
                    self.collisions().note(key.lease());
                }
                if split_vote(&answers, self.quorum) {
                    // Nobody has a majority as far as this attempt can tell.
                    tracing::debug!(split_vote = true, key = %key, took, held, "split vote");
                }
                tracing::debug!(key = %key, ?retry_after, "no majority: held by another owner");
                Ok(Acquire::Held {
                    pttl: retry_after,
                    holder: None,
                })
            }
            AcquireDecision::NoQuorum { validity_ran_out } => {
                let error = QuorumError {
                    operation: QuorumOperation::Acquire,
                    key: key.display(),
                    needed: self.quorum,
                    nodes: self.reports(answers, |a| match a {
                        Acquire::Taken { .. } => NodeOutcome::Confirmed,
                        Acquire::Held { pttl, .. } => {
                            NodeOutcome::HeldByOther { retry_after: pttl }
                        }
                    }),
                    elapsed,
                    validity_ran_out,
                };
                tracing::warn!(error = %error, "acquire without quorum");
                Err(Error::Quorum(Box::new(error)))
            }
        };
        self.release_on(&maybe_ours, key, token, announce).await;
        outcome
    }
}

impl<C> RedlockStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Fair mode: the waiter queue lives on the key's first node only. The caller is
    /// granted the lease there only at the head of that queue (or with nobody queued), and
    /// then asks the other nodes for a majority as always. While the first node fails,
    /// waiters are served as without fair mode (every node at once); the majority rule
    /// never depends on the queue.
    pub(super) async fn acquire_fair(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        queue: Queue<'_>,
    ) -> Result<Acquire> {
        let started = Instant::now();
        let first = self.first_node(key);
        if queue.named && self.nodes.len() > 1 {
            return self.acquire_fair_named(key, token, ttl, queue).await;
        }
        // "Held" here means queued (or refreshed) on the first node.
        let answer = self
            .ask_node(first, key, token, ttl, false, Some(queue))
            .await;
        self.then_the_rest(key, token, ttl, started, first, answer)
            .await
    }

    /// Fair mode, for a caller a release just named as the next waiter: every node at once
    /// (the release let the lease go on the other nodes before it named the caller on the
    /// first node, so one round trip decides). The first node still decides whose turn it
    /// is: if it answers "queued" (the caller is not at the head after all), the attempt
    /// is held, and the lease is let go wherever it may have been set, even on a majority.
    async fn acquire_fair_named(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        queue: Queue<'_>,
    ) -> Result<Acquire> {
        let started = Instant::now();
        let first = self.first_node(key);
        let answers = join_all(
            (0..self.nodes.len())
                .map(|i| self.ask_node(i, key, token, ttl, true, (i == first).then_some(queue)))
                .collect(),
        )
        .await;
        if let Some(Ok(held @ Acquire::Held { .. })) = answers.get(first) {
            let held = *held;
            tracing::debug!(key = %key, "named as the next waiter, but queued on the first node");
            self.release_on(&maybe_ours(&answers), key, token, true)
                .await;
            return Ok(held);
        }
        self.settle(key, token, ttl, started, answers).await
    }

    /// Fair mode: `waiter` leaves the queue on the key's first node.
    pub(super) async fn leave_fair_queue(&self, key: &LockKey, waiter: &[u8]) -> Result<()> {
        let first = self.first_node(key);
        bounded(
            self.node_timeout,
            self.nodes[first].store.leave_queue_here(key, waiter),
        )
        .await
    }

    /// The index of the node that keeps `key`'s fair queue.
    pub(super) fn queue_node(&self, key: &LockKey) -> usize {
        self.first_node(key)
    }
}

/// The nodes where an attempt may have set its token: every node but those that answered
/// "held" (which provably have no key of ours).
fn maybe_ours(answers: &[Result<Acquire>]) -> Vec<usize> {
    answers
        .iter()
        .enumerate()
        .filter(|(_, a)| !matches!(a, Ok(Acquire::Held { .. })))
        .map(|(i, _)| i)
        .collect()
}
