//! `LockManager`: the facade. Takes leases (one attempt, or a short loop driven by
//! [`Wait`](crate::wait::Wait)), runs work under one, and cleans up an abandoned acquire.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::auto_extend::AutoExtender;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::Token;
use crate::lease::LeaseHandle;
use crate::notify::Notifier;
use crate::options::{LockOptions, Replicas};
use crate::store::{LeaseStore, Queue};
use crate::wait::{InQueue, Wait};

mod attempt;
mod cleanup;
mod derived;
mod handoff;
mod replicas;

use cleanup::{QueueEntry, waiter_id};

/// Takes and hands out leases on one Redis server.
///
/// Cheap to clone (an `Arc` inside); clones share the connection. Build it from a URL
/// with [`connect`](Self::connect) (a reconnecting [`ConnectionManager`](redis::aio::ConnectionManager) inside), from a
/// connection you already have with [`new`](Self::new), or with options through
/// [`builder`](Self::builder).
///
/// | call | waits? | when the lock is held by another owner |
/// |---|---|---|
/// | [`lock`](Self::lock), [`lock_with`](Self::lock_with) | yes, with backoff, up to the wait budget | [`Error::Timeout`] |
/// | [`try_lock`](Self::try_lock), [`try_lock_with`](Self::try_lock_with) | no, one attempt | [`Error::Contended`] |
///
/// ```no_run
/// # async fn demo() -> distlock::Result<()> {
/// use std::time::Duration;
/// use distlock::{LockManager, LockOptions};
///
/// let locks = LockManager::connect("redis://127.0.0.1:6379").await?;
/// let guard = locks
///     .lock_with("jobs:nightly", LockOptions::new().with_ttl(Duration::from_secs(10)))
///     .await?;
/// // ... only one process runs this at a time ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockManager {
    shared: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn LeaseStore>,
    auto_extender: AutoExtender,
    /// Shared with the managers derived from this one (semaphores): one subscription
    /// connection for all.
    notifier: Option<Arc<Notifier>>,
    prefix: Box<[u8]>,
    defaults: LockOptions,
    /// Replica acknowledgement for every lock whose options leave it to the manager.
    replicas: Option<Replicas>,
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("prefix", &String::from_utf8_lossy(&self.shared.prefix))
            .field("defaults", &self.shared.defaults)
            .finish_non_exhaustive()
    }
}

/// The result of one acquire attempt.
enum Attempt {
    Taken(LockGuard),
    /// Held by another owner; `token` and `sent`: this attempt's token and send time (a
    /// fair-mode release may hand the lease to that token, see [`Handoff`]).
    Held {
        pttl: Option<Duration>,
        token: Token,
        sent: Instant,
    },
}

impl LockManager {
    /// The manager over `store`: where its leases live is the store's business.
    pub(crate) fn from_parts(
        store: Arc<dyn LeaseStore>,
        notifier: Option<Notifier>,
        prefix: Box<[u8]>,
        defaults: LockOptions,
        replicas: Option<Replicas>,
    ) -> Self {
        crate::metrics::describe();
        LockManager {
            shared: Arc::new(Shared {
                auto_extender: AutoExtender::new(Arc::clone(&store)),
                store,
                notifier: notifier.map(Arc::new),
                prefix,
                defaults,
                replicas,
            }),
        }
    }

    /// The options [`lock`](Self::lock) and [`try_lock`](Self::try_lock) use.
    pub fn default_options(&self) -> LockOptions {
        self.shared.defaults
    }

    /// Takes the lock `key` with the default options, waiting while another owner holds
    /// it (see [`lock_with`](Self::lock_with)).
    ///
    /// # Cancel safety
    ///
    /// As for [`lock_with`](Self::lock_with).
    pub async fn lock(&self, key: impl AsRef<[u8]>) -> Result<LockGuard> {
        self.lock_with(key, self.shared.defaults).await
    }

