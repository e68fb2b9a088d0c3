//! Per-acquisition options: lease TTL, wait budget, backoff.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{Error, Result};

mod replicas;

use replicas::ReplicaChoice;
pub use replicas::{MAX_REPLICA_TIMEOUT, Replicas};

/// The shortest lease TTL accepted: 10 ms.
///
/// A lease's validity is its TTL minus a clock-drift allowance of `ttl/100 + 2 ms`, counted
/// from before the command was sent; a TTL of 2 ms or less would leave no validity at all,
/// and a few milliseconds would be spent by one round trip. Shorter TTLs are rejected with
/// [`Error::InvalidArgument`] instead of handing out leases that are born expired.
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// The longest lease TTL accepted: 365 days. A lease is meant to be auto-extended, not to
/// outlive its holder by years; longer values are rejected rather than overflowing the
/// millisecond arithmetic on either side.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The shortest queue entry lease accepted in fair mode
/// ([`LockOptions::with_queue_lease`]): 30 ms. A waiter refreshes its entry every third of
/// the lease, so a shorter one would spend most of the wait on refreshes.
pub const MIN_QUEUE_LEASE: Duration = Duration::from_millis(30);

/// The longest queue entry lease accepted in fair mode: 1 hour. The entry lease is how long a
/// crashed waiter can hold up the queue.
pub const MAX_QUEUE_LEASE: Duration = Duration::from_secs(60 * 60);

