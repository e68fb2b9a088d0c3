//! The state of one held lease, shared by its guard, its handles and the auto-extension task.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

mod belief;

use crate::error::LostReason;
use crate::key::{LockKey, Token};
use crate::options::{Replicas, Ttl};

pub(crate) use belief::{LeaseState, OpId};

/// One lease as the guard, its handles and background work see it.
pub(crate) struct Lease {
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) fence: Option<u64>,
    /// Replica acknowledgement every extension of this lease waits for, if any.
    pub(crate) replicas: Option<Replicas>,
    state: Mutex<LeaseState>,
    /// Wakes `wait_lost` futures on every change of `state`.
    changed: Notify,
}

impl Lease {
    /// A lease taken by a command sent at `sent` with `ttl`, confirmed at `replied`.
    pub(crate) fn new(
        key: LockKey,
        token: Token,
        fence: Option<u64>,
        ttl: Ttl,
        sent: Instant,
        replied: Instant,
    ) -> Self {
        Lease {
            key,
            token,
            fence,
            replicas: None,
            state: Mutex::new(LeaseState::new(ttl, sent, replied)),
            changed: Notify::new(),
        }
    }

    /// This lease's extensions wait for `replicas` (see
    /// [`LockOptions::with_replicas`](crate::options::LockOptions::with_replicas)).
    pub(crate) fn with_replicas(mut self, replicas: Option<Replicas>) -> Self {
        self.replicas = replicas;
        self
    }

    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the current state.
    pub(crate) fn state(&self) -> LeaseState {
        self.lock().clone()
    }

    /// The deadline alone, without copying the state.
    pub(crate) fn deadline(&self) -> Instant {
        self.lock().valid_until
    }

    /// When the auto-extension task should next extend this lease.
    pub(crate) fn extend_due(&self) -> Instant {
        self.lock().extend_due()
    }

    /// Applies `change`; if it reports a change, wakes everyone waiting for one.
    fn send_if_modified<T>(&self, change: impl FnOnce(&mut LeaseState) -> (bool, T)) -> T {
        let (changed, out) = change(&mut self.lock());
        if changed {
            self.changed.notify_waiters();
        }
        out
    }

    /// The loss, if any: recorded, or implied by a passed deadline. A loss seen once is
    /// recorded, so the answer never flips back to "held".
    pub(crate) fn lost(&self) -> Option<LostReason> {
        let (lost, valid_until, reason) = {
            let state = self.lock();
            (state.lost, state.valid_until, state.deadline_reason())
        };
        if lost.is_some() {
            return lost;
        }
        if Instant::now() < valid_until {
            return None;
        }
        self.mark_lost(reason);
        self.lock().lost
    }

    /// Records that the lease is gone. The first reason sticks.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.send_if_modified(|state| {
            if state.lost.is_some() {
                return (false, ());
            }
            state.lost = Some(reason);
            (true, ())
        });
    }

    /// Records that a command setting the lease's TTL to `ttl` is about to be sent (now,
    /// at `sent`). From here until the command is confirmed, the lease is believed to last
    /// no longer than that command would leave it. `user` marks an explicit extend: its TTL
    /// becomes the one auto-extensions reuse.
    ///
    /// Returns `None` when the lease is already lost (nothing should be sent).
    pub(crate) fn begin_extend(&self, ttl: Ttl, sent: Instant, user: bool) -> Option<OpId> {
        if self.lost().is_some() {
            return None;
        }
        self.send_if_modified(|state| {
            if state.lost.is_some() {
                return (false, None);
            }
            if user {
                state.ttl = ttl;
            }
            let op = state.begin(ttl, sent);
            (true, Some(op))
        })
    }

    /// Records that the command `op` took effect; its reply arrived now. Returns `false`
    /// when the lease is lost after all: lost before, or its deadline passed before this
    /// reply (the lease was not guaranteed in between, and a loss is never taken back).
    pub(crate) fn confirm_extend(&self, op: OpId) -> bool {
        let now = Instant::now();
        self.send_if_modified(|state| {
            if state.lost.is_some() {
                return (false, false);
            }
            if now >= state.valid_until {
                state.lost = Some(state.deadline_reason());
                return (true, false);
            }
            state.confirm(op, now);
            if now >= state.valid_until {
                // Confirmed, but what it leaves is already over (a reply slower than the
                // TTL): as good as expired.
                state.lost = Some(LostReason::Expired);
                return (true, false);
            }
            (true, true)
        })
    }

    /// Records that the outcome of command `op` is unknown (failed, timed out or
    /// cancelled): it may still run on the server at any time.
    pub(crate) fn abandon_extend(&self, op: OpId) {
        self.send_if_modified(|state| {
            state.abandon(op);
            (true, ())
        });
    }

    /// Records whether the auto-extension task keeps this lease alive.
    pub(crate) fn set_auto_extended(&self, auto_extended: bool) {
        self.send_if_modified(|state| {
            let changed = state.auto_extended != auto_extended;
            state.auto_extended = auto_extended;
            (changed, ())
        });
    }

    /// Records whether the last auto-extension reached the primary but too few replicas
    /// acknowledged it: the reason given if the deadline passes before one is.
    pub(crate) fn set_short_of_replicas(&self, short: bool) {
        self.send_if_modified(|state| {
            let changed = state.short_of_replicas != short;
            state.short_of_replicas = short;
            (changed, ())
        });
    }

    /// Records that auto-extension stopped at the hold-time cap.
    pub(crate) fn hold_capped(&self) {
        self.send_if_modified(|state| {
            let changed = !state.hold_capped;
            state.hold_capped = true;
            (changed, ())
        });
    }

    /// Resolves with the reason once the lease is gone: a recorded loss, or the validity
    /// deadline passing without an extension.
    pub(crate) async fn wait_lost(&self) -> LostReason {
        loop {
            // Registered before reading the state, so a change in between is not missed.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let (lost, valid_until, reason) = {
                let state = self.lock();
                (state.lost, state.valid_until, state.deadline_reason())
            };
            if let Some(reason) = lost {
                return reason;
            }
            if Instant::now() >= valid_until {
                self.mark_lost(reason);
                continue; // read back whichever reason won
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(valid_until.into()) => {}
            }
        }
    }
}

