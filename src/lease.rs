//! The state of one held lease, shared by its guard, its handles and the renewal task.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::LostReason;
use crate::key::{LockKey, Token};
use crate::options::Ttl;

/// One lease as the guard, its handles and background work see it.
pub(crate) struct Lease {
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) fence: Option<u64>,
    state: Mutex<LeaseState>,
    /// Wakes `wait_lost` futures on every change of `state`.
    changed: Notify,
}

/// What is known locally about a lease. Every change is broadcast, so `lost()` futures
/// wake up on it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseState {
    /// When the lease is known to end at the latest, on the monotonic clock.
    pub(crate) valid_until: Instant,
    /// Send time of the command that set `valid_until`; an older answer never overrides
    /// a newer one when several extends race.
    pub(crate) set_at: Instant,
    /// The TTL the lease was last given; renewals reuse it.
    pub(crate) ttl: Ttl,
    /// Once set, the lease is gone for good.
    pub(crate) lost: Option<LostReason>,
    /// The renewal task keeps this lease alive: if its deadline passes, renewals did not
    /// get through in time.
    pub(crate) renewed: bool,
    /// Renewal stopped because the hold-time cap was reached.
    pub(crate) hold_capped: bool,
}

impl Lease {
    pub(crate) fn new(
        key: LockKey,
        token: Token,
        fence: Option<u64>,
        ttl: Ttl,
        sent: Instant,
    ) -> Self {
        Lease {
            key,
            token,
            fence,
            state: Mutex::new(LeaseState {
                valid_until: ttl.valid_until(sent),
                set_at: sent,
                ttl,
                lost: None,
                renewed: false,
                hold_capped: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LeaseState> {
        // No code that can panic runs under this lock; recover from poison anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the current state.
    pub(crate) fn state(&self) -> LeaseState {
        *self.lock()
    }

    /// Applies `change`; if it reports a change, wakes everyone waiting for one.
    fn send_if_modified(&self, change: impl FnOnce(&mut LeaseState) -> bool) {
        let changed = change(&mut self.lock());
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// The loss, if any: recorded, or implied by a passed deadline. A loss seen once is
    /// recorded, so the answer never flips back to "held".
    pub(crate) fn lost(&self) -> Option<LostReason> {
        let state = self.state();
        if state.lost.is_some() {
            return state.lost;
        }
        if Instant::now() < state.valid_until {
            return None;
        }
        self.mark_lost(state.deadline_reason());
        self.state().lost
    }

    /// Records that the lease is gone. The first reason sticks.
    pub(crate) fn mark_lost(&self, reason: LostReason) {
        self.send_if_modified(|state| {
            if state.lost.is_some() {
                return false;
            }
            state.lost = Some(reason);
            true
        });
    }

    /// Records a successful extend sent at `sent` with `ttl`. A success never brings back
    /// a lease already lost, nor one whose deadline had passed when the extend was sent
    /// (the lease was not guaranteed in between): that lease is lost instead.
    pub(crate) fn extended(&self, ttl: Ttl, sent: Instant) {
        self.send_if_modified(|state| {
            if state.lost.is_some() || sent < state.set_at {
                return false;
            }
            if sent >= state.valid_until {
                state.lost = Some(state.deadline_reason());
                return true;
            }
            state.set_at = sent;
            state.ttl = ttl;
            state.valid_until = ttl.valid_until(sent);
            true
        });
    }

    /// Records whether the renewal task keeps this lease alive.
    pub(crate) fn set_renewed(&self, renewed: bool) {
        self.send_if_modified(|state| {
            let changed = state.renewed != renewed;
            state.renewed = renewed;
            changed
        });
    }

    /// Records that renewal stopped at the hold-time cap.
    pub(crate) fn hold_capped(&self) {
        self.send_if_modified(|state| {
            let changed = !state.hold_capped;
            state.hold_capped = true;
            changed
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
            let state = self.state();
            if let Some(reason) = state.lost {
                return reason;
            }
            if Instant::now() >= state.valid_until {
                self.mark_lost(state.deadline_reason());
                continue; // read back whichever reason won
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(state.valid_until.into()) => {}
            }
        }
    }
}

impl LeaseState {
    /// Why a lease whose deadline passed without an extension is gone.
    fn deadline_reason(&self) -> LostReason {
        if self.hold_capped {
            LostReason::MaxHoldReached
        } else if self.renewed {
            // No renewal got through before the deadline: failed, or stuck in flight.
            LostReason::Unreachable
        } else {
            LostReason::Expired
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
    /// `Some` for every lease on a single Redis primary. `None` where no token with that
    /// guarantee exists (leases spread over several independent primaries).
    pub fn fencing_token(&self) -> Option<u64> {
        self.lease.fence
    }

    /// The instant, on the monotonic clock, until which the lease is known to be held.
    ///
    /// Measured from just before the acquire (or the last successful extend or renewal)
    /// was sent, minus a clock-drift allowance of `ttl/100 + 2 ms`. Past it, the server may
    /// already have expired the key and handed it to someone else.
    pub fn valid_until(&self) -> Instant {
        self.lease.state().valid_until
    }

    /// Time left until [`valid_until`](Self::valid_until); zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is still held as far as this process knows, answered from local
    /// state without any I/O: not past [`valid_until`](Self::valid_until) and not found
    /// lost by an extend or a renewal.
    pub fn is_held(&self) -> bool {
        self.lease.lost().is_none()
    }

    /// Why the lease is gone, if it is, as far as this process knows (no I/O).
    pub fn lost_reason(&self) -> Option<LostReason> {
        self.lease.lost()
    }

    /// Resolves with the reason once the lease is gone:
    ///
    /// - [`LostReason::Taken`]: an extend or renewal found another owner's token;
    /// - [`LostReason::Expired`]: the key was gone, or the validity deadline passed without
    ///   an extension (without auto-extension that is simply the end of the TTL);
    /// - [`LostReason::Unreachable`]: renewals failed to reach Redis until the deadline;
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
