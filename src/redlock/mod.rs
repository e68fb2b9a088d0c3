//! One lock over several independent Redis primaries (Redlock).
//!
//! [`RedlockStore`] is a [`LeaseStore`] over N nodes, each an ordinary single-primary
//! [`RedisStore`]. The manager, guard, waiting loop, drop-release and auto-extension work on it
//! unchanged; what this module adds is the fan-out and the counting:
//!
//! - every call goes to all N nodes at once, each bounded by the per-node timeout, so a
//!   call takes about as long as the slowest node that answers, never the sum;
//! - a lease is ours only when a majority of N (`N/2 + 1`) set it *and* some validity is
//!   left (`ttl - elapsed - drift > 0`, which is the guard's usual
//!   `valid_until = sent + ttl - drift`, still in the future);
//! - an acquire that does not end with the lease releases it again on every node where
//!   this attempt may have set it (all but those that answered "held by another"),
//!   timed-out nodes included, before it returns;
//! - extend and release count confirmations over all N nodes, never over the nodes that
//!   happened to take the lease.
//!
//! Node answers are classified the same way for every call, by the pure functions of
//! [`vote`], which its unit tests pin down; [`fanout`] asks every node at once.

mod acquire;
mod fanout;
mod pass;
mod vote;

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use crate::error::{
    Error, LostReason, NodeOutcome, NodeReport, QuorumError, QuorumOperation, Result,
};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::store::{
    Acquire, BoxFuture, Extension, LeaseStore, NodeAnswer, Passed, Queue, RENEWALS_PER_CALL,
    RedisStore, Verdict,
};

use fanout::no_answer;
pub(crate) use fanout::{bounded, join_all};
use vote::decide_verdict;
pub(crate) use vote::majority;

/// One primary of the set.
pub(crate) struct Node<C> {
    /// `host:port` or `node <index>`: how errors and logs name it.
    name: String,
    store: RedisStore<C>,
}

impl<C> Node<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A node named `name` (for errors and logs) on `conn`: leases without a fencing
    /// counter (a per-node counter is no token for the lock as a whole), releases announced
    /// to waiters if `announce` (with the payload every node repeats, `~`), every call
    /// bounded by the store's node timeout.
    pub(crate) fn new(name: String, conn: C, announce: bool) -> Self {
        Node {
            name,
            store: RedisStore::unfenced(conn, None, announce),
        }
    }
}

/// Leases on a majority of N independent primaries.
pub(crate) struct RedlockStore<C> {
    nodes: Vec<Node<C>>,
    quorum: usize,
    node_timeout: Duration,
    /// Per node: when a contended acquire last found it failing as the key's first node.
    failed_at: Mutex<Vec<Option<Instant>>>,
    /// The keys whose acquires collided lately (see [`acquire`]).
    collisions: Mutex<acquire::Collisions>,
}

