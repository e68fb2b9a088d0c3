//! Several locks at once: [`LockManager::lock_all`] takes every lock of a set or none,
//! and one [`MultiGuard`] holds them.
//!
//! Deadlock freedom comes from one global order: every call takes its names sorted by
//! their bytes (duplicates removed), so two callers asking for overlapping sets in any
//! order never wait for each other in a cycle. Each lock is an ordinary lease (its own
//! guard, auto-extension, `lost()`); a failure at any point releases what was taken.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{Error, LostReason, Result};
use crate::guard::LockGuard;
use crate::manager::LockManager;
use crate::options::LockOptions;

/// Every lock of one [`LockManager::lock_all`] call, held together.
///
/// Dropping it releases every lock in the background, like dropping each [`LockGuard`].
#[must_use = "dropping a MultiGuard releases every lock at once"]
#[derive(Debug)]
pub struct MultiGuard {
    /// In the order they were taken (the names sorted by their bytes).
    guards: Vec<LockGuard>,
}

impl MultiGuard {
    /// The guards, one per distinct name, sorted by name.
    pub fn guards(&self) -> &[LockGuard] {
        &self.guards
    }

    /// The guard of `name`, if it is one of the set.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&LockGuard> {
        let name = name.as_ref();
        self.guards.iter().find(|g| g.key() == name)
    }

    /// The earliest deadline of the set: all locks are ours until then.
    pub fn valid_until(&self) -> Instant {
        self.guards
            .iter()
            .map(LockGuard::valid_until)
            .min()
            .unwrap_or_else(Instant::now)
    }

    /// `true` while every lock of the set is held (local state, no I/O).
    pub fn is_held(&self) -> bool {
        self.guards.iter().all(LockGuard::is_held)
    }

    /// Resolves when any lock of the set is lost, with that lock's name and the reason.
    /// A `'static` future: it can be moved into another task.
    pub fn lost(&self) -> impl Future<Output = (Vec<u8>, LostReason)> + Send + 'static {
        let watched: Vec<_> = self
            .guards
            .iter()
            .map(|g| (g.key().to_vec(), Box::pin(g.lost())))
            .collect();
        FirstLoss { watched }
    }

    /// Extends every lease of the set to `ttl` from now. Stops at the first failure and
    /// returns it (the leases extended before it stay extended).
    ///
    /// # Errors
    ///
    /// As [`LockGuard::extend`], for the first lock that failed.
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        for guard in &self.guards {
            guard.extend(ttl).await?;
        }
        Ok(())
    }

    /// Releases every lock of the set; every release is sent, whatever the others answer.
    ///
    /// # Errors
    ///
    /// The first error among the releases ([`Error::Lost`] for a lease that was no longer
    /// ours, [`Error::Redis`] when the server did not confirm).
    pub async fn release(self) -> Result<()> {
        let mut first = None;
        for guard in self.guards {
            if let Err(e) = guard.release().await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The first of several `lost()` futures to resolve.
struct FirstLoss<F> {
    watched: Vec<(Vec<u8>, std::pin::Pin<Box<F>>)>,
}

impl<F: Future<Output = LostReason>> Future for FirstLoss<F> {
    type Output = (Vec<u8>, LostReason);

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        for (name, lost) in &mut this.watched {
            if let std::task::Poll::Ready(reason) = lost.as_mut().poll(cx) {
                return std::task::Poll::Ready((name.clone(), reason));
            }
        }
        std::task::Poll::Pending
    }
}

impl LockManager {
    /// Takes every lock in `names`, or none: with the default options, see
    /// [`lock_all_with`](Self::lock_all_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`lock_all_with`](Self::lock_all_with).
    pub async fn lock_all<I>(&self, names: I) -> Result<MultiGuard>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        self.lock_all_with(names, self.default_options()).await
    }

    /// Takes every lock in `names`, or none, waiting up to `options`' wait budget in all.
    ///
    /// The names are taken one by one in the order of their bytes (duplicates count once),
    /// whatever order the caller lists them in: callers asking for overlapping sets in
    /// different orders never deadlock. Each lock is an ordinary lease with `options`;
    /// if any cannot be taken within the budget, those already taken are released before
    /// the call returns.
    ///
    /// ```no_run
    /// async fn transfer(locks: &distlock::LockManager) -> distlock::Result<()> {
    ///     let both = locks.lock_all(["account:17", "account:4"]).await?;
    ///     // ... move money between the two accounts ...
    ///     both.release().await
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no name or a bad one (nothing is sent); otherwise
    /// the error of the lock that could not be taken, as [`lock_with`](Self::lock_with)
    /// reports it ([`Error::Timeout`] names that lock).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future releases the locks taken so far in the background, and the
    /// attempt in flight cleans up as [`lock_with`](Self::lock_with) does.
    pub async fn lock_all_with<I>(&self, names: I, options: LockOptions) -> Result<MultiGuard>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut sorted: Vec<Vec<u8>> = names.into_iter().map(|n| n.as_ref().to_vec()).collect();
        sorted.sort();
        sorted.dedup();
        if sorted.is_empty() {
            return Err(Error::invalid("key", "lock_all needs at least one name"));
        }
        // Every name is checked before anything is sent.
        for name in &sorted {
            self.check_name(name)?;
        }
        let deadline = Instant::now().checked_add(options.wait());
        let mut guards: Vec<LockGuard> = Vec::with_capacity(sorted.len());
        for name in &sorted {
            let left = deadline.map_or(options.wait(), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match self.lock_with(name, options.with_wait(left)).await {
                Ok(guard) => guards.push(guard),
                Err(e) => {
                    for guard in guards.into_iter().rev() {
                        // Released now, not in the background: the caller may retry at once.
                        let _ = guard.release().await;
                    }
                    return Err(e);
                }
            }
        }
        Ok(MultiGuard { guards })
    }
}
