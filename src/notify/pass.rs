//! Passing a lease from its holder to the next waiter of the same manager (a lock over
//! several primaries, not fair mode): the holder's side ([`pass_on`]) and the waiter's
//! (it offers its TTL, a holder claims it, and delivers the lease once the nodes passed it).
//!
//! When a guard ends (released or dropped) while another call of its manager waits for
//! the same lock, the release does not free the key for that waiter to take again: it
//! hands the lease over on every node at once ([`LeaseStore::pass`]), under a fresh token
//! and the waiter's TTL, and the waiter wakes holding it. One round trip to the nodes
//! instead of two (a release, then the waiter's acquire), and fewer commands for the
//! servers to run: no announcement, no `SET` by the waiter.
//!
//! - The waiter is the manager's longest-waiting one for the lock that takes passes (one
//!   that offered its TTL); the lock is never free in between, so no other contender can
//!   take it meanwhile.
//! - A lease is passed at most [`STREAK`] times in a row; then it is released as usual
//!   (announced), so waiters of other managers get their chance to take it. Within one
//!   manager the order stays first come, first served.
//! - The waiter's validity counts from before the pass was sent, as an acquire's does
//!   from before its `SET`.
//! - A passed lease nobody takes up (the waiter gave up, or its validity ran out before it
//!   woke) is released in the background when it is dropped; a pass that did not take is
//!   undone by the store, which releases the holder's lease instead.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use tokio::runtime::Handle;

use super::{Notifier, Slot, Waiter};
use crate::error::Result;
use crate::key::{LockKey, Token};
use crate::lease::Lease;
use crate::options::Ttl;
use crate::store::{LeaseStore, Passed, Verdict, release_in_background};

/// How many times in a row a lease may be passed within one manager before it is
/// released for everyone.
pub(crate) const STREAK: u32 = 4;

/// A lease passed to a waiter that has not taken it up yet. Dropped untaken, it is
/// released in the background.
pub(crate) struct PassedLease {
    store: Arc<dyn LeaseStore>,
    runtime: Option<Handle>,
    key: LockKey,
    /// `None` once taken up (or undone by the store).
    token: Option<Token>,
    ttl: Ttl,
    sent: Instant,
    replied: Instant,
    streak: u32,
}

/// A passed lease as its new holder takes it up.
pub(crate) struct TakenUp {
    pub(crate) token: Token,
    pub(crate) ttl: Ttl,
    /// When the pass was sent: validity counts from here.
    pub(crate) sent: Instant,
    pub(crate) replied: Instant,
    /// How many times in a row the lease has been passed, this time included.
    pub(crate) streak: u32,
}

impl PassedLease {
    /// The lease's terms for its new holder, or `None` (and the lease released in the
    /// background) if its validity has already run out at `now`.
    pub(crate) fn take_up(mut self, now: Instant) -> Option<TakenUp> {
        if now >= self.ttl.valid_until(self.sent) {
            return None;
        }
        Some(TakenUp {
            token: self.token.take()?,
            ttl: self.ttl,
            sent: self.sent,
            replied: self.replied,
            streak: self.streak,
        })
    }
}

impl Drop for PassedLease {
    fn drop(&mut self) {
        if let (Some(token), Some(runtime)) = (self.token.take(), &self.runtime) {
            tracing::debug!(key = %self.key, token = token.short(), "passed lease not taken up; releasing");
            release_in_background(
                runtime,
                Arc::clone(&self.store),
                self.key.clone(),
                token,
                self.ttl.as_duration(),
            );
        }
    }
}

/// Ends `lease`, which has been passed `streak` times in a row, by passing it to the next
/// waiter of the manager behind `notifier` (see the module docs). `None`: nobody to pass
/// it to (or the streak is spent): the caller releases it as usual. Otherwise the verdict
/// for `lease`: released (passed, or released instead), or lost and why; an error leaves
/// `lease` to the caller to release, as a failed release does.
pub(crate) async fn pass_on(
    notifier: &Weak<Notifier>,
    store: &Arc<dyn LeaseStore>,
    lease: &Lease,
    streak: u32,
) -> Option<Result<Verdict>> {
    if streak >= STREAK || lease.key.is_queued() || !store.passes() {
        return None;
    }
    let claim = notifier
        .upgrade()?
        .claim_next(lease.key.released_channel())?;
    let to = Token::generate();
    let sent = Instant::now();
    let mut passed = PassedLease {
        store: Arc::clone(store),
        runtime: Handle::try_current().ok(),
        key: lease.key.clone(),
        token: Some(to),
        ttl: claim.ttl,
        sent,
        replied: sent,
        streak: streak + 1,
    };
    // Cancelled from here on, `passed` releases `to` in the background and `claim` wakes
    // the waiter, which attempts on its own.
    match store.pass(&lease.key, &lease.token, &to, claim.ttl).await {
        Ok(Passed::Passed) => {
            passed.replied = Instant::now();
            tracing::debug!(
                to = to.short(),
                streak = streak + 1,
                "passed to the next waiter"
            );
            claim.deliver(passed);
            Some(Ok(Verdict::Done))
        }
        Ok(Passed::Released(verdict)) => {
            // The store took `to` back.
            passed.token = None;
            Some(Ok(verdict))
        }
        Err(e) => Some(Err(e)),
    }
}

/// A waiter's part in passing: what it offers, and what it was handed.
#[derive(Default)]
pub(super) struct Passing {
    /// The TTL this waiter asks for; `None`: it takes no passed lease.
    terms: Option<Ttl>,
    /// A lease passed to it, not yet taken up.
    passed: Option<PassedLease>,
}

fn passing(slot: &Slot) -> MutexGuard<'_, Passing> {
    // No code that can panic runs under this lock; recover from poison anyway.
    slot.passing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A waiter a holder is passing the lease to. Dropped, it wakes the waiter: with the lease
/// if it was [delivered](Self::deliver), otherwise to attempt on its own.
pub(crate) struct Claim {
    slot: Arc<Slot>,
    /// The TTL the waiter asked for.
    pub(crate) ttl: Ttl,
}

impl Claim {
    /// Hands `lease` to the waiter. A waiter that already has one (it cannot use two)
    /// drops this one, which releases it.
    pub(crate) fn deliver(self, lease: PassedLease) {
        let extra = {
            let mut passing = passing(&self.slot);
            match passing.passed {
                None => {
                    passing.passed = Some(lease);
                    None
                }
                Some(_) => Some(lease),
            }
        };
        drop(extra);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.slot.wake.notify_one();
    }
}

impl Notifier {
    /// Claims the longest-waiting waiter on `channel` if it takes passed leases: it counts
    /// as woken (a release announced meanwhile wakes nobody else) until the claim is
    /// dropped. No I/O.
    pub(crate) fn claim_next(&self, channel: &[u8]) -> Option<Claim> {
        let slot = self
            .inner
            .state()
            .queues
            .wake_first_if(channel, |slot| passing(slot).terms.is_some())?;
        let ttl = passing(&slot).terms?;
        Some(Claim { slot, ttl })
    }
}

impl Waiter {
    /// Takes passed leases of `ttl` from holders of this manager.
    pub(crate) fn offer(&self, ttl: Ttl) {
        passing(&self.slot).terms = Some(ttl);
    }

    /// A lease a holder passed to this waiter, if any.
    pub(crate) fn take_passed(&self) -> Option<PassedLease> {
        passing(&self.slot).passed.take()
    }
}

/// The lock a [`Slot`] keeps its passing state under.
pub(super) type PassingLock = Mutex<Passing>;
