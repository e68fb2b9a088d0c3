//! The one error type of the crate.

use std::fmt;
use std::time::Duration;

mod quorum;
#[cfg(feature = "zookeeper")]
mod zookeeper;

pub use quorum::{NodeOutcome, NodeReport, QuorumError, QuorumOperation};
#[cfg(feature = "zookeeper")]
pub use zookeeper::ZooKeeperError;

/// A `Result` whose error is [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, keeping or giving back a lock.
///
/// Each case asks the caller for a different reaction:
///
/// | case | meaning | typical reaction |
/// |---|---|---|
/// | [`Contended`](Error::Contended) | one attempt found the lock held by another owner | skip the work, or try later |
/// | [`Timeout`](Error::Timeout) | the wait budget ran out while another owner held it | give up or report busy |
/// | [`Lost`](Error::Lost) | a lease this caller held is no longer its own | stop touching the protected resource |
/// | [`Redis`](Error::Redis) | the server or the network failed (includes response timeouts) | retry later, alert |
/// | [`Quorum`](Error::Quorum) | several primaries: too few of them answered for a majority | retry later, alert |
/// | [`NotReplicated`](Error::NotReplicated) | fewer replicas acknowledged the lease's write than asked | retry later, alert |
/// | [`InvalidArgument`](Error::InvalidArgument) | a key or an option cannot be used | fix the call |
///
/// "Held by another owner" ([`Contended`](Error::Contended), [`Timeout`](Error::Timeout))
/// and "Redis is unreachable" ([`Redis`](Error::Redis), [`Quorum`](Error::Quorum)) are never
/// reported as one another.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A single attempt ([`LockManager::try_lock`](crate::LockManager::try_lock)) found the
    /// lock held by another owner.
    #[error("lock {key} is held by another owner")]
    Contended {
        /// The lock's name, as the caller gave it (lossy UTF-8, shortened).
        key: String,
        /// How long the current owner's lease has left, when the server said so.
        /// A good hint for when to try again.
        retry_after: Option<Duration>,
    },

    /// The wait budget ran out while another owner held the lock.
    #[error(
        "lock {key} still held by another owner after waiting {waited:?} ({attempts} attempts)"
    )]
    Timeout {
        /// The lock's name, as the caller gave it (lossy UTF-8, shortened).
        key: String,
        /// How long the call waited, on the monotonic clock.
        waited: Duration,
        /// How many acquire attempts were sent to the server.
        attempts: u32,
    },

    /// A lease this caller held is gone: it expired, or another owner holds the key now.
    ///
    /// Returned by [`LockGuard::extend`](crate::LockGuard::extend) and
    /// [`LockGuard::release`](crate::LockGuard::release). The protected work must be treated
    /// as unprotected from the moment the lease ended.
    #[error("lease on lock {key} was lost: {reason}")]
    Lost {
        /// The lock's name, as the caller gave it (lossy UTF-8, shortened).
        key: String,
        /// Why the lease is gone.
        reason: LostReason,
    },

    /// The Redis server or the connection to it failed, or did not answer in time.
    ///
    /// The outcome of the command that failed is unknown; distlock never reports such a
    /// failure as contention or as a lease still held.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),

    /// A key or an option that distlock cannot use; nothing was sent to Redis.
    #[error("invalid argument: {0}")]
    InvalidArgument(InvalidArgument),

    /// A lock over several independent primaries (Redlock) could not get a majority of them
    /// to answer: too many nodes failed or timed out, or the answers came back after the
    /// lease's validity had run out. Carries what every node answered.
    ///
    /// Never returned when another owner holds the lock on a majority: that is
    /// [`Contended`](Error::Contended) or [`Timeout`](Error::Timeout).
    ///
    /// ```
    /// # fn report(err: distlock::Error) {
    /// if let distlock::Error::Quorum(q) = &err {
    ///     eprintln!("{} of {} nodes confirmed, {} needed", q.confirmed(), q.nodes().len(), q.needed());
    ///     for (node, why) in q.failures() {
    ///         eprintln!("  {node}: {why}");
    ///     }
    /// }
    /// # }
    /// ```
    #[error("{0}")]
    Quorum(Box<QuorumError>),

    /// Fewer replicas acknowledged a lease's write within the timeout than
    /// [`LockOptions::with_replicas`](crate::LockOptions::with_replicas) asked for.
    ///
    /// From an acquire: the lease was taken on the primary and then deleted again
    /// (compare-and-delete with its token; if that failed too, it is released in the
    /// background), so the caller holds nothing. From [`LockGuard::extend`](crate::LockGuard::extend):
    /// the primary extended the lease, but the guard keeps only the earlier of the old
    /// deadline and the new one, since a promoted replica may still have the old expiry.
    ///
    /// ```
    /// # fn report(err: distlock::Error) {
    /// if let distlock::Error::NotReplicated { acknowledged, requested, .. } = &err {
    ///     eprintln!("only {acknowledged} of {requested} replicas acknowledged the lease");
    /// }
    /// # }
    /// ```
    #[error(
        "lock {key}: {acknowledged} of {requested} replicas acknowledged the lease's write \
         within {timeout:?}"
    )]
    NotReplicated {
        /// The lock's name, as the caller gave it (lossy UTF-8, shortened).
        key: String,
        /// How many replicas acknowledged (`WAIT`'s answer).
        acknowledged: u32,
        /// How many were asked for.
        requested: u32,
        /// How long the primary waited for them.
        timeout: Duration,
    },

    /// A ZooKeeper request failed (`zookeeper` feature): connection, session or server;
    /// see [`ZooKeeperError::is_transient`].
    #[cfg(feature = "zookeeper")]
    #[error("zookeeper error: {0}")]
    ZooKeeper(ZooKeeperError),
}

