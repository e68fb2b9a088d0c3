//! Building a manager over several independent primaries (Redlock).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use redis::aio::{ConnectionLike, ConnectionManager};

use super::LockManagerBuilder;
use crate::connect::open_client;
use crate::error::{Error, NodeOutcome, QuorumError, QuorumOperation, Result};
use crate::manager::LockManager;
use crate::notify::Notifier;
use crate::redlock::{Node, RedlockStore};
use crate::store::LeaseStore;

impl LockManagerBuilder {
    /// Connects to N independent Redis primaries and builds a manager whose locks hold on
    /// a majority of them (the Redlock algorithm): the lock survives the loss of any
    /// minority of nodes.
    ///
    /// Each URL gets its own reconnecting [`ConnectionManager`]. All nodes are contacted at
    /// once; a majority must answer within the connect timeout, and nodes that do not are
    /// kept and retried by every later call, so a manager can start while a minority is
    /// down.
    ///
    /// The locks behave like single-primary locks (same guard, waiting, backoff, drop and
    /// auto-extension) with these differences:
    ///
    /// - every acquire, extend and release goes to all N nodes at once, each node bounded
    ///   by [`node_timeout`](Self::with_node_timeout);
    /// - an acquire succeeds when a majority (`N/2 + 1`) set the lease and validity is left;
    ///   the guard's [`valid_until`](crate::LockGuard::valid_until) is
    ///   `start + ttl - drift`, so its remaining time is `ttl - elapsed - drift`. Any other
    ///   outcome releases the lease again on every node before returning;
    /// - "held by another owner" ([`Error::Contended`], [`Error::Timeout`]) when a majority
    ///   answered but not for us; [`Error::Quorum`] (with every node's answer) when too few
    ///   answered — returned at once, not waited out;
    /// - extend and auto-extension need a majority of all N nodes, or the lease is lost
    ///   ([`LostReason::NoQuorum`](crate::LostReason::NoQuorum)); a failed extend releases
    ///   nothing. A successful [`LockGuard::extend`](crate::LockGuard::extend) also sets
    ///   the lease again on nodes that lost it (restarted empty, or down at acquire);
    /// - release is sent to all N; see [`LockGuard::release`](crate::LockGuard::release);
    /// - waiters are woken by release notifications ([`notify`](Self::with_notify)): the
    ///   manager subscribes on every node (one connection per node), and the first node to
    ///   announce a release wakes one waiter; it counts as listening once subscribed on
    ///   `N - majority + 1` nodes, so one failed node cannot silence a release. Every wait
    ///   is still bounded by the holder's remaining TTL (as a majority reports it), the
    ///   backoff policy and the budget. Waiters are served first come, first served within
    ///   one manager; across managers in [fair mode](crate::LockOptions::with_fair), whose
    ///   queue lives on the key's first node (see the crate docs on
    ///   [several primaries](crate#several-primaries-redlock));
    /// - once contenders have collided on a key, a caller that found it held asks the key's
    ///   first node alone first and the other nodes only if it took the lease there, so
    ///   contenders meet on one node instead of splitting the vote; a failing first node
    ///   is skipped;
    /// - [`fencing_token`](crate::LockGuard::fencing_token) is `None`: see the crate docs
    ///   on [several primaries](crate#several-primaries-redlock).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no URL, a URL that does not parse, the same
    /// `host:port` listed twice (two entries on one server would let one failure count
    /// twice), or a bad option; [`Error::Quorum`] when fewer than a majority of nodes
    /// answered.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future abandons the connection attempts; nothing is left behind.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// use std::time::Duration;
    /// use distlock::LockManager;
    ///
    /// let locks = LockManager::builder()
    ///     .with_node_timeout(Duration::from_millis(50))
    ///     .connect_redlock([
    ///         "redis://10.0.0.1:6379",
    ///         "redis://10.0.0.2:6379",
    ///         "redis://10.0.0.3:6379",
    ///         "redis://10.0.0.4:6379",
    ///         "redis://10.0.0.5:6379",
    ///     ])
    ///     .await?;
    /// let guard = locks.lock("jobs:nightly").await?; // held on at least 3 of the 5
    /// assert_eq!(guard.fencing_token(), None);
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_redlock<I>(self, urls: I) -> Result<LockManager>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.check()?;
        let mut clients: Vec<(String, redis::Client)> = Vec::new();
        let mut seen = HashSet::new();
        for url in urls {
            let client = open_client(url.as_ref())?;
            let name = client.get_connection_info().addr().to_string();
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(
                    "nodes",
                    format!("{name} is listed twice; the nodes must be independent servers"),
                ));
            }
            clients.push((name, client));
        }
        crate::redlock::check_node_count(clients.len())?;

        // The per-call node timeout already bounds every call; the connection's response
        // timeout only stops a frozen server from piling up requests.
        let config = self.connection_config();
        let pubsub: Vec<redis::Client> = clients.iter().map(|(_, c)| c.clone()).collect();
        let mut conns = Vec::with_capacity(clients.len());
        for (name, client) in clients {
            // Lazy: a node that is down now is connected by a later call.
            let conn = ConnectionManager::new_lazy_with_config(client, config.clone())?;
            conns.push((name, conn));
        }

        let started = Instant::now();
        let limit = self.connect_timeout;
        let answers = crate::redlock::join_all(
            conns
                .iter()
                .map(|(_, conn)| {
                    let mut conn = conn.clone();
                    crate::redlock::bounded(limit, async move {
                        redis::cmd("PING")
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(Error::from)
                    })
                })
                .collect(),
        )
        .await;
        let quorum = crate::redlock::majority(conns.len());
        let reached = answers.iter().filter(|a| a.is_ok()).count();
        for ((name, _), answer) in conns.iter().zip(&answers) {
            if let Err(e) = answer {
                tracing::warn!(node = name, error = %e, "node unreachable at connect; later calls retry it");
            }
        }
        let nodes: Vec<Node<ConnectionManager>> = conns
            .into_iter()
            .map(|(name, conn)| Node::new(name, conn, self.notify))
            .collect();
        let store = RedlockStore::new(nodes, self.node_timeout);
        if reached < quorum {
            return Err(Error::Quorum(Box::new(QuorumError {
                operation: QuorumOperation::Connect,
                key: String::new(),
                needed: quorum,
                nodes: store.reports(answers, |()| NodeOutcome::Confirmed),
                elapsed: started.elapsed(),
                validity_ran_out: false,
            })));
        }
        // Listening on N - majority + 1 nodes hears every release a majority confirmed.
        let need = pubsub.len() - quorum + 1;
        let notifier = self
            .notify
            .then(|| Notifier::over(pubsub, need, self.connect_timeout, self.command_timeout));
        let store: Arc<dyn LeaseStore> = Arc::new(store);
        if self.replicas.is_some() {
            store.replica_acks()?;
        }
        Ok(LockManager::from_parts(
            store,
            notifier,
            self.prefix.into(),
            self.defaults,
            self.replicas,
        ))
    }

    /// Builds a manager whose locks hold on a majority of the independent Redis primaries
    /// behind `conns` (the Redlock algorithm), from connections you already have. Behaves as
    /// [`connect_redlock`](Self::connect_redlock) does, without contacting the nodes first;
    /// errors and logs name the nodes `node 0`, `node 1`, … in the order given.
    ///
    /// Each connection must reach a different server: distlock cannot tell two connections
    /// to one server apart, and such a pair would let one failure count twice.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no connection or a bad option.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn demo() -> distlock::Result<()> {
    /// let mut conns = Vec::new();
    /// for url in ["redis://10.0.0.1", "redis://10.0.0.2", "redis://10.0.0.3"] {
    ///     let client = redis::Client::open(url)?;
    ///     conns.push(client.get_multiplexed_async_connection().await?);
    /// }
    /// let locks = distlock::LockManager::builder().build_redlock(conns)?;
    /// let guard = locks.try_lock("cache:rebuild").await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn build_redlock<C, I>(self, conns: I) -> Result<LockManager>
    where
        I: IntoIterator<Item = C>,
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        self.check()?;
        let nodes: Vec<Node<C>> = conns
            .into_iter()
            .enumerate()
            .map(|(i, conn)| Node::new(format!("node {i}"), conn, self.notify))
            .collect();
        crate::redlock::check_node_count(nodes.len())?;
        let store = RedlockStore::new(nodes, self.node_timeout);
        self.with_notify(false).into_manager(Arc::new(store))
    }
}
