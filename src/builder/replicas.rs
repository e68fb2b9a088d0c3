//! The builder's replica acknowledgement setting.

use std::time::Duration;

use super::LockManagerBuilder;
use crate::options::Replicas;

impl LockManagerBuilder {
    /// Replica-acknowledged leases for every lock of the manager: each acquire, extend and
    /// auto-extension is followed on the primary, in the same round trip, by
    /// `WAIT count timeout`, and counts only if `count` replicas acknowledged it within
    /// `timeout`. See [`LockOptions::with_replicas`](crate::LockOptions::with_replicas) for
    /// what it buys, what it costs and what happens when fewer replicas acknowledge. A lock
    /// call's options override it ([`with_replicas`](crate::LockOptions::with_replicas),
    /// [`without_replicas`](crate::LockOptions::without_replicas)).
    ///
    /// **Connections.** `WAIT` blocks the connection it is sent on until the replicas
    /// answer or the timeout passes. A manager made by [`connect`](Self::connect),
    /// [`connect_sentinel`](Self::connect_sentinel) or `connect_cluster` (feature
    /// `cluster`; cluster connections, routed to the lock's primary) therefore sends replica-acknowledged
    /// calls on connections of their own (up to 8, opened when first needed, each used by
    /// one call at a time and bounded by the command timeout plus `timeout`), so plain
    /// locks and releases on its shared connection never queue behind a `WAIT`.
    /// [`build`](Self::build) on a connection of yours sends them on that connection, where
    /// a lagging replica holds up every command queued behind the `WAIT`, up to `timeout`
    /// (and the connection's own response timeout must exceed `timeout`);
    /// `build_pool` checks a pooled connection out for the call alone.
    ///
    /// Checked at build: `count` ≥ 1, `timeout` between 1 ms and
    /// [`MAX_REPLICA_TIMEOUT`](crate::MAX_REPLICA_TIMEOUT) and shorter than the default TTL;
    /// a manager over several primaries or ZooKeeper is refused
    /// ([`Error::InvalidArgument`](crate::Error::InvalidArgument)).
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// use std::time::Duration;
    /// let locks = distlock::LockManager::builder()
    ///     .with_replicas(1, Duration::from_millis(100))
    ///     .connect("redis://10.0.0.1:6379")
    ///     .await?;
    /// // Ok only once one replica has the lease as well.
    /// let guard = locks.lock("jobs:nightly").await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn with_replicas(mut self, count: u32, timeout: Duration) -> Self {
        self.replicas = Some(Replicas::new(count, timeout));
        self
    }
}