    /// Takes the lock `key`, waiting while another owner holds it.
    ///
    /// Attempts are spaced by `options`' backoff; the call returns [`Error::Timeout`] once
    /// the wait budget is spent (it never sleeps past the budget; the last attempt is made
    /// at the deadline), or when the backoff's attempt limit is reached. It always makes at
    /// least one attempt, even with a zero budget or a limit of one attempt.
    ///
    /// Errors of the connection (refused, dropped, timed out, a server still loading its
    /// data, an attempt whose reply came back after its lease's validity) are retried
    /// within the budget like a held lock, so a restart or failover of a second or two
    /// does not fail every waiter; the possible lease of such an attempt is released in
    /// the background. Errors the server answered (`WRONGTYPE`, no permission, a script
    /// error) return at once.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] (held by another owner until the budget ran out),
    /// [`Error::Redis`] (the server answered with an error, at once; or the connection
    /// kept failing until the budget ran out: the last such error),
    /// [`Error::InvalidArgument`] (bad key or options; nothing was sent).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future at any point leaves no lease that nobody can release: if an
    /// attempt was in flight, a compare-and-delete with its token is handed to the
    /// background, so a lease the server may have granted is released right away instead
    /// of living out its TTL.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// use std::time::Duration;
    /// use distlock::{Error, LockOptions};
    ///
    /// let opts = LockOptions::new().with_wait(Duration::from_secs(2));
    /// match locks.lock_with("ledger", opts).await {
    ///     Ok(guard) => guard.release().await?,
    ///     Err(Error::Timeout { waited, attempts, .. }) => {
    ///         eprintln!("busy: gave up after {waited:?} and {attempts} attempts");
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lock_with(
        &self,
        key: impl AsRef<[u8]>,
        options: LockOptions,
    ) -> Result<LockGuard> {
        self.lock_request(key.as_ref(), &options, false).await
    }

    async fn lock_request(
        &self,
        key: &[u8],
        options: &LockOptions,
        auto_extend_default: bool,
    ) -> Result<LockGuard> {
        let started = Instant::now();
        let result = self
            .wait_for_lock(key, options, auto_extend_default, started)
            .await;
        crate::metrics::acquire(&result, Some(started));
        result
    }

