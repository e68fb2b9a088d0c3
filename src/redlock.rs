//! One lock over several independent Redis primaries (Redlock).
//!
//! [`RedlockStore`] is a [`LeaseStore`] over N nodes, each an ordinary single-primary
//! [`RedisStore`]. The manager, guard, waiting loop, drop-release and renewal work on it
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
//! Node answers are classified the same way for every call, in [`decide_acquire`] and
//! [`decide_verdict`], pure functions the unit tests below pin down.

use std::collections::HashSet;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};

use crate::error::{Error, Result};
use crate::key::{LockKey, Token};
use crate::manager::{LockManager, LockManagerBuilder};
use crate::options::Ttl;
use crate::quorum::{NodeOutcome, NodeReport, QuorumError, QuorumOperation};
use crate::store::{
    Acquire, BoxFuture, LeaseStore, RENEWALS_PER_CALL, RedisStore, Renewal, Verdict,
};

/// The number of nodes that make a majority of `n`.
fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// One primary of the set.
struct Node {
    /// `host:port` or `node <index>`: how errors and logs name it.
    name: String,
    store: Box<dyn LeaseStore>,
}

/// Leases on a majority of N independent primaries.
pub(crate) struct RedlockStore {
    nodes: Vec<Node>,
    quorum: usize,
    node_timeout: Duration,
}

impl RedlockStore {
    fn new(nodes: Vec<Node>, node_timeout: Duration) -> Self {
        RedlockStore {
            quorum: majority(nodes.len()),
            nodes,
            node_timeout,
        }
    }

    /// Sends `call` to every node at once, each bounded by the node timeout; one answer per
    /// node, in node order.
    async fn ask<'a, T>(
        &'a self,
        call: impl Fn(&'a dyn LeaseStore) -> BoxFuture<'a, Result<T>>,
    ) -> Vec<Result<T>> {
        let limit = self.node_timeout;
        join_all(
            self.nodes
                .iter()
                .map(|node| bounded(limit, call(node.store.as_ref())))
                .collect(),
        )
        .await
    }