/// Marks an extend's outcome unknown unless it was settled: an extend future dropped
/// mid-flight, or one that failed, may still run on the server.
pub(crate) struct PendingExtend<'a> {
    lease: &'a Lease,
    op: Option<OpId>,
}

impl<'a> PendingExtend<'a> {
    pub(crate) fn new(lease: &'a Lease, op: OpId) -> Self {
        PendingExtend {
            lease,
            op: Some(op),
        }
    }

    /// The server confirmed the extend; see [`Lease::confirm_extend`].
    pub(crate) fn confirm(mut self) -> bool {
        match self.op.take() {
            Some(op) => self.lease.confirm_extend(op),
            None => false,
        }
    }

    /// The server answered that the extend did not take effect (key gone or another
    /// owner's): it changed nothing, so it no longer counts.
    pub(crate) fn refused(mut self) {
        if let Some(op) = self.op.take() {
            self.lease.send_if_modified(|state| {
                state.forget(op);
                (false, ())
            });
        }
    }
}

impl Drop for PendingExtend<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.lease.abandon_extend(op);
        }
    }
}

/// A read-only view of a held lease that can be cloned and moved into other tasks: its
/// fencing token, its deadline, and a future that resolves when it is lost.
///
/// Get one from [`LockGuard::handle`](crate::LockGuard::handle), or as the argument of the
/// closure passed to [`LockManager::with_lock`](crate::LockManager::with_lock). A handle does
/// not keep the lease alive and cannot release it; only the guard can.
#[derive(Clone)]
pub struct LeaseHandle {
    pub(crate) lease: Arc<Lease>,
}

impl LeaseHandle {
    /// The name of the lock, as given when it was acquired.
    pub fn key(&self) -> &[u8] {
        self.lease.key.name()
    }

    /// The fencing token of this lease: strictly greater than the token of every earlier
    /// lease on the same lock. Hand it to the protected resource with every write, and have
    /// the resource reject writes that carry a token lower than the highest it has seen.
    ///
    /// `Some` for a lease taken with [`LockOptions::with_fencing`](crate::LockOptions::with_fencing)
    /// on a single Redis primary. `None` without fencing (the default: the acquire is then
    /// a plain `SET NX PX`), and where no token with that guarantee exists (leases spread
    /// over several independent primaries).
    pub fn fencing_token(&self) -> Option<u64> {
        self.lease.fence
    }

    /// The instant, on the monotonic clock, until which the lease is known to be held.
    ///
    /// Measured from just before the acquire (or the last successful extend or auto-extension)
    /// was sent, minus a clock-drift allowance of `ttl/100 + 2 ms`. Past it, the server may
    /// already have expired the key and handed it to someone else.
    pub fn valid_until(&self) -> Instant {
        self.lease.deadline()
    }

    /// Time left until [`valid_until`](Self::valid_until); zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is still held as far as this process knows, answered from local
    /// state without any I/O: not past [`valid_until`](Self::valid_until) and not found
    /// lost by an extend or an auto-extension.
    pub fn is_held(&self) -> bool {
        self.lease.lost().is_none()
    }

    /// Why the lease is gone, if it is, as far as this process knows (no I/O).
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lease.lost()
    }

    /// Resolves with the reason once the lease is gone:
    ///
    /// - [`LostReason::Taken`]: an extend or auto-extension found another owner's token;
    /// - [`LostReason::Expired`]: the key was gone, or the validity deadline passed without
    ///   an extension (without auto-extension that is simply the end of the TTL);
    /// - [`LostReason::Unreachable`]: auto-extensions failed to reach Redis until the deadline;
    /// - [`LostReason::MaxHoldReached`]: auto-extension stopped at the hold-time cap;
    /// - [`LostReason::Released`]: the guard released it.
    ///
    /// It resolves no later than the validity deadline, and the future owns what it needs
    /// (`'static`), so it can be moved into another task.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future has no effect on the lease.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        let lease = Arc::clone(&self.lease);
        async move { lease.wait_lost().await }
    }
}

impl fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lease.state();
        f.debug_struct("LeaseHandle")
            .field("key", &self.lease.key)
            .field("token", &self.lease.token)
            .field("fencing_token", &self.lease.fence)
            .field("remaining", &self.remaining())
            .field("lost", &state.lost)
            .finish()
    }
}