    /// [`lock_request`](Self::lock_request) without its metrics.
    async fn wait_for_lock(
        &self,
        key: &[u8],
        options: &LockOptions,
        auto_extend_default: bool,
        started: Instant,
    ) -> Result<LockGuard> {
        let key = self.key_for(key, options)?;
        let request = self.request(options, auto_extend_default)?;
        let deadline = started.checked_add(request.wait).ok_or_else(|| {
            Error::invalid("wait", "the wait budget overflows the monotonic clock")
        })?;
        let span =
            tracing::debug_span!("distlock.lock", key = %key, ttl_ms = request.ttl.as_millis());
        async {
            let notifier = self.shared.notifier.as_deref();
            let delays = request.backoff.delays();
            // Fair mode: one id per call in the lock's queue in Redis, and an entry that
            // leaves the queue (in the background) however the call ends without the lock.
            let waiter = request.fair.map(|_| waiter_id(notifier));
            let runtime = Handle::try_current().ok();
            let store = &self.shared.store;
            let mut entry = (waiter.as_ref())
                .map(|id| QueueEntry::new(store, &key, id.clone(), runtime.as_ref()));
            let in_queue = waiter
                .as_deref()
                .zip(request.fair)
                .map(|(id, lease)| InQueue { id, lease });
            let mut wait = Wait::new(&key, notifier, in_queue, delays, started, deadline);
            if request.fair.is_none() && request.replicas.is_none() && store.passes() {
                wait.take_passes(request.ttl);
            }
            // Fair mode: token and send time of the last attempt answered "queued" (none
            // after one whose outcome is unknown: it may take up a handed lease itself).
            let mut queued_as: Option<(Token, Instant)> = None;
            loop {
                // A handed lease needs no attempt of its own (the release that handed it
                // took this call out of the queue, and its announcement ended the pause).
                if let Some(guard) = self.take_passed(&key, &request, &wait) {
                    wait.acquired();
                    return Ok(guard);
                }
                if let Some(guard) = self.take_handed(&key, &request, &wait, &mut queued_as) {
                    QueueEntry::disarm(&mut entry);
                    wait.acquired();
                    return Ok(guard);
                }
                if wait.attempt_now() {
                    let queue = waiter
                        .as_deref()
                        .zip(request.fair)
                        .map(|(id, lease)| Queue {
                            waiter: id,
                            lease,
                            join: true,
                            attempt: wait.attempts(),
                            named: wait.named(),
                        });
                    let retry = wait.retrying();
                    match self
                        .attempt(&key, &request, queue, Some(deadline), retry)
                        .await
                    {
                        Ok(Attempt::Taken(guard)) => {
                            QueueEntry::disarm(&mut entry);
                            wait.acquired();
                            return Ok(guard);
                        }
                        Ok(Attempt::Held { pttl, token, sent }) => {
                            queued_as = request.fair.map(|_| (token, sent));
                            wait.held(pttl);
                        }
                        Err(e) if e.is_transient() => {
                            queued_as = None;
                            wait.failed(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                wait.pause().await?;
            }
        }
        .instrument(span)
        .await
    }

    /// One attempt at the lock `key` with the default options.
    /// See [`try_lock_with`](Self::try_lock_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`try_lock_with`](Self::try_lock_with).
    pub async fn try_lock(&self, key: impl AsRef<[u8]>) -> Result<LockGuard> {
        self.try_lock_with(key, self.shared.defaults).await
    }

    /// One attempt at the lock `key`: the guard, or [`Error::Contended`] when another owner
    /// holds it. The wait budget and backoff of `options` are not used.
    ///
    /// # Errors
    ///
    /// [`Error::Contended`], [`Error::Redis`], [`Error::InvalidArgument`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future while the attempt is in flight hands a compare-and-delete with
    /// its token to the background, so no lease is left that nobody can release.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// match locks.try_lock("cache:rebuild").await {
    ///     Ok(guard) => { /* rebuild */ guard.release().await? }
    ///     Err(e) if e.is_held_by_other() => println!("another worker is rebuilding"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn try_lock_with(
        &self,
        key: impl AsRef<[u8]>,
        options: LockOptions,
    ) -> Result<LockGuard> {
        let started = crate::metrics::now();
        let result = self.try_once(key.as_ref(), options).await;
        crate::metrics::acquire(&result, started);
        result
    }

    /// [`try_lock_with`](Self::try_lock_with) without its metrics.
    async fn try_once(&self, key: &[u8], options: LockOptions) -> Result<LockGuard> {
        let key = self.key_for(key, &options)?;
        let request = self.request(&options, false)?;
        let span = tracing::debug_span!(
            "distlock.try_lock",
            key = %key,
            ttl_ms = request.ttl.as_millis()
        );
        async {
            // Fair mode: a caller that is nobody's waiter takes the lock only if nobody
            // queues for it, and leaves no entry.
            let waiter = Token::generate();
            let queue = request.fair.map(|lease| Queue {
                waiter: waiter.as_bytes(),
                lease,
                join: false,
                attempt: 1,
                named: false,
            });
            match self.attempt(&key, &request, queue, None, false).await? {
                Attempt::Taken(guard) => Ok(guard),
                Attempt::Held { pttl, .. } => Err(Error::Contended {
                    key: key.display(),
                    retry_after: pttl,
                }),
            }
        }
        .instrument(span)
        .await
    }

    /// Runs `work` while holding the lock `key`, with the default options and
    /// auto-extension on; see [`with_lock_with`](Self::with_lock_with).
    ///
    /// # Cancel safety
    ///
    /// As for [`with_lock_with`](Self::with_lock_with).
    pub async fn with_lock<F, Fut, T>(&self, key: impl AsRef<[u8]>, work: F) -> Result<T>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        self.with_lock_with(key, self.shared.defaults, work).await
    }

    /// Takes the lock `key` (waiting as [`lock_with`](Self::lock_with) does), runs `work`
    /// while the lease is held, and releases it.
    ///
    /// The lease is auto-extended unless `options` turn that off
    /// ([`LockOptions::with_auto_extend`]). If the lease is lost before `work` finishes (a
    /// auto-extension finds it taken, Redis stays unreachable until the deadline, the hold-time cap
    /// runs out), `work` is dropped, that is cancelled at its next `.await`, and the call
    /// returns [`Error::Lost`]. Otherwise the lease is released and `work`'s output returned;
    /// a release that fails after `work` finished under a valid lease is logged, not
    /// returned, since the work itself was protected.
    ///
    /// `work` receives a [`LeaseHandle`]: the fencing token to pass to the protected
    /// resource, the deadline, and its own `lost()` future for sub-tasks. If `work` panics,
    /// the guard is dropped while unwinding and the lease is released in the background.
    ///
    /// # Errors
    ///
    /// Those of [`lock_with`](Self::lock_with), and [`Error::Lost`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the future drops `work` and the guard; the lease is released in the
    /// background, as for a dropped [`LockGuard`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
    /// let rows = locks
    ///     .with_lock("reports:nightly", |lease| async move {
    ///         // Pass the fencing token to every write the work makes.
    ///         let token = lease.fencing_token();
    ///         /* ... long work, auto-extended in the background ... */
    ///         42
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn with_lock_with<F, Fut, T>(
        &self,
        key: impl AsRef<[u8]>,
        options: LockOptions,
        work: F,
    ) -> Result<T>
    where
        F: FnOnce(LeaseHandle) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock_request(key.as_ref(), &options, true).await?;
        let lost = guard.lost();
        let work = work(guard.handle());
        tokio::select! {
            biased;
            reason = lost => {
                tracing::warn!(key = %String::from_utf8_lossy(guard.key()), %reason, "lease lost; work cancelled");
                Err(Error::Lost { key: crate::error::display_key(guard.key()), reason })
            }
            output = work => {
                if let Some(reason) = guard.handle().lost_reason() {
                    return Err(Error::Lost { key: crate::error::display_key(guard.key()), reason });
                }
                if let Err(e) = guard.release().await {
                    tracing::warn!(error = %e, "release after the work finished failed");
                }
                Ok(output)
            }
        }
    }
}