/// How one acquisition behaves: how long the lease lasts, how long to wait for it, and how
/// to space out the attempts.
///
/// Defaults: TTL 30 s, wait budget 10 s, [`Backoff::new`] (10 ms base, ×2, 500 ms cap,
/// full jitter). Setters are `const fn with_*` and getters are named after the setting, as
/// for [`Backoff`]; values are checked when a lock call uses them, and an unusable value
/// gives [`Error::InvalidArgument`] before anything is sent.
///
/// ```
/// use std::time::Duration;
/// use distlock::LockOptions;
///
/// let opts = LockOptions::new()
///     .with_ttl(Duration::from_secs(10))
///     .with_wait(Duration::from_secs(5));
/// assert_eq!(opts.ttl(), Duration::from_secs(10));
/// assert_eq!(opts.wait(), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LockOptions {
    ttl: Duration,
    wait: Duration,
    backoff: Backoff,
    auto_extend: Option<bool>,
    max_hold: Option<Duration>,
    fencing: bool,
    fair: bool,
    queue_lease: Duration,
    replicas: ReplicaChoice,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl LockOptions {
    /// The defaults: TTL 30 s, wait 10 s, default backoff.
    pub const fn new() -> Self {
        LockOptions {
            ttl: Duration::from_secs(30),
            wait: Duration::from_secs(10),
            backoff: Backoff::new(),
            auto_extend: None,
            max_hold: None,
            fencing: false,
            fair: false,
            queue_lease: Duration::from_secs(1),
            replicas: ReplicaChoice::Manager,
        }
    }

    /// How long a lease lasts unless extended or released: between [`MIN_TTL`] and
    /// [`MAX_TTL`], counted in whole milliseconds (sub-millisecond parts are dropped).
    pub const fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long [`lock`](crate::LockManager::lock) keeps trying while another owner holds
    /// the key, on the monotonic clock. Zero means one attempt.
    pub const fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// How to space out attempts while waiting.
    pub const fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Auto-extension: keep the lease alive while its guard lives. The manager's
    /// auto-extension task extends it about every `ttl / 3`, and
    /// [`LockGuard::lost`](crate::LockGuard::lost) resolves if an extension finds it gone
    /// or Redis stays unreachable until its deadline.
    ///
    /// Off by default for [`lock`](crate::LockManager::lock) and friends, on by default for
    /// [`with_lock`](crate::LockManager::with_lock); setting it here decides for both.
    pub const fn with_auto_extend(mut self, on: bool) -> Self {
        self.auto_extend = Some(on);
        self
    }

    /// Caps how long auto-extension keeps a lease alive, counted from the acquisition:
    /// auto-extension never extends the lease past it, after which the lease runs out and
    /// [`LockGuard::lost`](crate::LockGuard::lost) resolves with
    /// [`LostReason::MaxHoldReached`](crate::LostReason::MaxHoldReached). A cap shorter than
    /// the TTL shortens the first lease to the cap, so the lease never outlives it. Explicit
    /// [`extend`](crate::LockGuard::extend) calls are not capped. No cap by default; a cap
    /// below [`MIN_TTL`] is rejected with [`Error::InvalidArgument`].
    pub const fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Fencing tokens (off by default): each lease carries a token strictly greater than
    /// every earlier lease's on the lock ([`LockGuard::fencing_token`](crate::LockGuard::fencing_token)),
    /// for the protected resource to reject a stale holder. Turn it on wherever a holder
    /// that pauses past its lease could do harm; see the crate docs on
    /// [guarantees](crate#guarantees-and-their-limits).
    ///
    /// It has a price, measured in the README: a fenced acquire is a Lua script that also
    /// reads the server's clock and writes a counter beside the lease, about 2.5× the server
    /// time of the plain `SET NX PX` acquire. Off, the acquire is that one plain command and
    /// `fencing_token()` is `None`. Only a single primary gives tokens: over several
    /// primaries (Redlock) asking for them is [`Error::InvalidArgument`].
    pub const fn with_fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }

    /// Fair mode (off by default): waiters are served in arrival order across every manager
    /// and process, not only among the tasks of one manager. The waiter queue lives in
    /// Redis beside the lease (same hash tag); a caller that must wait joins it, a release
    /// wakes exactly the waiter at its head, and a newcomer cannot take a free lock while
    /// others queue for it ([`try_lock`](crate::LockManager::try_lock) then answers
    /// [`Error::Contended`]).
    ///
    /// Each waiter's place is a short lease ([`with_queue_lease`](Self::with_queue_lease),
    /// 1 s by default) that its retries refresh every third of it, so a waiter that crashed
    /// holds up the queue for at most that lease plus one refresh interval of the next
    /// waiter. A waiter that gives up (timeout, or its future dropped) leaves the queue in
    /// the background.
    ///
    /// It has a price, measured in the README: the acquire is a Lua script (server clock,
    /// the queue) instead of the plain `SET NX PX`, the release a script that also reads the
    /// queue, and waiters refresh their entries. Every caller of one lock must use the same
    /// mode: a caller without fair mode does not see the queue. Over several primaries
    /// (Redlock) the queue lives on the key's first node only: waiters are served in
    /// arrival order while it is up, and as without fair mode while it is down.
    pub const fn with_fair(mut self, on: bool) -> Self {
        self.fair = on;
        self
    }

    /// Replica-acknowledged leases (off by default, or as the manager says:
    /// [`LockManagerBuilder::with_replicas`](crate::LockManagerBuilder::with_replicas)): the
    /// acquire, every [`extend`](crate::LockGuard::extend) and every auto-extension is
    /// followed on the same primary, in the same round trip, by `WAIT count timeout`, and
    /// counts only if at least `count` replicas acknowledged it within `timeout`.
    ///
    /// - An acquire that fewer replicas acknowledged fails with [`Error::NotReplicated`]
    ///   (it says how many of how many) after its lease is deleted again
    ///   (compare-and-delete with its token); it is not retried by a waiting
    ///   [`lock`](crate::LockManager::lock).
    /// - An extend that fewer replicas acknowledged fails with [`Error::NotReplicated`] and
    ///   the lease stays held, but only until the earlier of its old deadline and the new
    ///   one: a promoted replica may still have the old expiry. An auto-extension that falls
    ///   short is retried (every tenth of the TTL); if none is acknowledged in time the lease
    ///   is lost with [`LostReason::NotReplicated`](crate::LostReason::NotReplicated).
    ///
    /// **What it buys**: a lease the replicas acknowledged survives a failover to one of
    /// them, which narrows the window in which a failover can hand the lock to a second
    /// owner. **What it does not**: it is not consensus. Sentinel may promote a replica that
    /// did not acknowledge (with more replicas than `count`), the acknowledged write is in
    /// the replica's memory, not on its disk, and a lease written to the old primary after
    /// it was cut off can still be lost. Use fencing tokens where that matters.
    /// **What it costs**: one replication round trip per acquire and extend (measured in
    /// the README), up to `timeout` when a replica lags, and a connection of its own while
    /// the acquire waits (see the builder).
    ///
    /// Checked when used: `count` ≥ 1, `timeout` between 1 ms and [`MAX_REPLICA_TIMEOUT`]
    /// and shorter than the TTL, else [`Error::InvalidArgument`]. Only a lock with one
    /// primary (`connect`, `build`, `build_pool`, `connect_sentinel`, `connect_cluster`)
    /// has replicas to wait for: elsewhere (Redlock, ZooKeeper, semaphores and read-write
    /// locks) asking for it is [`Error::InvalidArgument`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use distlock::LockOptions;
    ///
    /// let opts = LockOptions::new().with_replicas(1, Duration::from_millis(100));
    /// let asked = opts.replicas().map(|r| (r.count(), r.timeout()));
    /// assert_eq!(asked, Some((1, Duration::from_millis(100))));
    /// assert_eq!(opts.without_replicas().replicas(), None);
    /// ```
    pub const fn with_replicas(mut self, count: u32, timeout: Duration) -> Self {
        self.replicas = ReplicaChoice::On(Replicas::new(count, timeout));
        self
    }

    /// No replica acknowledgement for this call, whatever the manager's setting.
    pub const fn without_replicas(mut self) -> Self {
        self.replicas = ReplicaChoice::Off;
        self
    }

    /// The replica acknowledgement these options ask for; `None` when off or left to the
    /// manager (set with [`with_replicas`](Self::with_replicas)).
    pub const fn replicas(&self) -> Option<Replicas> {
        match self.replicas {
            ReplicaChoice::On(replicas) => Some(replicas),
            _ => None,
        }
    }

    /// The acknowledgement a call with these options asks for, given its manager's.
    pub(crate) fn replicas_or(&self, manager: Option<Replicas>) -> Option<Replicas> {
        match self.replicas {
            ReplicaChoice::Manager => manager,
            ReplicaChoice::Off => None,
            ReplicaChoice::On(replicas) => Some(replicas),
        }
    }

    /// Whether waiters queue in Redis in arrival order (set with
    /// [`with_fair`](Self::with_fair)).
    pub const fn fair(&self) -> bool {
        self.fair
    }

    /// Fair mode: how long a waiter's place in the queue lasts unless its retries refresh
    /// it (every third of it), between [`MIN_QUEUE_LEASE`] and [`MAX_QUEUE_LEASE`]; 1 s by
    /// default. It bounds how long a crashed waiter holds up the queue. Ignored unless
    /// [`with_fair`](Self::with_fair) is on.
    pub const fn with_queue_lease(mut self, lease: Duration) -> Self {
        self.queue_lease = lease;
        self
    }

    /// The queue entry lease of fair mode (set with
    /// [`with_queue_lease`](Self::with_queue_lease)).
    pub const fn queue_lease(&self) -> Duration {
        self.queue_lease
    }

    /// Whether leases carry fencing tokens (set with [`with_fencing`](Self::with_fencing)).
    pub const fn fencing(&self) -> bool {
        self.fencing
    }

    /// The lease TTL (set with [`with_ttl`](Self::with_ttl)).
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The wait budget (set with [`with_wait`](Self::with_wait)).
    pub const fn wait(&self) -> Duration {
        self.wait
    }

    /// The backoff policy (set with [`with_backoff`](Self::with_backoff)).
    pub const fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// Whether these options turn auto-extension on or off; `None` leaves it to the call
    /// (set with [`with_auto_extend`](Self::with_auto_extend)).
    pub const fn auto_extend(&self) -> Option<bool> {
        self.auto_extend
    }

    /// The hold-time cap, if any (set with [`with_max_hold`](Self::with_max_hold)).
    pub const fn max_hold(&self) -> Option<Duration> {
        self.max_hold
    }

    /// These options, checked, for a call whose auto-extension default is
    /// `auto_extend_default`: the one place options are validated.
    pub(crate) fn check(&self, auto_extend_default: bool) -> Result<Checked> {
        let mut ttl = Ttl::new(self.ttl)?;
        if Instant::now().checked_add(self.wait).is_none() {
            return Err(Error::invalid(
                "wait",
                format!(
                    "a wait budget of {:?} overflows the monotonic clock",
                    self.wait
                ),
            ));
        }
        self.backoff.validate()?;
        if let Some(hold) = self.max_hold {
            if hold < MIN_TTL {
                return Err(Error::invalid(
                    "max_hold",
                    format!("a hold-time cap must be at least {MIN_TTL:?}, got {hold:?}"),
                ));
            }
            // The lease never outlives the cap, whatever the TTL: a cap shorter than the
            // TTL is the TTL of the first lease.
            if hold < ttl.as_duration() {
                ttl = Ttl::new(hold)?;
            }
        }
        if self.fair && !(MIN_QUEUE_LEASE..=MAX_QUEUE_LEASE).contains(&self.queue_lease) {
            return Err(Error::invalid(
                "queue_lease",
                format!(
                    "a queue entry lease is between {MIN_QUEUE_LEASE:?} and \
                     {MAX_QUEUE_LEASE:?}, got {:?}",
                    self.queue_lease
                ),
            ));
        }
        let replicas = match self.replicas {
            ReplicaChoice::On(replicas) => Some(replicas.check(ttl.as_duration())?),
            _ => None,
        };
        Ok(Checked {
            replicas,
            ttl,
            wait: self.wait,
            backoff: self.backoff,
            auto_extend: self.auto_extend.unwrap_or(auto_extend_default),
            max_hold: self.max_hold,
            fencing: self.fencing,
            fair: self.fair.then_some(self.queue_lease),
        })
    }
}

