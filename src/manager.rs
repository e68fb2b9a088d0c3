//! `LockManager`: the connection, the defaults, and the acquire loop.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use tokio::runtime::Handle;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::guard::{LockGuard, release_in_background};
use crate::key::{LockKey, Token, validate_prefix};
use crate::lease::{Lease, LeaseHandle};
use crate::notify::{Notifier, Waiter};
use crate::options::{LockOptions, Ttl};
use crate::store::{Acquire, LeaseStore, RedisStore};
use crate::watchdog::Watchdog;

/// The default key prefix: lock `jobs:nightly` lives at `distlock:{jobs:nightly}`.
pub const DEFAULT_PREFIX: &str = "distlock:";

/// Waiting past a holder's reported remaining TTL by this much finds the key expired.
const EXPIRY_SLACK: Duration = Duration::from_millis(1);

/// The default bound on one Redis command (acquire, extend or release attempt).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The default bound on establishing the connection in [`LockManager::connect`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The default bound on one node's answer in a lock over several primaries (see
/// [`LockManagerBuilder::node_timeout`]): small next to any sensible lease TTL, large next
/// to a Redis round trip on a healthy network.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);

/// Takes and hands out leases on one Redis server.
///
/// Cheap to clone (an `Arc` inside); clones share the connection. Build it from a URL
/// with [`connect`](Self::connect) (a reconnecting [`ConnectionManager`] inside), from a
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
///     .lock_with("jobs:nightly", LockOptions::new().ttl(Duration::from_secs(10)))
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
    watchdog: Watchdog,
    notifier: Option<Notifier>,
    prefix: Box<[u8]>,
    defaults: LockOptions,
}

/// What one acquisition asks for, checked.
#[derive(Clone, Copy)]
struct Request {
    ttl: Ttl,
    auto_extend: bool,
    max_hold: Option<Duration>,
}

impl Request {
    fn new(options: &LockOptions, auto_extend_default: bool) -> Result<Self> {
        let mut ttl = Ttl::new(options.lease_ttl())?;
        let max_hold = options.hold_cap();
        if let Some(hold) = max_hold {
            if hold < crate::MIN_TTL {
                return Err(Error::invalid(
                    "max_hold",
                    format!(
                        "a hold-time cap must be at least {:?}, got {hold:?}",
                        crate::MIN_TTL
                    ),
                ));
            }
            // The lease never outlives the cap, whatever the TTL: a cap shorter than the
            // TTL is the TTL of the first lease.
            if hold < ttl.as_duration() {
                ttl = Ttl::new(hold)?;
            }
        }
        Ok(Request {
            ttl,
            auto_extend: options.auto_extend_or(auto_extend_default),
            max_hold,
        })
    }
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("prefix", &String::from_utf8_lossy(&self.shared.prefix))
            .field("defaults", &self.shared.defaults)
            .finish_non_exhaustive()
    }
}

/// Builds a [`LockManager`] with a key prefix, default options and timeouts.
///
/// ```no_run
/// # async fn demo() -> distlock::Result<()> {
/// use std::time::Duration;
/// use distlock::{LockManager, LockOptions};
///
/// let locks = LockManager::builder()
///     .prefix("billing:locks:")
///     .default_options(LockOptions::new().ttl(Duration::from_secs(5)))
///     .command_timeout(Duration::from_millis(500))
///     .connect("redis://127.0.0.1:6379")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LockManagerBuilder {
    prefix: Vec<u8>,
    defaults: LockOptions,
    pub(crate) command_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) node_timeout: Duration,
    notify: bool,
    pubsub: Option<redis::Client>,
    connection_times_out: bool,
}

impl Default for LockManagerBuilder {
    fn default() -> Self {
        LockManagerBuilder {
            prefix: DEFAULT_PREFIX.as_bytes().to_vec(),
            defaults: LockOptions::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            notify: true,
            pubsub: None,
            connection_times_out: false,
            node_timeout: DEFAULT_NODE_TIMEOUT,
        }
    }
}