impl Error {
    /// `true` for [`Error::Contended`] and [`Error::Timeout`]: another owner holds the lock.
    pub fn is_held_by_other(&self) -> bool {
        matches!(self, Error::Contended { .. } | Error::Timeout { .. })
    }

    /// `true` for [`Error::Lost`].
    pub fn is_lost(&self) -> bool {
        matches!(self, Error::Lost { .. })
    }

    /// `true` for [`Error::Redis`]: the server or the network failed.
    pub fn is_redis(&self) -> bool {
        matches!(self, Error::Redis(_))
    }

    /// `true` for [`Error::NotReplicated`]: fewer replicas acknowledged than asked.
    pub fn is_not_replicated(&self) -> bool {
        matches!(self, Error::NotReplicated { .. })
    }

    /// `true` for [`Error::Quorum`]: too few of several primaries answered.
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// match locks.try_lock("jobs:nightly").await {
    ///     Ok(guard) => guard.release().await?,
    ///     Err(e) if e.is_quorum() => eprintln!("lock service degraded: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn is_quorum(&self) -> bool {
        matches!(self, Error::Quorum(_))
    }

    /// `true` for an [`Error::Redis`] of the connection rather than of the request: refused,
    /// dropped or timed out, a server still loading its data after a restart, or a failover
    /// in progress (a server that is no longer the primary: `READONLY`, `MASTERDOWN`; no
    /// Sentinel naming a primary that answers as one yet; a cluster slot without a
    /// primary: `CLUSTERDOWN`; `TRYAGAIN` while a slot migrates). Trying
    /// again after a pause may succeed; the waiting calls
    /// ([`lock`](crate::LockManager::lock) and friends) do so within their budget. Errors the
    /// server answered to the request itself (`WRONGTYPE`, `NOPERM`, a script error) are
    /// not transient.
    pub fn is_transient(&self) -> bool {
        #[cfg(feature = "zookeeper")]
        if let Error::ZooKeeper(e) = self {
            return e.is_transient();
        }
        let Error::Redis(e) = self else {
            return false;
        };
        e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::ReadOnly
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ClusterDown
                )
            )
            || matches!(e.kind(), redis::ErrorKind::MasterNameNotFoundBySentinel)
    }

    /// A reply that came too late or never: the kind of error a response timeout gives.
    pub(crate) fn timed_out(detail: impl Into<String>) -> Self {
        Error::Redis(timed_out(detail))
    }

    /// A reply the scripts never give: not a connection failure, so never retried.
    pub(crate) fn unexpected_reply(detail: impl Into<String>) -> Self {
        Error::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected reply from Redis",
            detail.into(),
        )))
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidArgument(InvalidArgument {
            what,
            detail: detail.into(),
        })
    }
}