impl<C> RedlockStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over `nodes`, each call to a node bounded by `node_timeout`.
    pub(crate) fn new(nodes: Vec<Node<C>>, node_timeout: Duration) -> Self {
        RedlockStore {
            quorum: majority(nodes.len()),
            failed_at: Mutex::new(vec![None; nodes.len()]),
            collisions: Mutex::new(acquire::Collisions::default()),
            nodes,
            node_timeout,
        }
    }

    /// When node `i` last failed as a key's first node.
    fn failed_at(&self, i: usize) -> Option<Instant> {
        let at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        at.get(i).copied().flatten()
    }

    /// Node `i` failed as a key's first node: leave it out of that order for a while.
    fn note_failed(&self, i: usize) {
        let mut at = self.failed_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = at.get_mut(i) {
            *slot = Some(Instant::now());
        }
    }

    /// Sends `call` to every node at once, each bounded by the node timeout; one answer per
    /// node, in node order.
    async fn ask<'a, T, F>(&'a self, call: impl Fn(&'a RedisStore<C>) -> F) -> Vec<Result<T>>
    where
        F: Future<Output = Result<T>> + 'a,
    {
        let limit = self.node_timeout;
        join_all(
            self.nodes
                .iter()
                .map(|node| bounded(limit, call(&node.store)))
                .collect(),
        )
        .await
    }

    /// Compare-and-delete on the nodes `which`, all at once, announced to waiters if
    /// `announce`; failures are only logged, since the TTL ends whatever a failed delete
    /// leaves.
    async fn release_on(&self, which: &[usize], key: &LockKey, token: &Token, announce: bool) {
        let limit = self.node_timeout;
        let calls = which
            .iter()
            .filter_map(|&i| self.nodes.get(i))
            .map(|node| async move {
                (
                    node,
                    bounded(
                        limit,
                        node.store.release_maybe_announced(key, token, announce),
                    )
                    .await,
                )
            })
            .collect();
        for (node, answer) in join_all(calls).await {
            if let Err(e) = answer {
                tracing::warn!(
                    node = node.name,
                    key = %key,
                    error = %e,
                    "cleanup release failed; a lease set there ends with its TTL"
                );
            }
        }
    }

    /// Sets the lease again on nodes that no longer have it, while a majority still does.
    ///
    /// Safe because our token is on a majority right now, so nobody else can hold the lock;
    /// useful because a node that restarted empty (or was down when the lease was taken)
    /// otherwise leaves the lease one failure closer to losing its majority. Only for a
    /// guard's own `extend`: the guard is borrowed for the whole call, so its release
    /// cannot slip in between and be undone by the SET.
    async fn repair(&self, which: &[usize], key: &LockKey, token: &Token, ttl: Ttl) {
        let limit = self.node_timeout;
        let calls = which
            .iter()
            .filter_map(|&i| self.nodes.get(i))
            .map(|node| async move {
                (
                    node,
                    bounded(limit, node.store.acquire_here(key, token, ttl, false)).await,
                )
            })
            .collect();
        for (node, answer) in join_all(calls).await {
            match answer {
                Ok(Acquire::Taken { .. }) => tracing::info!(
                    node = node.name,
                    key = %key,
                    "lease set again on a node that had lost it"
                ),
                Ok(Acquire::Held { .. }) => tracing::debug!(
                    node = node.name,
                    key = %key,
                    "node that had lost the lease now holds another owner's; left alone"
                ),
                Err(e) => tracing::debug!(
                    node = node.name,
                    key = %key,
                    error = %e,
                    "could not set the lease again on a node that had lost it"
                ),
            }
        }
    }

    /// Compare-and-delete on every node; `by_body` sends the script's body (a background
    /// release, see [`RedisStore::release_by_body`]).
    async fn release_all(&self, key: &LockKey, token: &Token, by_body: bool) -> Result<Verdict> {
        let started = Instant::now();
        let answers = if key.is_queued() {
            // Fair mode: the node with the queue last, so that when it names the next
            // waiter the other nodes have let the lease go already.
            let first = self.queue_node(key);
            let limit = self.node_timeout;
            let mut answers: Vec<Option<Result<NodeAnswer>>> = join_all(
                (0..self.nodes.len())
                    .map(|i| async move {
                        if i == first {
                            None
                        } else {
                            Some(bounded(limit, self.release_one(i, key, token, by_body)).await)
                        }
                    })
                    .collect(),
            )
            .await;
            answers[first] =
                Some(bounded(limit, self.release_one(first, key, token, by_body)).await);
            answers
                .into_iter()
                .map(|a| a.unwrap_or_else(|| Err(fanout::no_answer(limit))))
                .collect()
        } else {
            let limit = self.node_timeout;
            join_all(
                (0..self.nodes.len())
                    .map(|i| bounded(limit, self.release_one(i, key, token, by_body)))
                    .collect(),
            )
            .await
        };
        self.release_verdict(key, answers, started.elapsed())
    }

    /// What the release answers of every node come to: a verdict, or a quorum error.
    fn release_verdict(
        &self,
        key: &LockKey,
        answers: Vec<Result<NodeAnswer>>,
        elapsed: Duration,
    ) -> Result<Verdict> {
        match decide_verdict(&answers, self.quorum, true) {
            Verdict::Lost(LostReason::NoQuorum) => {
                let error = QuorumError {
                    operation: QuorumOperation::Release,
                    key: key.display(),
                    needed: self.quorum,
                    nodes: self.reports(answers, |v| match v {
                        NodeAnswer::Done => NodeOutcome::Confirmed,
                        NodeAnswer::Expired => NodeOutcome::Expired,
                        NodeAnswer::Taken => NodeOutcome::HeldByOther { retry_after: None },
                    }),
                    elapsed,
                    validity_ran_out: false,
                };
                tracing::warn!(error = %error, "release without quorum");
                Err(Error::Quorum(Box::new(error)))
            }
            verdict => {
                if answers.iter().any(|a| a.is_err()) {
                    self.log_unconfirmed("release", key, &answers);
                }
                Ok(verdict)
            }
        }
    }

    /// Compare-and-delete on node `i`; `by_body` sends the script's body.
    async fn release_one(
        &self,
        i: usize,
        key: &LockKey,
        token: &Token,
        by_body: bool,
    ) -> Result<NodeAnswer> {
        let store = &self.nodes[i].store;
        if by_body {
            store.release_by_body(key, token).await
        } else {
            store.release_here(key, token).await
        }
    }

    /// One report per node, in node order, from its answer.
    pub(crate) fn reports<T>(
        &self,
        answers: Vec<Result<T>>,
        outcome: impl Fn(T) -> NodeOutcome,
    ) -> Vec<NodeReport> {
        self.nodes
            .iter()
            .zip(answers)
            .enumerate()
            .map(|(index, (node, answer))| NodeReport {
                index,
                node: node.name.clone(),
                outcome: match answer {
                    Ok(value) => outcome(value),
                    Err(e) => NodeOutcome::Failed(e),
                },
            })
            .collect()
    }

    fn log_unconfirmed(&self, what: &str, key: &LockKey, answers: &[Result<NodeAnswer>]) {
        for (node, answer) in self.nodes.iter().zip(answers) {
            match answer {
                Ok(NodeAnswer::Done) => {}
                Ok(other) => {
                    tracing::warn!(node = node.name, key = %key, answer = ?other, "{what} not confirmed by node")
                }
                Err(e) => {
                    tracing::warn!(node = node.name, key = %key, error = %e, "{what} failed on node")
                }
            }
        }
    }
}

