//! The guard of a held lease: validity, extend, release, release on drop.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::auto_extend::AutoExtension;
use crate::error::{Error, LostReason, Result};

use crate::lease::{Lease, LeaseHandle, PendingExtend};
use crate::metrics::Meter;
use crate::notify::Notifier;
use crate::notify::pass_on;
use crate::options::Ttl;
use crate::store::{LeaseStore, Verdict, release_in_background, release_retrying};

/// A held lease on one lock. Created by [`LockManager::lock`](crate::LockManager::lock) and
/// friends.
///
/// While the guard lives and [`valid_until`](Self::valid_until) has not passed, no other
/// owner can hold the lock (as long as this process keeps to the lease; see the crate docs
/// on [fencing](crate#guarantees-and-their-limits)).
///
/// # Ending the lease
///
/// - [`release().await`](Self::release): deletes the key if it still holds this lease's
///   token and tells whether it did. Prefer it: it reports a lost lease.
/// - Dropping the guard: hands the same compare-and-delete to the tokio runtime the lease
///   was acquired on and returns at once. Drop never blocks and never panics. If that
///   runtime has shut down (or the background release fails), the lease simply expires
///   after its TTL.
/// - Doing nothing: the lease expires after its TTL.
#[must_use = "dropping the guard releases the lock at once"]
pub struct LockGuard {
    handle: LeaseHandle,
    store: Arc<dyn LeaseStore>,
    runtime: Option<Handle>,
    /// Present while the auto-extension task keeps this lease alive; dropping it stops auto-extension.
    extension: Option<AutoExtension>,
    /// `true` once the server answered a release: nothing is left to release.
    finished: bool,
    /// Metrics of this lease (a no-op without the `metrics` feature).
    meter: Meter,
    /// The notifications of the manager whose next waiter this lease may be passed to
    /// (see [`crate::notify::pass`]), if its store passes leases.
    passer: Option<Weak<Notifier>>,
    /// How many times in a row the lease had been passed when this guard took it up.
    streak: u32,
}

impl LockGuard {
    pub(crate) fn new(
        lease: Arc<Lease>,
        store: Arc<dyn LeaseStore>,
        runtime: Option<Handle>,
        extension: Option<AutoExtension>,
        meter: Meter,
    ) -> Self {
        LockGuard {
            handle: LeaseHandle { lease },
            store,
            runtime,
            extension,
            finished: false,
            meter,
            passer: None,
            streak: 0,
        }
    }

    /// Ends the lease by passing it to the next waiter of the manager behind `notifier`
    /// where it can (see [`crate::notify::pass`]).
    pub(crate) fn passing(mut self, notifier: Weak<Notifier>) -> Self {
        self.passer = Some(notifier);
        self
    }

    /// The lease was passed `streak` times in a row when this guard took it up.
    pub(crate) fn passed_times(mut self, streak: u32) -> Self {
        self.streak = streak;
        self
    }

    fn lease(&self) -> &Lease {
        &self.handle.lease
    }

    /// Fair mode: a lease the previous holder's release handed over is set for at most the
    /// waiter's entry lease. Extends it to `ttl` in the background; the deadline believed
    /// stays the handoff's until the server confirms (and, if it never answers, is never
    /// raised). A lease already released or lost is left alone.
    pub(crate) fn extend_in_background(&self, ttl: Ttl) {
        let Some(runtime) = &self.runtime else {
            return;
        };
        let (lease, store) = (Arc::clone(&self.handle.lease), Arc::clone(&self.store));
        let span = tracing::debug_span!(
            "distlock.take_up",
            key = %lease.key,
            token = lease.token.short(),
            ttl_ms = ttl.as_millis()
        );
        runtime.spawn(
            async move {
                match extend_lease(&lease, &*store, None, ttl).await {
                    Ok(Ok(())) => tracing::debug!("handed lease extended to its TTL"),
                    Ok(Err(reason)) => lease.mark_lost(reason),
                    Err(e) => tracing::debug!(error = %e, "could not extend a handed lease"),
                }
            }
            .instrument(span),
        );
    }

    /// A cloneable, read-only view of this lease (fencing token, deadline, [`lost`]) to
    /// hand to other tasks.
    ///
    /// [`lost`]: LeaseHandle::lost
    pub fn handle(&self) -> LeaseHandle {
        self.handle.clone()
    }

    /// The name of the lock, as given when it was acquired.
    pub fn key(&self) -> &[u8] {
        self.handle.key()
    }

    /// The fencing token of this lease; see [`LeaseHandle::fencing_token`].
    pub fn fencing_token(&self) -> Option<u64> {
        self.handle.fencing_token()
    }

    /// The instant until which the lease is known to be held; see
    /// [`LeaseHandle::valid_until`].
    pub fn valid_until(&self) -> Instant {
        self.handle.valid_until()
    }