/// What one call asks for, checked ([`LockOptions::check`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checked {
    /// The TTL of the first lease: the options' TTL, or the hold-time cap if shorter.
    pub(crate) ttl: Ttl,
    pub(crate) wait: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) auto_extend: bool,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) fencing: bool,
    /// Fair mode, with its queue entry lease.
    pub(crate) fair: Option<Duration>,
    /// Replica acknowledgement asked for by the options themselves (the manager resolves
    /// its own setting: [`LockOptions::replicas_or`]).
    pub(crate) replicas: Option<Replicas>,
}

/// A checked lease TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ttl {
    ms: u64,
}

impl Ttl {
    pub(crate) fn new(ttl: Duration) -> Result<Self> {
        if ttl < MIN_TTL {
            return Err(Error::invalid(
                "ttl",
                format!("a lease TTL must be at least {MIN_TTL:?}, got {ttl:?}"),
            ));
        }
        if ttl > MAX_TTL {
            return Err(Error::invalid(
                "ttl",
                format!("a lease TTL is at most {MAX_TTL:?}, got {ttl:?}"),
            ));
        }
        // Bounded by MAX_TTL above, so this fits easily.
        let ms = u64::try_from(ttl.as_millis())
            .map_err(|_| Error::invalid("ttl", "TTL overflows milliseconds"))?;
        Ok(Ttl { ms })
    }