/// Why a lease is no longer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LostReason {
    /// The lease's time ran out before it was released or extended: the key was gone.
    Expired,
    /// The key holds another owner's token: the lease expired and somebody else took it.
    Taken,
    /// Auto-extensions could not reach Redis until the lease's validity deadline passed.
    Unreachable,
    /// Auto-extension stopped at the hold-time cap
    /// ([`LockOptions::with_max_hold`](crate::LockOptions::with_max_hold)) and the lease ran out.
    MaxHoldReached,
    /// The holder released the lease.
    Released,
    /// A lease over several primaries (Redlock) could not be confirmed on a majority of
    /// them: too many nodes failed, timed out or no longer had the lease.
    NoQuorum,
    /// Auto-extensions of a replica-acknowledged lease
    /// ([`LockOptions::with_replicas`](crate::LockOptions::with_replicas)) reached the
    /// primary, but none was acknowledged by enough replicas before the lease's validity
    /// deadline, counted from the last acknowledged one.
    NotReplicated,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "the lease expired",
            LostReason::Taken => "another owner holds the lock",
            LostReason::Unreachable => "Redis could not be reached to extend the lease",
            LostReason::MaxHoldReached => "the hold-time cap was reached",
            LostReason::Released => "the lease was released",
            LostReason::NoQuorum => "a majority of the lock's nodes did not confirm the lease",
            LostReason::NotReplicated => {
                "too few replicas acknowledged the lease's extensions in time"
            }
        })
    }
}

/// What was wrong with an argument; carried by [`Error::InvalidArgument`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidArgument {
    what: &'static str,
    detail: String,
}

impl InvalidArgument {
    /// Which argument was rejected: `"key"`, `"ttl"`, `"wait"`, `"backoff"`, `"url"`,
    /// `"prefix"`, `"timeout"`, `"nodes"` or `"replicas"`.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// A human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for InvalidArgument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.detail)
    }
}

/// Shortened, printable form of a lock name for errors and logs.
pub(crate) fn display_key(name: &[u8]) -> String {
    const MAX: usize = 64;
    let text = String::from_utf8_lossy(&name[..name.len().min(MAX)]);
    if name.len() > MAX {
        format!("{text}…")
    } else {
        text.into_owned()
    }
}

/// The Redis error of a reply that came too late or never, as a response timeout gives it
/// (`is_timeout()` holds, so it counts as transient).
pub(crate) fn timed_out(detail: impl Into<String>) -> redis::RedisError {
    std::io::Error::new(std::io::ErrorKind::TimedOut, detail.into()).into()
}

#[cfg(test)]
mod tests {
    use super::Error;
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    fn redis(kind: ErrorKind) -> Error {
        Error::Redis(RedisError::from((kind, "test")))
    }

    #[test]
    fn failovers_in_progress_are_transient_and_answers_to_the_request_are_not() {
        for kind in [
            ServerErrorKind::ReadOnly,
            ServerErrorKind::MasterDown,
            ServerErrorKind::ClusterDown,
            ServerErrorKind::TryAgain,
            ServerErrorKind::BusyLoading,
        ] {
            assert!(redis(ErrorKind::Server(kind)).is_transient(), "{kind:?}");
        }
        assert!(redis(ErrorKind::MasterNameNotFoundBySentinel).is_transient());
        for kind in [
            ServerErrorKind::ResponseError,
            ServerErrorKind::NoScript,
            ServerErrorKind::NoPerm,
        ] {
            assert!(!redis(ErrorKind::Server(kind)).is_transient(), "{kind:?}");
        }
    }
}