    /// Time left until [`valid_until`](Self::valid_until); zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.handle.remaining()
    }

    /// Whether the lease is still held as far as this process knows, without any I/O;
    /// see [`LeaseHandle::is_held`].
    pub fn is_held(&self) -> bool {
        self.handle.is_held()
    }

    /// Whether the auto-extension task keeps this lease alive
    /// ([`LockOptions::with_auto_extend`](crate::LockOptions::with_auto_extend)).
    pub fn is_auto_extended(&self) -> bool {
        self.extension.is_some()
    }

    /// Resolves with the reason once the lease is gone; see [`LeaseHandle::lost`].
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// use distlock::LockOptions;
    /// let guard = locks.lock_with("index:rebuild", LockOptions::new().with_auto_extend(true)).await?;
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("stopped: lease lost ({reason})"),
    ///     _ = async { /* long work */ } => guard.release().await?,
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Dropping the future has no effect on the lease.
    pub fn lost(&self) -> impl Future<Output = LostReason> + Send + 'static {
        self.handle.lost()
    }

    /// Resets the lease's TTL to `ttl`, if the lease is still ours.
    ///
    /// On success [`valid_until`](Self::valid_until) moves to "now + `ttl` − drift" — unless
    /// another extend or auto-extension of this lease is in flight or its outcome is unknown: the
    /// server may run those after this one, so the deadline stays the earliest any of them
    /// could leave. A shorter `ttl` takes effect on the local deadline as soon as the call
    /// starts, and an auto-extended lease is auto-extended with the new `ttl` from then on.
    /// An extend whose reply arrives after the lease's validity ended is
    /// [`Error::Lost`] ([`LostReason::Expired`]): the lease was not guaranteed in between.
    /// Returns [`Error::Lost`] when the key expired ([`LostReason::Expired`]) or holds
    /// another owner's token ([`LostReason::Taken`]); from then on the guard is lost and
    /// [`is_held`](Self::is_held) is `false`.
    ///
    /// On a lock over several primaries (Redlock) the extend succeeds only if a majority of
    /// all the nodes confirmed it; otherwise the lease is lost ([`LostReason::NoQuorum`],
    /// or `Expired` / `Taken` when the nodes that answered say so). A failed extend releases
    /// nothing: the keys left on some nodes go with [`release`](Self::release) or drop.
    ///
    /// A lease taken with [`LockOptions::with_replicas`](crate::LockOptions::with_replicas)
    /// is extended with `WAIT` in the same round trip: if fewer replicas acknowledged the
    /// extension, it returns [`Error::NotReplicated`] and the lease stays held, but
    /// [`valid_until`](Self::valid_until) stays at the earlier of the old deadline and the
    /// new one (a promoted replica may still have the old expiry); a later acknowledged
    /// extend moves it on.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the lease as it was or extended on
    /// the server; the local [`valid_until`](Self::valid_until) keeps the earlier of the old
    /// deadline and what the dropped extend would leave, for the rest of the lease (it may
    /// still run on the server later), which is always safe. Over several primaries it may also have set the
    /// lease again on nodes that had lost it; the guard's release or drop removes it there
    /// like everywhere else.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`], [`Error::Redis`] (the outcome is unknown; the local deadline is
    /// unchanged), [`Error::NotReplicated`] (see above), [`Error::InvalidArgument`] for a TTL outside
    /// [`MIN_TTL`](crate::MIN_TTL)..=[`MAX_TTL`](crate::MAX_TTL).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// use std::time::Duration;
    /// let guard = locks.lock("reports:weekly").await?;
    /// guard.extend(Duration::from_secs(60)).await?;
    /// assert!(guard.remaining() > Duration::from_secs(50));
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        let ttl = Ttl::new(ttl)?;
        // A lease that is a session lasts the session's TTL, whatever was asked.
        let ttl = self.store.session_ttl().unwrap_or(ttl);
        let lease = self.lease();
        let span = tracing::debug_span!(
            "distlock.extend",
            key = %lease.key,
            token = lease.token.short(),
            ttl_ms = ttl.as_millis()
        );
        async {
            match extend_lease(lease, &*self.store, self.extension.as_ref(), ttl).await? {
                Ok(()) => {
                    tracing::debug!("extended");
                    Ok(())
                }
                Err(reason) => Err(self.lose(reason)),
            }
        }
        .instrument(span)
        .await
    }

    /// Ends the lease: deletes the key if it still holds this lease's token.
    ///
    /// Returns `Ok(())` only if the lease was still ours and is now released. Otherwise
    /// [`Error::Lost`] says why not (it had expired, or another owner holds the key, which
    /// is left untouched), and [`Error::Redis`] says the outcome is unknown: then one more
    /// release is handed to the background, and at worst the lease expires after its TTL.
    ///
    /// On a lock over several primaries (Redlock) the release is sent to every node.
    /// `Ok(())` means a majority confirmed the delete, so the lock is free for others; a
    /// node that failed meanwhile keeps its key until the TTL (logged as a warning).
    /// [`Error::Quorum`] says how many confirmed when fewer than a majority did, and hands
    /// one more release to the background as for [`Error::Redis`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes drops the guard, which hands the release to
    /// the background exactly as [`Drop`] does: the lease is released either way.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// let guard = locks.lock("invoices:42").await?;
    /// // ... the critical section ...
    /// match guard.release().await {
    ///     Ok(()) => println!("released"),
    ///     Err(e) if e.is_lost() => eprintln!("the lease ended before the work did: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn release(mut self) -> Result<()> {
        // Stop auto-extension first: an auto-extension still in flight can only find the key gone after
        // this release (compare-and-`PEXPIRE` never re-creates a key).
        self.extension = None;
        let lease = Arc::clone(&self.handle.lease);
        let span = tracing::debug_span!(
            "distlock.release",
            key = %lease.key,
            token = lease.token.short()
        );
        async {
            let passed = match &self.passer {
                Some(notifier) => pass_on(notifier, &self.store, &lease, self.streak).await,
                None => None,
            };
            let verdict = match passed {
                Some(outcome) => outcome,
                None => self.store.release(&lease.key, &lease.token).await,
            }
            // On a Redis error `finished` stays false: Drop tries once more.
            .inspect_err(|e| tracing::warn!(error = %e, "release failed"))?;
            self.finished = true;
            self.judge(verdict, || {
                lease.mark_lost(LostReason::Released);
                self.meter.released();
                tracing::debug!("released");
            })
        }
        .instrument(span)
        .await
    }

    /// `Ok` after `done` when the command took effect; otherwise the lease is lost, and why.
    fn judge(&self, verdict: Verdict, done: impl FnOnce()) -> Result<()> {
        match verdict {
            Verdict::Done => {
                done();
                Ok(())
            }
            Verdict::Lost(reason) => Err(self.lose(reason)),
        }
    }

    fn lose(&self, reason: LostReason) -> Error {
        let lease = self.lease();
        lease.mark_lost(reason);
        self.meter.lost(reason);
        tracing::warn!(key = %lease.key, %reason, "lease lost");
        Error::Lost {
            key: lease.key.display(),
            reason,
        }
    }
}

