//! What a lock over several primaries reports when it cannot reach a majority: one
//! [`QuorumError`] listing what every node answered.

use std::fmt;
use std::time::Duration;

use super::Error;

/// Which call on a lock over several primaries failed to reach a majority.
///
/// ```
/// use distlock::QuorumOperation;
/// assert_eq!(QuorumOperation::Acquire.to_string(), "acquire");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuorumOperation {
    /// Reaching the nodes when the manager was built
    /// ([`connect_redlock`](crate::LockManagerBuilder::connect_redlock)).
    Connect,
    /// Taking the lease.
    Acquire,
    /// Releasing the lease.
    Release,
}

impl fmt::Display for QuorumOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuorumOperation::Connect => "connect",
            QuorumOperation::Acquire => "acquire",
            QuorumOperation::Release => "release",
        })
    }
}

/// What one node answered.
///
/// ```
/// use distlock::NodeOutcome;
/// assert!(NodeOutcome::Confirmed.is_confirmed());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeOutcome {
    /// The node did what was asked: set the lease, deleted it, or answered at connect.
    Confirmed,
    /// Another owner's lease is on this node.
    HeldByOther {
        /// How long that lease has left on this node, when the node said so.
        retry_after: Option<Duration>,
    },
    /// Nothing was there to release: the lease had expired on this node (or the node lost
    /// it in a restart).
    Expired,
    /// The node failed or did not answer within the per-node timeout
    /// ([`LockManagerBuilder::with_node_timeout`](crate::LockManagerBuilder::with_node_timeout)); a
    /// timeout is an [`Error::Redis`] whose [`is_timeout`](redis::RedisError::is_timeout)
    /// is `true`.
    Failed(Error),
}

impl NodeOutcome {
    /// `true` for [`NodeOutcome::Confirmed`].
    pub fn is_confirmed(&self) -> bool {
        matches!(self, NodeOutcome::Confirmed)
    }

    /// The error, for [`NodeOutcome::Failed`].
    pub fn error(&self) -> Option<&Error> {
        match self {
            NodeOutcome::Failed(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for NodeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeOutcome::Confirmed => f.write_str("confirmed"),
            NodeOutcome::HeldByOther { .. } => f.write_str("held by another owner"),
            NodeOutcome::Expired => f.write_str("lease not there (expired)"),
            NodeOutcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// One node's answer, with the node's name.
///
/// The name is `host:port` for managers built with
/// [`connect_redlock`](crate::LockManagerBuilder::connect_redlock) (never the password), and
/// `node <index>` for [`build_redlock`](crate::LockManagerBuilder::build_redlock).
///
/// ```
/// # fn show(q: &distlock::QuorumError) {
/// for report in q.nodes() {
///     println!("#{} {}: {}", report.index(), report.node(), report.outcome());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct NodeReport {
    pub(crate) index: usize,
    pub(crate) node: String,
    pub(crate) outcome: NodeOutcome,
}

impl NodeReport {
    /// The node's position in the list the manager was built from.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's name (`host:port`, or `node <index>`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What the node answered.
    pub fn outcome(&self) -> &NodeOutcome {
        &self.outcome
    }
}

/// Too few of a lock's primaries answered for a majority; carried by [`Error::Quorum`].
///
/// Lists every node with its answer, so a caller (or a log line) sees which nodes failed
/// and why. Acquire failures have been cleaned up before this error is returned: the lease
/// was released on every node that could hold it.
///
/// ```
/// # fn report(q: &distlock::QuorumError) {
/// eprintln!("{q}"); // e.g. "acquire on lock jobs: 2 of 5 nodes confirmed, 3 needed; ..."
/// assert!(q.confirmed() < q.needed() || q.validity_ran_out());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct QuorumError {
    pub(crate) operation: QuorumOperation,
    pub(crate) key: String,
    pub(crate) needed: usize,
    pub(crate) nodes: Vec<NodeReport>,
    pub(crate) elapsed: Duration,
    pub(crate) validity_ran_out: bool,
}

impl QuorumError {
    /// Which call failed.
    pub fn operation(&self) -> QuorumOperation {
        self.operation
    }

    /// The lock's name, as the caller gave it (lossy UTF-8, shortened); empty for
    /// [`QuorumOperation::Connect`].
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How many nodes make a majority: `N / 2 + 1`.
    pub fn needed(&self) -> usize {
        self.needed
    }

    /// How many nodes confirmed.
    pub fn confirmed(&self) -> usize {
        self.nodes
            .iter()
            .filter(|r| r.outcome.is_confirmed())
            .count()
    }

    /// Every node's answer, in the order the manager was built with.
    pub fn nodes(&self) -> &[NodeReport] {
        &self.nodes
    }

    /// The nodes that failed or timed out, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &Error)> {
        self.nodes
            .iter()
            .filter_map(|r| r.outcome.error().map(|e| (r.node.as_str(), e)))
    }

    /// How long the call took, on the monotonic clock.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// `true` when a majority did confirm, but only after the lease's validity
    /// (`ttl - elapsed - drift`) had run out, so the lease could not be used. A TTL that is
    /// short next to the nodes' latency (or the per-node timeout) causes it.
    pub fn validity_ran_out(&self) -> bool {
        self.validity_ran_out
    }
}

impl fmt::Display for QuorumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.operation)?;
        if !self.key.is_empty() {
            write!(f, " on lock {}", self.key)?;
        }
        write!(
            f,
            ": {} of {} nodes confirmed, {} needed",
            self.confirmed(),
            self.nodes.len(),
            self.needed
        )?;
        if self.validity_ran_out {
            write!(
                f,
                ", but only after {:?}, when the lease's validity had run out",
                self.elapsed
            )?;
        }
        let mut first = true;
        for report in self.nodes.iter().filter(|r| !r.outcome.is_confirmed()) {
            f.write_str(if first { "; " } else { ", " })?;
            first = false;
            write!(f, "{}: {}", report.node, report.outcome)?;
        }
        Ok(())
    }
}
