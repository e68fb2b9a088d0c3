//! Every way to construct a [`LockManager`]: [`LockManagerBuilder`] and its defaults.
//!
//! One builder, one shared connection configuration, and one constructor per place a lease
//! can live: a single primary from a URL ([`connect`](LockManagerBuilder::connect)) or from
//! a connection of yours ([`build`](LockManagerBuilder::build)), several independent
//! primaries ([`connect_redlock`](LockManagerBuilder::connect_redlock),
//! [`build_redlock`](LockManagerBuilder::build_redlock)). Each constructor makes the store
//! (what sends lease commands) and hands it to the manager; nothing below the manager knows
//! how it was built.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};

use crate::connect::{check_server, connect_failed, open_client};
use crate::error::{Error, Result};
use crate::key::validate_prefix;
use crate::manager::LockManager;
use crate::notify::Notifier;
use crate::options::{LockOptions, Replicas};
use crate::store::{AckLane, ClientSource, LeaseStore, RedisStore};

mod deployments;
mod redlock;
mod replicas;

/// The default key prefix: lock `jobs:nightly` lives at `distlock:{jobs:nightly}`.
pub const DEFAULT_PREFIX: &str = "distlock:";

/// The default bound on one Redis command (acquire, extend or release attempt).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// The default bound on establishing the connection in [`LockManager::connect`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The default bound on one node's answer in a lock over several primaries (see
/// [`LockManagerBuilder::with_node_timeout`]): small next to any sensible lease TTL, large next
/// to a Redis round trip on a healthy network.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);

/// Builds a [`LockManager`] with a key prefix, default options and timeouts.
///
/// ```no_run
/// # async fn demo() -> distlock::Result<()> {
/// use std::time::Duration;
/// use distlock::{LockManager, LockOptions};
///
/// let locks = LockManager::builder()
///     .with_prefix("billing:locks:")
///     .with_default_options(LockOptions::new().with_ttl(Duration::from_secs(5)))
///     .with_command_timeout(Duration::from_millis(500))
///     .connect("redis://127.0.0.1:6379")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LockManagerBuilder {
    prefix: Vec<u8>,
    defaults: LockOptions,
    command_timeout: Duration,
    connect_timeout: Duration,
    node_timeout: Duration,
    notify: bool,
    pubsub: Option<redis::Client>,
    /// Where the subscription moves when `pubsub`'s server fails: servers that carry the
    /// same publications (the other nodes of a cluster). Empty elsewhere.
    pubsub_alternatives: Vec<redis::Client>,
    /// A Redis Cluster's nodes, for sharded pub/sub (`SSUBSCRIBE` on each lock's shard);
    /// set by [`connect_cluster`](Self::connect_cluster) unless `pubsub` is given.
    #[cfg(feature = "cluster")]
    pubsub_shards: Option<Vec<redis::ConnectionInfo>>,
    connection_times_out: bool,
    replicas: Option<Replicas>,
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
            pubsub_alternatives: Vec::new(),
            #[cfg(feature = "cluster")]
            pubsub_shards: None,
            connection_times_out: false,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            replicas: None,
        }
    }
}

impl LockManagerBuilder {
    /// The prefix of every Redis key the manager touches (default [`DEFAULT_PREFIX`], at most
    /// [`MAX_PREFIX_LEN`](crate::MAX_PREFIX_LEN) bytes). Managers that must exclude each
    /// other need the same prefix.
    pub fn with_prefix(mut self, prefix: impl AsRef<[u8]>) -> Self {
        self.prefix = prefix.as_ref().to_vec();
        self
    }

    /// The options [`lock`](LockManager::lock) and [`try_lock`](LockManager::try_lock) use
    /// (default [`LockOptions::new`]).
    pub fn with_default_options(mut self, options: LockOptions) -> Self {
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
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
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
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Release notifications (default on): releases are published on the lock's pub/sub
    /// channel, and waiters of this manager sleep until a release wakes them instead of
    /// polling. Waiters share one subscription connection per manager and are woken in
    /// arrival order, one per release. A notification is only a shortcut: every wait is
    /// still bounded by the holder's remaining TTL, the backoff policy and the wait budget.
    ///
    /// Over several primaries ([`connect_redlock`](Self::connect_redlock)) the manager
    /// subscribes on every node; [`build_redlock`](Self::build_redlock) announces releases
    /// but has no client to subscribe with, so its waiters poll.
    ///
    /// Off, releases are not published and waiters poll with the backoff policy. Managers
    /// that compete for the same locks should agree: a manager with notifications off does
    /// not wake the waiters of the others.
    pub fn with_notify(mut self, on: bool) -> Self {
        self.notify = on;
        self
    }

    /// The client to open the subscription connection with, for a manager built with
    /// [`build`](Self::build) on a connection of your own (which cannot subscribe).
    /// [`connect`](Self::connect) uses its own URL. Without one, waiters poll.
    pub fn with_notify_via(mut self, client: redis::Client) -> Self {
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
    ///     .with_node_timeout(Duration::from_millis(30)) // nodes in one data center
    ///     .connect_redlock(["redis://a:6379", "redis://b:6379", "redis://c:6379"])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn with_node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `unix://…`) through a
    /// [`ConnectionManager`], which reconnects by itself after a failure.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a URL that does not parse, a `rediss://` URL without
    /// the `tls` feature, a server older than [`MIN_REDIS_VERSION`](crate::MIN_REDIS_VERSION), or a bad option;
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
        if url.starts_with("zk://") {
            return self.connect_zookeeper(url).await;
        }
        self.check()?;
        let client = open_client(url)?;
        if self.pubsub.is_none() {
            self.pubsub = Some(client.clone());
        }
        // The connection manager's response timeout is the command timeout.
        self.connection_times_out = true;
        let config = self.connection_config();
        let connect = ConnectionManager::new_with_config(client, config);
        let mut conn = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(conn) => conn.map_err(|e| connect_failed(url, e))?,
            Err(_) => {
                return Err(Error::timed_out(format!(
                    "could not connect to Redis at {} within {:?} (no answer in time: check the \
                     host and port, a firewall, or a paused server)",
                    crate::connect::redacted(url),
                    self.connect_timeout
                )));
            }
        };
        check_server(&mut conn, url, false).await?;
        // Replica-acknowledged calls get connections of their own, opened when used.
        let source = ClientSource {
            client: open_client(url)?,
            connect_timeout: self.connect_timeout,
        };
        let lane = AckLane::new(source, self.command_timeout);
        self.build_with_lane(conn, Some(lane))
    }