/// One extend of `lease` to `ttl` on `store`, as a caller's extend: counted before it is
/// sent (from then on the server may run it, in whatever order with other extends and
/// auto-extensions, so the deadline believed drops to what it would leave at once), with
/// `extension` (if any) planning again from the new TTL and deadline.
///
/// `Ok(Ok(()))`: extended. `Ok(Err(reason))`: the lease is lost — found lost before (a
/// loss is final: a lease reported gone is never revived), found gone or taken now, or the
/// reply came back after its validity ended. `Err`: the outcome is unknown and keeps
/// counting. A replica-acknowledged lease that too few replicas acknowledged is
/// `Error::NotReplicated`, an unknown outcome too: the deadline stays the earlier of the
/// old one and the new one.
async fn extend_lease(
    lease: &Lease,
    store: &dyn LeaseStore,
    extension: Option<&AutoExtension>,
    ttl: Ttl,
) -> Result<std::result::Result<(), LostReason>> {
    let sent = Instant::now();
    let Some(op) = lease.begin_extend(ttl, sent, true) else {
        return Ok(Err(lease.lost().unwrap_or(LostReason::Expired)));
    };
    if let Some(extension) = extension {
        extension.reschedule();
    }
    let pending = PendingExtend::new(lease, op);
    // On error `pending` is dropped: the outcome is unknown and keeps counting.
    let verdict = match lease.replicas {
        Some(replicas) => {
            store
                .extend_replicated(&lease.key, &lease.token, ttl, replicas)
                .await?
        }
        None => store.extend(&lease.key, &lease.token, ttl).await?,
    };
    if let Verdict::Lost(reason) = verdict {
        pending.refused();
        return Ok(Err(reason));
    }
    if pending.confirm() {
        Ok(Ok(()))
    } else {
        Ok(Err(lease.lost().unwrap_or(LostReason::Expired)))
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.extension = None;
        if self.finished {
            return;
        }
        let lease = Arc::clone(&self.handle.lease);
        // Counted as lost if it was found lost (or ran out) before the drop; read without
        // recording anything, so the lease's state is the same with metrics on or off.
        self.meter.end(|| {
            let state = lease.state();
            let ran_out = Instant::now() >= state.valid_until;
            state.lost.or(ran_out.then(|| state.deadline_reason()))
        });
        // Whatever happens next, this holder has given the lease up.
        lease.mark_lost(LostReason::Released);
        // Released even when the lease was found lost or taken: the compare-and-delete
        // spares any other owner, and on several primaries a minority of nodes may still
        // hold this lease's key.
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let ttl = lease.state().ttl.as_duration();
        let store = Arc::clone(&self.store);
        match self.passer.take() {
            Some(notifier) => {
                let streak = self.streak;
                let span = tracing::debug_span!("distlock.background_release", key = %lease.key, token = lease.token.short());
                runtime.spawn(
                    async move {
                        match pass_on(&notifier, &store, &lease, streak).await {
                            Some(Ok(_)) => tracing::debug!("released in the background"),
                            _ => release_retrying(store, lease.key.clone(), lease.token, ttl).await,
                        }
                    }
                    .instrument(span),
                );
            }
            None => release_in_background(&runtime, store, lease.key.clone(), lease.token, ttl),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("lease", &self.handle)
            .field("auto_extended", &self.extension.is_some())
            .finish()
    }
}