impl LockManagerBuilder {
    /// The prefix of every Redis key the manager touches (default [`DEFAULT_PREFIX`], at most
    /// [`MAX_PREFIX_LEN`](crate::MAX_PREFIX_LEN) bytes). Managers that must exclude each
    /// other need the same prefix.
    pub fn prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = prefix.as_ref().to_vec();
        self
    }

    /// The options [`lock`](LockManager::lock) and [`try_lock`](LockManager::try_lock) use
    /// (default [`LockOptions::new`]).
    pub fn default_options(mut self, options: LockOptions) -> Self {
        self.defaults = options;
        self
    }

    /// The longest distlock waits for the reply to one command before it reports
    /// [`Error::Redis`] (default [`DEFAULT_COMMAND_TIMEOUT`]). Must be above zero.
    ///
    /// With [`connect`](Self::connect) it is the response timeout of the reconnecting
    /// connection. With [`build`](Self::build), distlock enforces it with a timer of its own
    /// around every command, unless [`connection_enforces_timeout`](Self::connection_enforces_timeout)
    /// says the connection already does.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// For [`build`](Self::build): the connection given bounds every reply in time itself,
    /// so distlock adds no timer of its own (one less timer per command). redis-rs's
    /// `MultiplexedConnection` and `ConnectionManager` do (a 500 ms response timeout unless
    /// configured otherwise). Do not claim it for a connection without a response timeout:
    /// a server that stops answering would then make calls wait forever.
    pub fn connection_enforces_timeout(mut self) -> Self {
        self.connection_times_out = true;
        self
    }

    /// The longest [`connect`](Self::connect) takes to reach the server (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]). Must be above zero.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Release notifications (default on): releases are published on the lock's pub/sub
    /// channel, and waiters of this manager sleep until a release wakes them instead of
    /// polling. Waiters share one subscription connection per manager and are woken in
    /// arrival order, one per release. A notification is only a shortcut: every wait is
    /// still bounded by the holder's remaining TTL, the backoff policy and the wait budget.
    ///
    /// Off, releases are not published and waiters poll with the backoff policy. Managers
    /// that compete for the same locks should agree: a manager with notifications off does
    /// not wake the waiters of the others.
    pub fn notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The client to open the subscription connection with, for a manager built with
    /// [`build`](Self::build) on a connection of your own (which cannot subscribe).
    /// [`connect`](Self::connect) uses its own URL. Without one, waiters poll.
    pub fn notify_via(mut self, client: redis::Client) -> Self {
        self.pubsub = Some(client);
        self
    }

    /// For a lock over several primaries ([`connect_redlock`](Self::connect_redlock),
    /// [`build_redlock`](Self::build_redlock)): the longest one node's answer to an acquire,
    /// extend or release is waited for (default [`DEFAULT_NODE_TIMEOUT`]). A node that takes
    /// longer counts as failed for that call, so one slow node delays a call by at most this
    /// much. Keep it well below the lease TTL: an acquire takes up to this long, and the
    /// lease's validity is what remains of the TTL after it. Must be above zero.
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// use std::time::Duration;
    /// let locks = distlock::LockManager::builder()
    ///     .node_timeout(Duration::from_millis(30)) // nodes in one data center
    ///     .connect_redlock(["redis://a:6379", "redis://b:6379", "redis://c:6379"])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `unix://…`) through a
    /// [`ConnectionManager`], which reconnects by itself after a failure.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a URL that does not parse, a `rediss://` URL without
    /// the `tls` feature, a server older than [`MIN_REDIS_VERSION`], or a bad option;
    /// [`Error::Redis`] when the server cannot be reached (refused, wrong password, or no
    /// answer within the connect timeout).
    ///
    /// A server whose `maxmemory-policy` may evict keys is accepted with one warning
    /// (an evicted lease lets a second owner in): see the crate docs on guarantees.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempt; nothing is left behind.
    pub async fn connect(mut self, url: &str) -> Result<LockManager> {
        self.check()?;
        let client = open_client(url)?;
        if self.pubsub.is_none() {
            self.pubsub = Some(client.clone());
        }
        // The connection manager's response timeout is the command timeout.
        self.connection_times_out = true;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connect = ConnectionManager::new_with_config(client, config);
        let mut conn = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(Error::Redis(
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "could not connect to Redis within {:?}",
                            self.connect_timeout
                        ),
                    )
                    .into(),
                ));
            }
        };
        check_server(&mut conn, url).await?;
        self.build(conn)
    }

    /// Builds the manager on a connection you already have: a [`ConnectionManager`], a
    /// [`MultiplexedConnection`](redis::aio::MultiplexedConnection), a pooled connection,
    /// anything that implements [`ConnectionLike`] and is cheap to clone.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad prefix, timeout or default option.
    pub fn build<C>(self, conn: C) -> Result<LockManager>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.check()?;
        let timer = (!self.connection_times_out).then_some(self.command_timeout);
        let store = RedisStore::new(conn, timer, self.notify);
        Ok(self.with_store(Arc::new(store)))
    }

    /// The manager over any store: where its leases live is the store's business.
    pub(crate) fn with_store(self, store: Arc<dyn LeaseStore>) -> LockManager {
        let notifier = match (self.notify, self.pubsub) {
            (true, Some(client)) => Some(Notifier::new(
                client,
                self.connect_timeout,
                self.command_timeout,
            )),
            _ => None,
        };
        LockManager {
            shared: Arc::new(Shared {
                watchdog: Watchdog::new(Arc::clone(&store)),
                store,
                notifier,
                prefix: self.prefix.into(),
                defaults: self.defaults,
            }),
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        validate_prefix(&self.prefix)?;
        if self.command_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.node_timeout.is_zero()
        {
            return Err(Error::invalid("timeout", "timeouts must be above zero"));
        }
        self.defaults.validate()
    }
}