    /// Builds the manager on a connection you already have: a [`ConnectionManager`], a
    /// [`MultiplexedConnection`](redis::aio::MultiplexedConnection), anything that implements
    /// [`ConnectionLike`] and is cheap to clone. For a deadpool or bb8 pool, see
    /// `build_pool` (features `deadpool`, `bb8`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad prefix, timeout or default option.
    pub fn build<C>(self, conn: C) -> Result<LockManager>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.build_with_lane(conn, None)
    }

    /// [`build`](Self::build), with connections of their own for replica-acknowledged
    /// calls where the builder can open them.
    fn build_with_lane<C>(self, conn: C, lane: Option<AckLane>) -> Result<LockManager>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.check()?;
        let timer = (!self.connection_times_out).then_some(self.command_timeout);
        let mut store = RedisStore::new(conn, timer, self.notify);
        if let Some(lane) = lane {
            store = store.with_ack_lane(lane);
        }
        self.into_manager(Arc::new(store))
    }

    /// Builds the manager on a connection pool you already have: a
    /// [`deadpool_redis::Pool`] (feature `deadpool`) or a
    /// `bb8::Pool<bb8_redis::RedisConnectionManager>` (feature `bb8`). Each command checks a
    /// connection out and returns it when the reply is in; the
    /// [command timeout](Self::with_command_timeout) bounds the checkout and the command
    /// together, and an exhausted pool is a transient [`Error::Redis`] that says so
    /// ([`pool::is_exhausted`](crate::pool::is_exhausted)). Waiters
    /// poll unless [`with_notify_via`](Self::with_notify_via) gives a client to subscribe
    /// with. See [`crate::pool`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad prefix, timeout or default option.
    #[cfg(any(feature = "deadpool", feature = "bb8"))]
    pub fn build_pool<P>(self, pool: P) -> Result<LockManager>
    where
        P: crate::pool::ConnectionPool,
    {
        self.check()?;
        let conn = crate::pool::Pooled::new(pool, self.command_timeout);
        // The pooled connection bounds every command itself, checkout included.
        let store = RedisStore::new(conn, None, self.notify);
        self.into_manager(Arc::new(store))
    }

    /// The manager over any store: where its leases live is the store's business.
    /// [`Error::InvalidArgument`] if the manager waits for replicas and the store cannot.
    fn into_manager(self, store: Arc<dyn LeaseStore>) -> Result<LockManager> {
        if self.replicas.is_some() {
            store.replica_acks()?;
        }
        #[cfg(feature = "cluster")]
        if let (true, Some(nodes)) = (self.notify, self.pubsub_shards) {
            let notifier = Notifier::sharded(nodes, self.connect_timeout, self.command_timeout);
            return Ok(LockManager::from_parts(
                store,
                Some(notifier),
                self.prefix.into(),
                self.defaults,
                self.replicas,
            ));
        }
        let notifier = match (self.notify, self.pubsub) {
            (true, Some(client)) if self.pubsub_alternatives.is_empty() => Some(Notifier::new(
                client,
                self.connect_timeout,
                self.command_timeout,
            )),
            (true, Some(client)) => {
                let mut clients = vec![client];
                clients.extend(self.pubsub_alternatives);
                Some(Notifier::any_of(
                    clients,
                    self.connect_timeout,
                    self.command_timeout,
                ))
            }
            _ => None,
        };
        Ok(LockManager::from_parts(
            store,
            notifier,
            self.prefix.into(),
            self.defaults,
            self.replicas,
        ))
    }

    /// The configuration of every reconnecting connection a builder opens: the connect
    /// timeout, the command timeout as response timeout, two quick reconnect tries.
    fn connection_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500))
    }

    fn check(&self) -> Result<()> {
        validate_prefix(&self.prefix)?;
        if self.command_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.node_timeout.is_zero()
        {
            return Err(Error::invalid("timeout", "timeouts must be above zero"));
        }
        let defaults = self.defaults.check(false)?;
        if let Some(replicas) = self.replicas {
            replicas.check(defaults.ttl.as_duration())?;
        }
        Ok(())
    }
}

impl LockManager {
    /// Connects to `url` with the default prefix, options and timeouts. See
    /// [`LockManagerBuilder::connect`] for the errors and for other settings.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempt; nothing is left behind.
    pub async fn connect(url: &str) -> Result<Self> {
        LockManagerBuilder::default().connect(url).await
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
        LockManagerBuilder::default().build(conn)
    }

    /// A builder for a prefix, default options and timeouts.
    pub fn builder() -> LockManagerBuilder {
        LockManagerBuilder::default()
    }
}