impl<C> LeaseStore for RedlockStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn fences(&self) -> bool {
        // A per-node counter is no token for the lock as a whole.
        false
    }

    fn queues(&self) -> bool {
        true
    }

    fn acquire_queued<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        _fenced: bool,
        queue: Queue<'a>,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_fair(key, token, ttl, queue))
    }

    fn leave_queue<'a>(&'a self, key: &'a LockKey, waiter: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.leave_fair_queue(key, waiter))
    }

    fn replica_acks(&self) -> Result<()> {
        // Independent primaries have no replicas of one another to wait for.
        Err(crate::store::no_replicas(
            "a lock over several independent primaries (Redlock)",
        ))
    }

    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        _fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_on(key, token, ttl, Instant::now(), Vec::new(), false))
    }

    fn acquire_contended<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        _fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_leader_first(key, token, ttl))
    }

    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            let started = Instant::now();
            let answers = self.ask(|node| node.extend_here(key, token, ttl)).await;
            let in_time = Instant::now() < ttl.valid_until(started);
            let verdict = decide_verdict(&answers, self.quorum, in_time);
            if verdict == Verdict::Done {
                let lost_it: Vec<usize> = answers
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| matches!(a, Ok(NodeAnswer::Expired)))
                    .map(|(i, _)| i)
                    .collect();
                self.repair(&lost_it, key, token, ttl).await;
            } else {
                self.log_unconfirmed("extend", key, &answers);
            }
            Ok(verdict)
        })
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(self.release_all(key, token, false))
    }

    fn passes(&self) -> bool {
        true
    }

    fn pass<'a>(
        &'a self,
        key: &'a LockKey,
        from: &'a Token,
        to: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Passed>> {
        Box::pin(self.pass_all(key, from, to, ttl))
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(self.release_all(key, token, true))
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            let started = Instant::now();
            // A node extends the batch in chunks, one round trip each; give it the node
            // timeout per chunk.
            let chunks =
                u32::try_from(batch.len().div_ceil(RENEWALS_PER_CALL).max(1)).unwrap_or(u32::MAX);
            let limit = self.node_timeout.saturating_mul(chunks);
            let per_node: Vec<Vec<Result<NodeAnswer>>> = join_all(
                self.nodes
                    .iter()
                    .map(|node| async move {
                        match tokio::time::timeout(limit, node.store.extend_many_here(batch)).await
                        {
                            Ok(answers) if answers.len() == batch.len() => answers,
                            Ok(answers) => {
                                let e = Error::unexpected_reply(format!(
                                    "{} answers for {} leases",
                                    answers.len(),
                                    batch.len()
                                ));
                                batch.iter().map(|_| Err(e.clone())).collect()
                            }
                            Err(_) => {
                                let e = no_answer(limit);
                                batch.iter().map(|_| Err(e.clone())).collect()
                            }
                        }
                    })
                    .collect(),
            )
            .await;
            let now = Instant::now();
            // No repair here, unlike `extend`: the auto-extension task runs beside the guard, and a
            // SET on a node that lost the lease could land after the guard's release and
            // leave a key nobody releases.
            batch
                .iter()
                .enumerate()
                .map(|(i, extension)| {
                    let answers: Vec<Result<NodeAnswer>> = per_node
                        .iter()
                        .map(|node| {
                            node.get(i)
                                .cloned()
                                .unwrap_or_else(|| Err(Error::unexpected_reply("missing answer")))
                        })
                        .collect();
                    let in_time = now < extension.ttl.valid_until(started);
                    let verdict = decide_verdict(&answers, self.quorum, in_time);
                    if verdict != Verdict::Done {
                        self.log_unconfirmed("extension", &extension.key, &answers);
                    }
                    Ok(verdict)
                })
                .collect()
        })
    }
}

/// How many of `answers` are successful and match `is`.
fn count<T>(answers: &[Result<T>], is: impl Fn(&T) -> bool) -> usize {
    answers.iter().filter(|a| a.as_ref().is_ok_and(&is)).count()
}

/// At least one node.
pub(crate) fn check_node_count(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(
            "nodes",
            "a lock over several primaries needs at least one node",
        ));
    }
    Ok(())
}