/// Opens a client for `url`, or says why it cannot be used.
///
/// `rediss://` needs this crate's `tls` feature: without it the URL is rejected here, even
/// when another crate of the application turned on redis-rs' TLS (rustls would panic on
/// the first connection for want of a crypto provider). With it, rustls' `ring` provider is
/// installed as the process default unless the application installed one already.
pub(crate) fn open_client(url: &str) -> Result<redis::Client> {
    let tls = url
        .get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss:/"));
    if tls {
        #[cfg(not(feature = "tls"))]
        return Err(Error::invalid(
            "url",
            "rediss:// needs distlock's `tls` cargo feature",
        ));
        #[cfg(feature = "tls")]
        {
            // `Err` means a provider is installed already: the application's choice stands.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    }
    redis::Client::open(url).map_err(|e| Error::invalid("url", e.to_string()))
}

/// The oldest Redis accepted by [`LockManagerBuilder::connect`]: the acquire script writes
/// after reading `TIME`, which needs script effects replication, the default from 5.0 on.
pub const MIN_REDIS_VERSION: (u32, u32) = (5, 0);

/// What `INFO` tells about a server that matters to leases: its version (rejected below
/// [`MIN_REDIS_VERSION`]) and its eviction policy (warned about once when it may evict
/// lease keys). A server that does not allow `INFO` is taken as it is.
pub(crate) async fn check_server<C: ConnectionLike + Send>(conn: &mut C, url: &str) -> Result<()> {
    let info: String = match redis::cmd("INFO").query_async(conn).await {
        Ok(info) => info,
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
            return Ok(());
        }
        Err(e) => {
            tracing::debug!(error = %e, "INFO not available; server not checked");
            return Ok(());
        }
    };
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    if let Some(version) = field("redis_version") {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if found < MIN_REDIS_VERSION {
            return Err(Error::invalid(
                "url",
                format!(
                    "{} runs Redis {version}; distlock needs Redis {}.{} or later",
                    crate::error::display_key(url.as_bytes()),
                    MIN_REDIS_VERSION.0,
                    MIN_REDIS_VERSION.1
                ),
            ));
        }
    }
    if let Some(policy) = field("maxmemory_policy")
        && evicts_leases(policy)
    {
        tracing::warn!(
            policy,
            "the server may evict keys under memory pressure (maxmemory-policy {policy}): an \
             evicted lease lets a second owner in; use noeviction (or volatile-* with no other \
             keys that expire) for lock data"
        );
    }
    Ok(())
}

/// Whether a `maxmemory-policy` can evict a lease key (a key with a TTL).
fn evicts_leases(policy: &str) -> bool {
    policy.starts_with("allkeys-") || policy.starts_with("volatile-")
}

/// The result of one acquire attempt.
enum Attempt {
    Taken(LockGuard),
    Held { pttl: Option<Duration> },
}

impl LockManager {
    /// Connects to `url` with the default prefix, options and timeouts. See
    /// [`LockManagerBuilder::connect`] for the errors and for other settings.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempt; nothing is left behind.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder().connect(url).await
    }

    /// A manager on a connection you already have, with the default prefix, options and
    /// command timeout. See [`LockManagerBuilder::build`].
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let conn = client.get_multiplexed_async_connection().await?;
    /// let locks = distlock::LockManager::new(conn)?;
    /// # Ok(()) }
    /// ```
    pub fn new<C>(conn: C) -> Result<Self>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        Self::builder().build(conn)
    }

    /// A builder for a prefix, default options and timeouts.
    pub fn builder() -> LockManagerBuilder {
        LockManagerBuilder::default()
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
    /// let opts = LockOptions::new().wait(Duration::from_secs(2));
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
        options.validate()?;
        let key = LockKey::new(&self.shared.prefix, key)?;
        let request = Request::new(options, auto_extend_default)?;
        let ttl = request.ttl;
        let deadline = started.checked_add(options.wait_budget()).ok_or_else(|| {
            Error::invalid("wait", "the wait budget overflows the monotonic clock")
        })?;
        let span = tracing::debug_span!(
            "distlock.lock",
            key = %key,
            ttl_ms = ttl.as_millis()
        );
        async {
            let mut delays = options.backoff_policy().delays();
            let mut attempts: u32 = 0;
            let mut waiter: Option<Waiter> = None;
            // The last attempt failed on the connection, not on a holder: what to report
            // if the budget runs out now.
            let mut failure: Option<Error> = None;
            // First come, first served within this manager: when callers of this manager
            // already wait for the key, queue behind them instead of snatching it from
            // the one a release is waking.
            let mut wait_turn = false;
            if let Some(notifier) = &self.shared.notifier
                && notifier.has_waiters(key.released_channel())
                && let Some(queued) = notifier.register(key.released_channel())
            {
                waiter = Some(queued);
                wait_turn = true;
            }
            loop {
                let now = Instant::now();
                // Whether a release after the coming attempt is sure to wake this waiter.
                let listening = waiter.as_ref().is_some_and(Waiter::listening);
                let pttl = if std::mem::take(&mut wait_turn) {
                    None
                } else {
                    attempts = attempts.saturating_add(1);
                    match self.attempt(&key, request).await {
                        Ok(Attempt::Taken(guard)) => return Ok(guard),
                        Ok(Attempt::Held { pttl }) => {
                            failure = None;
                            pttl
                        }
                        Err(e) if e.is_transient() => {
                            tracing::debug!(error = %e, "attempt failed on the connection; retrying");
                            failure = Some(e);
                            None
                        }
                        Err(e) => return Err(e),
                    }
                };
                let now_after = Instant::now();
                let delay = match delays.next() {
                    Some(delay) if now_after < deadline => delay,
                    // However the budget or attempt limit is set, one attempt is made.
                    _ if attempts == 0 => continue,
                    _ => {
                        let waited = now_after.saturating_duration_since(started);
                        tracing::debug!(attempts, ?waited, "gave up waiting");
                        return Err(failure.unwrap_or_else(|| Error::Timeout {
                            key: key.display(),
                            waited,
                            attempts,
                        }));
                    }
                };
                let now = now_after.max(now);
                let poll = now.checked_add(delay).map_or(deadline, |t| t.min(deadline));
                if failure.is_some() {
                    tokio::time::sleep_until(poll.into()).await;
                    continue;
                }
                if waiter.is_none()
                    && let Some(notifier) = &self.shared.notifier
                    && let Some(registered) = notifier.register(key.released_channel())
                {
                    // Subscribe, then try again at once: that attempt decides to wait, and
                    // any release after it wakes this waiter. The subscription is waited
                    // for no longer than the poll would be; until it is confirmed, this
                    // waiter polls.
                    let confirmed = registered.until_listening(poll).await;
                    waiter = Some(registered);
                    if confirmed {
                        continue;
                    }
                }
                // Every wait ends by the holder's remaining TTL (an expiry is not
                // announced) and the budget. A polling waiter also retries after a backoff
                // step; with notifications only the longest-waiting waiter of this manager
                // does (a missed notification costs at most that), the others wait their
                // turn instead of snatching the lock from it.
                let held_until = pttl.and_then(|left| now.checked_add(left + EXPIRY_SLACK));
                if let (Some(waiter), Some(until)) = (&waiter, held_until) {
                    waiter.note_held_until(until);
                }
                let mut bound = deadline;
                if let Some(until) = held_until.or_else(|| waiter.as_ref()?.held_until()) {
                    bound = bound.min(until.max(now));
                }
                let poll = poll.min(bound);
                tracing::trace!(attempts, ?delay, ?pttl, "held by another owner; waiting");
                match &waiter {
                    Some(waiter) => {
                        let first = waiter.is_first();
                        waiter
                            .wait(if listening && !first { bound } else { poll })
                            .await;
                        waiter.rearm();
                    }
                    None => tokio::time::sleep_until(poll.into()).await,
                }
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
        let key = LockKey::new(&self.shared.prefix, key.as_ref())?;
        let request = Request::new(&options, false)?;
        let span = tracing::debug_span!(
            "distlock.try_lock",
            key = %key,
            ttl_ms = request.ttl.as_millis()
        );
        async {
            match self.attempt(&key, request).await? {
                Attempt::Taken(guard) => Ok(guard),
                Attempt::Held { pttl } => Err(Error::Contended {
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
    /// ([`LockOptions::auto_extend`]). If the lease is lost before `work` finishes (a
    /// renewal finds it taken, Redis stays unreachable until the deadline, the hold-time cap
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
    ///         /* ... long work, renewed in the background ... */
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

    /// One acquire round trip with a fresh token.
    async fn attempt(&self, key: &LockKey, request: Request) -> Result<Attempt> {
        let ttl = request.ttl;
        let token = Token::generate();
        let runtime = Handle::try_current().ok();
        if request.auto_extend && runtime.is_none() {
            return Err(Error::invalid(
                "auto_extend",
                "auto-extension needs a tokio runtime to renew in",
            ));
        }
        let mut pending = PendingAcquire {
            store: &self.shared.store,
            key,
            token,
            ttl,
            runtime: runtime.as_ref(),
            armed: true,
        };
        let sent = Instant::now();
        let outcome = self.shared.store.acquire(key, &token, ttl).await;
        // From here on the outcome is known (or an error is returned): on error the
        // armed `pending` cleans up, since the SET may have landed before the failure.
        let outcome = outcome?;
        let replied = Instant::now();
        if let Acquire::Taken { .. } = outcome
            && replied >= ttl.valid_until(sent)
        {
            // The reply came back after the lease's validity ended: another owner may
            // hold the key by now, so this attempt failed. `pending` releases the lease in
            // the background, in case the key still holds it.
            tracing::debug!(token = token.short(), "acquired too late; releasing");
            return Err(Error::timed_out(format!(
                "the acquire's reply came back after its lease's validity ({:?} TTL)",
                ttl.as_duration()
            )));
        }
        pending.armed = false;
        drop(pending);
        match outcome {
            Acquire::Taken { fence } => {
                tracing::debug!(token = token.short(), ?fence, "acquired");
                let lease = Arc::new(Lease::new(key.clone(), token, fence, ttl, sent, replied));
                let renewal = match (&runtime, request.auto_extend) {
                    (Some(runtime), true) => Some(self.shared.watchdog.register(
                        Arc::clone(&lease),
                        sent,
                        request.max_hold,
                        runtime,
                    )),
                    _ => None,
                };
                Ok(Attempt::Taken(LockGuard::new(
                    lease,
                    Arc::clone(&self.shared.store),
                    runtime,
                    renewal,
                )))
            }
            Acquire::Held { pttl } => Ok(Attempt::Held { pttl }),
        }
    }
}

/// Cleans up after an acquire whose outcome is unknown: dropped mid-flight, or failed
/// after the command may have reached the server. The compare-and-delete only removes a
/// lease carrying this attempt's token, so it can never hurt another owner.
struct PendingAcquire<'a> {
    store: &'a Arc<dyn LeaseStore>,
    key: &'a LockKey,
    token: Token,
    ttl: Ttl,
    runtime: Option<&'a Handle>,
    armed: bool,
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(runtime) = self.runtime else {
            return;
        };
        tracing::debug!(
            key = %self.key,
            token = self.token.short(),
            "acquire abandoned; releasing in the background"
        );
        release_in_background(
            runtime,
            Arc::clone(self.store),
            self.key.clone(),
            self.token,
            self.ttl.as_duration(),
        );
    }
}