    pub(crate) fn as_millis(self) -> u64 {
        self.ms
    }

    pub(crate) fn as_duration(self) -> Duration {
        Duration::from_millis(self.ms)
    }

    /// The clock-drift allowance subtracted from a lease's validity: `ttl/100 + 2 ms`.
    pub(crate) fn drift(self) -> Duration {
        Duration::from_millis(self.ms / 100 + 2)
    }

    /// How long a lease taken at `sent` (just before the command left) is known to be valid.
    pub(crate) fn valid_until(self, sent: Instant) -> Instant {
        let validity = self.as_duration().saturating_sub(self.drift());
        // `sent + validity` cannot overflow: validity <= MAX_TTL and `sent` is "now".
        sent.checked_add(validity).unwrap_or(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what(err: Error) -> &'static str {
        match err {
            Error::InvalidArgument(arg) => arg.what(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn ttl_below_one_millisecond_is_rejected() {
        for ttl in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_millis(2),
            MIN_TTL - Duration::from_micros(1),
        ] {
            assert_eq!(what(Ttl::new(ttl).unwrap_err()), "ttl");
        }
        let min = Ttl::new(MIN_TTL).unwrap();
        assert_eq!(min.as_millis(), 10);
        // The shortest accepted TTL still leaves validity after the drift allowance.
        let sent = Instant::now();
        assert!(min.valid_until(sent) > sent);
    }

    #[test]
    fn ttl_too_large_for_milliseconds_is_rejected() {
        for ttl in [
            MAX_TTL + Duration::from_millis(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            assert_eq!(what(Ttl::new(ttl).unwrap_err()), "ttl");
        }
        assert!(Ttl::new(MAX_TTL).is_ok());
    }

    #[test]
    fn wait_budget_that_overflows_the_clock_is_rejected() {
        let opts = LockOptions::new().with_wait(Duration::MAX);
        assert_eq!(what(opts.check(false).unwrap_err()), "wait");
    }

    #[test]
    fn validity_subtracts_the_drift_allowance() {
        let ttl = Ttl::new(Duration::from_secs(10)).unwrap();
        assert_eq!(ttl.drift(), Duration::from_millis(102));
        let sent = Instant::now();
        assert_eq!(ttl.valid_until(sent) - sent, Duration::from_millis(9_898));
        let min = Ttl::new(MIN_TTL).unwrap();
        assert_eq!(min.valid_until(sent) - sent, Duration::from_millis(8));
    }

    #[test]
    fn fair_mode_is_off_by_default_and_its_entry_lease_is_checked() {
        let opts = LockOptions::new();
        assert!(!opts.fair());
        assert_eq!(opts.check(false).unwrap().fair, None);
        let fair = opts.with_fair(true);
        assert_eq!(
            fair.check(false).unwrap().fair,
            Some(Duration::from_secs(1))
        );
        for bad in [
            Duration::ZERO,
            Duration::from_millis(29),
            Duration::from_secs(3601),
        ] {
            let opts = fair.with_queue_lease(bad);
            assert_eq!(what(opts.check(false).unwrap_err()), "queue_lease");
        }
        // Unused outside fair mode, so not checked there.
        assert!(opts.with_queue_lease(Duration::ZERO).check(false).is_ok());
    }

    #[test]
    fn sub_millisecond_parts_are_dropped() {
        let ttl = Ttl::new(Duration::from_micros(10_999)).unwrap();
        assert_eq!(ttl.as_millis(), 10);
    }
}