    /// Compare-and-delete on the nodes `which`, all at once; failures are only logged,
    /// since the TTL ends whatever a failed delete leaves.
    async fn release_on(&self, which: &[usize], key: &LockKey, token: &Token) {
        let limit = self.node_timeout;
        let calls = which
            .iter()
            .filter_map(|&i| self.nodes.get(i))
            .map(|node| async move { (node, bounded(limit, node.store.release(key, token)).await) })
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
                    bounded(limit, node.store.acquire(key, token, ttl)).await,
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

    fn reports<T>(
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

    fn log_unconfirmed(&self, what: &str, key: &LockKey, answers: &[Result<Verdict>]) {
        for (node, answer) in self.nodes.iter().zip(answers) {
            match answer {
                Ok(Verdict::Done) => {}
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

/// What an acquire's answers add up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcquireDecision {
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
fn decide_acquire(answers: &[Result<Acquire>], quorum: usize, in_time: bool) -> AcquireDecision {
    let taken = answers
        .iter()
        .filter(|a| matches!(a, Ok(Acquire::Taken { .. })))
        .count();
    let mut held: Vec<Option<Duration>> = answers
        .iter()
        .filter_map(|a| match a {
            Ok(Acquire::Held { pttl }) => Some(*pttl),
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

/// Classifies the answers to a compare-and-act call (extend, release) over all N nodes.
///
/// - a majority confirmed (and, for extend, before the new validity ran out): `Done`;
/// - the nodes that answered rule a majority out, even if every failed node had confirmed:
///   the lease is gone, `Taken` when another owner has a majority, `Expired` otherwise;
/// - else too many nodes failed to know: `NoQuorum`.
fn decide_verdict(answers: &[Result<Verdict>], quorum: usize, in_time: bool) -> Verdict {
    let count = |v: Verdict| {
        answers
            .iter()
            .filter(|a| matches!(a, Ok(x) if *x == v))
            .count()
    };
    let done = count(Verdict::Done);
    let taken = count(Verdict::Taken);
    // A node store never answers `NoQuorum`; should one, it confirms nothing.
    let failed = answers
        .iter()
        .filter(|a| matches!(a, Err(_) | Ok(Verdict::NoQuorum)))
        .count();
    if done >= quorum {
        return if in_time {
            Verdict::Done
        } else {
            Verdict::NoQuorum
        };
    }
    if done + failed < quorum {
        return if taken >= quorum {
            Verdict::Taken
        } else {
            Verdict::Expired
        };
    }
    Verdict::NoQuorum
}

impl LeaseStore for RedlockStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(async move {
            // Validity counts from here, before the first node is asked: the manager's
            // `valid_until` is measured from a moment earlier still, so it never claims
            // more than this check allowed.
            let started = Instant::now();
            let answers = self.ask(|node| node.acquire(key, token, ttl)).await;
            let elapsed = started.elapsed();
            let in_time = Instant::now() < ttl.valid_until(started);
            let decision = decide_acquire(&answers, self.quorum, in_time);
            // Unless the lease is ours, undo every SET this attempt may have made: on the
            // nodes that took it and on the ones that failed or timed out (the SET may have
            // landed after the node timeout; a delete sent now follows it on the same
            // connection). A node that answered "held" provably has no key of ours. If this
            // future is dropped during the cleanup, the manager's abandoned-acquire release
            // (on all nodes) covers it.
            let maybe_ours: Vec<usize> = answers
                .iter()
                .enumerate()
                .filter(|(_, a)| !matches!(a, Ok(Acquire::Held { .. })))
                .map(|(i, _)| i)
                .collect();
            let outcome = match decision {
                AcquireDecision::Taken => return Ok(Acquire::Taken { fence: None }),
                AcquireDecision::Held { retry_after } => {
                    tracing::debug!(
                        key = %key,
                        ?retry_after,
                        "no majority: held by another owner"
                    );
                    Ok(Acquire::Held { pttl: retry_after })
                }
                AcquireDecision::NoQuorum { validity_ran_out } => {
                    let error = QuorumError {
                        operation: QuorumOperation::Acquire,
                        key: key.display(),
                        needed: self.quorum,
                        nodes: self.reports(answers, |a| match a {
                            Acquire::Taken { .. } => NodeOutcome::Confirmed,
                            Acquire::Held { pttl } => {
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
            self.release_on(&maybe_ours, key, token).await;
            outcome
        })
    }

    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            let started = Instant::now();
            let answers = self.ask(|node| node.extend(key, token, ttl)).await;
            let in_time = Instant::now() < ttl.valid_until(started);
            let verdict = decide_verdict(&answers, self.quorum, in_time);
            if verdict == Verdict::Done {
                let lost_it: Vec<usize> = answers
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| matches!(a, Ok(Verdict::Expired)))
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
        Box::pin(async move {
            let started = Instant::now();
            let answers = self.ask(|node| node.release(key, token)).await;
            let elapsed = started.elapsed();
            match decide_verdict(&answers, self.quorum, true) {
                Verdict::NoQuorum => {
                    let error = QuorumError {
                        operation: QuorumOperation::Release,
                        key: key.display(),
                        needed: self.quorum,
                        nodes: self.reports(answers, |v| match v {
                            Verdict::Done => NodeOutcome::Confirmed,
                            Verdict::Expired => NodeOutcome::Expired,
                            Verdict::Taken => NodeOutcome::HeldByOther { retry_after: None },
                            Verdict::NoQuorum => {
                                NodeOutcome::Failed(unexpected("a node answered no-quorum"))
                            }
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
        })
    }

    fn extend_many<'a>(&'a self, batch: &'a [Renewal]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            let started = Instant::now();
            // A node renews the batch in chunks, one round trip each; give it the node
            // timeout per chunk.
            let chunks =
                u32::try_from(batch.len().div_ceil(RENEWALS_PER_CALL).max(1)).unwrap_or(u32::MAX);
            let limit = self.node_timeout.saturating_mul(chunks);
            let per_node: Vec<Vec<Result<Verdict>>> = join_all(
                self.nodes
                    .iter()
                    .map(|node| async move {
                        match tokio::time::timeout(limit, node.store.extend_many(batch)).await {
                            Ok(answers) if answers.len() == batch.len() => answers,
                            Ok(answers) => {
                                let e = unexpected(&format!(
                                    "{} answers for {} leases",
                                    answers.len(),
                                    batch.len()
                                ));
                                batch.iter().map(|_| Err(e.clone())).collect()
                            }
                            Err(_) => {
                                let e = timed_out(limit);
                                batch.iter().map(|_| Err(e.clone())).collect()
                            }
                        }
                    })
                    .collect(),
            )
            .await;
            let now = Instant::now();
            // No repair here, unlike `extend`: the renewal task runs beside the guard, and a
            // SET on a node that lost the lease could land after the guard's release and
            // leave a key nobody releases.
            batch
                .iter()
                .enumerate()
                .map(|(i, renewal)| {
                    let answers: Vec<Result<Verdict>> = per_node
                        .iter()
                        .map(|node| {
                            node.get(i)
                                .cloned()
                                .unwrap_or_else(|| Err(unexpected("missing answer")))
                        })
                        .collect();
                    let in_time = now < renewal.ttl.valid_until(started);
                    let verdict = decide_verdict(&answers, self.quorum, in_time);
                    if verdict != Verdict::Done {
                        self.log_unconfirmed("renewal", &renewal.key, &answers);
                    }
                    Ok(verdict)
                })
                .collect()
        })
    }
}

/// Runs `call`, or gives up after `limit` with a timeout error.
async fn bounded<T>(limit: Duration, call: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer,
        Err(_) => Err(timed_out(limit)),
    }
}

fn timed_out(limit: Duration) -> Error {
    Error::Redis(
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
        .into(),
    )
}

fn unexpected(detail: &str) -> Error {
    crate::store::unexpected_reply(detail.to_owned())
}

/// Polls every future on the current task until all are done; outputs in input order.
///
/// Enough for a handful of nodes, needs no spawning (so nothing outlives a dropped call)
/// and no dependency beyond std.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    poll_fn(move |cx| {
        let mut all_done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(outputs.iter_mut().filter_map(Option::take).collect())
        } else {
            Poll::Pending
        }
    })
    .await
}

fn check_node_count(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid(
            "nodes",
            "a lock over several primaries needs at least one node",
        ));
    }
    Ok(())
}

impl LockManagerBuilder {
    /// Connects to N independent Redis primaries and builds a manager whose locks hold on
    /// a majority of them (the Redlock algorithm): the lock survives the loss of any
    /// minority of nodes.
    ///
    /// Each URL gets its own reconnecting [`ConnectionManager`]. All nodes are contacted at
    /// once; a majority must answer within the connect timeout, and nodes that do not are
    /// kept and retried by every later call, so a manager can start while a minority is
    /// down.
    ///
    /// The locks behave like single-primary locks (same guard, waiting, backoff, drop and
    /// renewal) with these differences:
    ///
    /// - every acquire, extend and release goes to all N nodes at once, each node bounded
    ///   by [`node_timeout`](Self::node_timeout);
    /// - an acquire succeeds when a majority (`N/2 + 1`) set the lease and validity is left;
    ///   the guard's [`valid_until`](crate::LockGuard::valid_until) is
    ///   `start + ttl - drift`, so its remaining time is `ttl - elapsed - drift`. Any other
    ///   outcome releases the lease again on every node before returning;
    /// - "held by another owner" ([`Error::Contended`], [`Error::Timeout`]) when a majority
    ///   answered but not for us; [`Error::Quorum`] (with every node's answer) when too few
    ///   answered — returned at once, not waited out;
    /// - extend and renewal need a majority of all N nodes, or the lease is lost
    ///   ([`LostReason::NoQuorum`](crate::LostReason::NoQuorum)); a failed extend releases
    ///   nothing. A successful [`LockGuard::extend`](crate::LockGuard::extend) also sets
    ///   the lease again on nodes that lost it (restarted empty, or down at acquire);
    /// - release is sent to all N; see [`LockGuard::release`](crate::LockGuard::release);
    /// - waiters poll with the backoff policy (bounded by the holder's remaining TTL and
    ///   the wait budget): release notifications ([`notify`](Self::notify)) are not used,
    ///   since one subscription would tie every waiter to one node;
    /// - [`fencing_token`](crate::LockGuard::fencing_token) is `None`: see the crate docs
    ///   on [several primaries](crate#several-primaries-redlock).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no URL, a URL that does not parse, the same
    /// `host:port` listed twice (two entries on one server would let one failure count
    /// twice), or a bad option; [`Error::Quorum`] when fewer than a majority of nodes
    /// answered.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempts; nothing is left behind.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// use std::time::Duration;
    /// use distlock::LockManager;
    ///
    /// let locks = LockManager::builder()
    ///     .node_timeout(Duration::from_millis(50))
    ///     .connect_redlock([
    ///         "redis://10.0.0.1:6379",
    ///         "redis://10.0.0.2:6379",
    ///         "redis://10.0.0.3:6379",
    ///         "redis://10.0.0.4:6379",
    ///         "redis://10.0.0.5:6379",
    ///     ])
    ///     .await?;
    /// let guard = locks.lock("jobs:nightly").await?; // held on at least 3 of the 5
    /// assert_eq!(guard.fencing_token(), None);
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_redlock<I>(self, urls: I) -> Result<LockManager>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.check()?;
        let mut clients = Vec::new();
        let mut seen = HashSet::new();
        for url in urls {
            let client = crate::manager::open_client(url.as_ref())?;
            let name = client.get_connection_info().addr().to_string();
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(
                    "nodes",
                    format!("{name} is listed twice; the nodes must be independent servers"),
                ));
            }
            clients.push((name, client));
        }
        check_node_count(clients.len())?;

        // Response timeout at the connection level: the per-call node timeout already
        // bounds every call; this one only stops a frozen server from piling up requests.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let mut conns = Vec::with_capacity(clients.len());
        for (name, client) in clients {
            // Lazy: a node that is down now is connected by a later call.
            let conn = ConnectionManager::new_lazy_with_config(client, config.clone())?;
            conns.push((name, conn));
        }

        let started = Instant::now();
        let limit = self.connect_timeout;
        let answers = join_all(
            conns
                .iter()
                .map(|(_, conn)| {
                    let mut conn = conn.clone();
                    bounded(limit, async move {
                        redis::cmd("PING")
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(Error::from)
                    })
                })
                .collect(),
        )
        .await;
        let quorum = majority(conns.len());
        let reached = answers.iter().filter(|a| a.is_ok()).count();
        for ((name, _), answer) in conns.iter().zip(&answers) {
            if let Err(e) = answer {
                tracing::warn!(node = name, error = %e, "node unreachable at connect; later calls retry it");
            }
        }
        let nodes: Vec<Node> = conns
            .into_iter()
            .map(|(name, conn)| Node {
                name,
                store: Box::new(RedisStore::unfenced(conn, None)),
            })
            .collect();
        let store = RedlockStore::new(nodes, self.node_timeout);
        if reached < quorum {
            return Err(Error::Quorum(Box::new(QuorumError {
                operation: QuorumOperation::Connect,
                key: String::new(),
                needed: quorum,
                nodes: store.reports(answers, |()| NodeOutcome::Confirmed),
                elapsed: started.elapsed(),
                validity_ran_out: false,
            })));
        }
        Ok(self.notify(false).with_store(Arc::new(store)))
    }

    /// Builds a manager whose locks hold on a majority of the independent Redis primaries
    /// behind `conns` (the Redlock algorithm), from connections you already have. Behaves as
    /// [`connect_redlock`](Self::connect_redlock) does, without contacting the nodes first;
    /// errors and logs name the nodes `node 0`, `node 1`, … in the order given.
    ///
    /// Each connection must reach a different server: distlock cannot tell two connections
    /// to one server apart, and such a pair would let one failure count twice.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no connection or a bad option.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// let mut conns = Vec::new();
    /// for url in ["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"] {
    ///     let client = redis::Client::open(url)?;
    ///     conns.push(client.get_multiplexed_async_connection().await?);
    /// }
    /// let locks = distlock::LockManager::builder().build_redlock(conns)?;
    /// let guard = locks.try_lock("cache:rebuild").await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn build_redlock<C, I>(self, conns: I) -> Result<LockManager>
    where
        I: IntoIterator<Item = C>,
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.check()?;
        let nodes: Vec<Node> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| Node {
                name: format!("node {i}"),
                store: Box::new(RedisStore::unfenced(conn, None)),
            })
            .collect();
        check_node_count(nodes.len())?;
        let store = RedlockStore::new(nodes, self.node_timeout);
        Ok(self.notify(false).with_store(Arc::new(store)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn err() -> Error {
        timed_out(ms(1))
    }

    fn taken() -> Result<Acquire> {
        Ok(Acquire::Taken { fence: None })
    }

    fn held(pttl: u64) -> Result<Acquire> {
        Ok(Acquire::Held {
            pttl: Some(ms(pttl)),
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
        use Verdict::*;
        let v = |answers: &[Result<Verdict>]| decide_verdict(answers, 3, true);
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Done), Err(err()), Err(err())]),
            Done
        );
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Done), Ok(Expired), Ok(Taken)]),
            Done
        );
        // Two confirmations of five are not enough, however many the lease was taken on.
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Err(err()), Err(err()), Err(err())]),
            NoQuorum
        );
        assert_eq!(
            v(&[Ok(Done), Ok(Done), Ok(Expired), Err(err()), Err(err())]),
            NoQuorum
        );
        // The answers alone rule a majority out.
        assert_eq!(
            v(&[Ok(Done), Ok(Expired), Ok(Expired), Ok(Expired), Err(err())]),
            Expired
        );
        assert_eq!(
            v(&[Ok(Taken), Ok(Taken), Ok(Taken), Ok(Done), Err(err())]),
            Taken
        );
        assert_eq!(
            v(&[Ok(Taken), Ok(Taken), Ok(Expired), Ok(Expired), Ok(Done)]),
            Expired
        );
        // Confirmed too late to be of use.
        assert_eq!(
            decide_verdict(&[Ok(Done), Ok(Done), Ok(Done)], 2, false),
            NoQuorum
        );
    }

    #[tokio::test]
    async fn join_all_keeps_input_order_and_polls_every_future() {
        use tokio::sync::oneshot;
        // Each future waits for the one after it: run one at a time, in order, they would
        // never finish; the timeout turns that into a failure instead of a hang.
        let (to_first, first) = oneshot::channel::<()>();
        let (to_second, second) = oneshot::channel::<()>();
        let futures: Vec<Pin<Box<dyn Future<Output = u8> + Send>>> = vec![
            Box::pin(async move {
                first.await.ok();
                0
            }),
            Box::pin(async move {
                second.await.ok();
                to_first.send(()).ok();
                1
            }),
            Box::pin(async move {
                to_second.send(()).ok();
                2
            }),
        ];
        let out = tokio::time::timeout(Duration::from_secs(5), join_all(futures))
            .await
            .expect("join_all polls every future, not one after another");
        assert_eq!(out, [0, 1, 2]);
    }
}
