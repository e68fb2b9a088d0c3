//! The guard of a held lease: validity, extend, release, release on drop.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::error::{Error, LostReason, Result};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::store::{LeaseStore, Verdict};

/// One lease as both the guard and background work see it.
pub(crate) struct Lease {
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) fence: Option<u64>,
    state: Mutex<LeaseState>,
}

struct LeaseState {
    /// When the lease is known to end at the latest, on the monotonic clock.
    valid_until: Instant,
    /// Send time of the command that set `valid_until`; an older answer never overrides
    /// a newer one when several extends race.
    set_at: Instant,
    /// Once set, the lease is known to be gone.
    lost: Option<LostReason>,
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
                lost: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, LeaseState> {
        // The lock is never held across code that can panic; recover from poison anyway.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.state().valid_until
    }

    pub(crate) fn lost(&self) -> Option<LostReason> {
        self.state().lost
    }

    pub(crate) fn mark_lost(&self, reason: LostReason) {
        let mut state = self.state();
        if state.lost.is_none() {
            state.lost = Some(reason);
        }
    }

    pub(crate) fn extended(&self, ttl: Ttl, sent: Instant) {
        let mut state = self.state();
        if sent >= state.set_at {
            state.set_at = sent;
            state.valid_until = ttl.valid_until(sent);
        }
    }
}

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
    lease: Arc<Lease>,
    store: Arc<dyn LeaseStore>,
    runtime: Option<Handle>,
    /// `true` once the server confirmed the lease is no longer ours to release.
    finished: bool,
}

impl LockGuard {
    pub(crate) fn new(lease: Lease, store: Arc<dyn LeaseStore>, runtime: Option<Handle>) -> Self {
        LockGuard {
            lease: Arc::new(lease),
            store,
            runtime,
            finished: false,
        }
    }

    /// The name of the lock, as given when it was acquired.
    pub fn key(&self) -> &[u8] {
        self.lease.key.name()
    }

    /// The fencing token of this lease: strictly greater than the token of every earlier
    /// lease on the same lock (see the crate docs on fencing). Hand it to the protected
    /// resource with every write, and have the resource reject writes that carry a token
    /// lower than the highest it has seen.
    ///
    /// `Some` for every lease on a single Redis primary. `None` where no token with that
    /// guarantee exists (leases spread over several independent primaries).
    pub fn fencing_token(&self) -> Option<u64> {
        self.lease.fence
    }

    /// The instant, on the monotonic clock, until which the lease is known to be held.
    ///
    /// Measured from just before the acquire (or the last successful extend) was sent,
    /// minus a clock-drift allowance of `ttl/100 + 2 ms`. Past it, the server may already
    /// have expired the key and handed it to someone else.
    pub fn valid_until(&self) -> Instant {
        self.lease.valid_until()
    }

    /// Time left until [`valid_until`](Self::valid_until); zero once it passed.
    pub fn remaining(&self) -> Duration {
        self.valid_until().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is still held as far as this process knows, without any I/O:
    /// not yet past [`valid_until`](Self::valid_until) and not found lost by an
    /// [`extend`](Self::extend).
    pub fn is_held(&self) -> bool {
        self.lease.lost().is_none() && Instant::now() < self.valid_until()
    }

    /// Resets the lease's TTL to `ttl`, if the lease is still ours.
    ///
    /// On success [`valid_until`](Self::valid_until) moves to "now + `ttl` − drift".
    /// Returns [`Error::Lost`] when the key expired ([`LostReason::Expired`]) or holds
    /// another owner's token ([`LostReason::Taken`]); from then on the guard is lost and
    /// [`is_held`](Self::is_held) is `false`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes leaves the lease as it was or extended on
    /// the server; the local [`valid_until`](Self::valid_until) keeps the older, earlier
    /// deadline, which is always safe.
    ///
    /// # Errors
    ///
    /// [`Error::Lost`], [`Error::Redis`] (the outcome is unknown; the local deadline is
    /// unchanged), [`Error::InvalidArgument`] for a TTL outside
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
        let lease = &self.lease;
        if let Some(reason) = lease.lost() {
            return Err(self.lost_error(reason));
        }
        let span = tracing::debug_span!(
            "distlock.extend",
            key = lease.key.display(),
            token = lease.token.short(),
            ttl_ms = ttl.as_millis()
        );
        async {
            let sent = Instant::now();
            match self.store.extend(&lease.key, &lease.token, ttl).await? {
                Verdict::Done => {
                    lease.extended(ttl, sent);
                    tracing::debug!("extended");
                    Ok(())
                }
                Verdict::Expired => Err(self.lose(LostReason::Expired)),
                Verdict::Taken => Err(self.lose(LostReason::Taken)),
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
        let span = tracing::debug_span!(
            "distlock.release",
            key = self.lease.key.display(),
            token = self.lease.token.short()
        );
        async {
            let verdict = self
                .store
                .release(&self.lease.key, &self.lease.token)
                .await
                // On a Redis error `finished` stays false: Drop tries once more.
                .inspect_err(|e| tracing::warn!(error = %e, "release failed"))?;
            self.finished = true;
            match verdict {
                Verdict::Done => {
                    tracing::debug!("released");
                    Ok(())
                }
                Verdict::Expired => Err(self.lose(LostReason::Expired)),
                Verdict::Taken => Err(self.lose(LostReason::Taken)),
            }
        }
        .instrument(span)
        .await
    }

    fn lose(&self, reason: LostReason) -> Error {
        self.lease.mark_lost(reason);
        tracing::warn!(key = self.lease.key.display(), %reason, "lease lost");
        self.lost_error(reason)
    }

    fn lost_error(&self, reason: LostReason) -> Error {
        Error::Lost {
            key: self.lease.key.display().to_owned(),
            reason,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.finished || self.lease.lost().is_some() {
            return;
        }
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let lease = Arc::clone(&self.lease);
        let store = Arc::clone(&self.store);
        let span = tracing::debug_span!(
            "distlock.drop_release",
            key = lease.key.display(),
            token = lease.token.short()
        );
        // `Handle::spawn` neither blocks nor panics; on a runtime that has shut down the
        // task is dropped unrun and the TTL ends the lease.
        runtime.spawn(
            async move {
                match store.release(&lease.key, &lease.token).await {
                    Ok(Verdict::Done) => tracing::debug!("released after drop"),
                    Ok(other) => tracing::debug!(?other, "nothing to release after drop"),
                    Err(e) => tracing::warn!(error = %e, "release after drop failed; the TTL will end the lease"),
                }
            }
            .instrument(span),
        );
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.lease.key)
            .field("token", &self.lease.token)
            .field("fencing_token", &self.lease.fence)
            .field("remaining", &self.remaining())
            .field("lost", &self.lease.lost())
            .finish()
    }
}
