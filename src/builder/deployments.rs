//! Constructors for the deployments behind cargo features: Redis Sentinel, Redis
//! Cluster and ZooKeeper. Same builder, same configuration, one file so the builder stays readable.

#[cfg(any(feature = "cluster", feature = "zookeeper"))]
use std::sync::Arc;

use super::LockManagerBuilder;
#[cfg(feature = "cluster")]
use crate::connect::{check_server, connect_failed, open_client};
#[cfg(any(feature = "cluster", not(feature = "zookeeper")))]
use crate::error::Error;
use crate::error::Result;
use crate::manager::LockManager;
#[cfg(feature = "cluster")]
use crate::store::RedisStore;

#[cfg(any(feature = "sentinel", feature = "cluster"))]
impl LockManagerBuilder {
    /// Connects to the primary a set of Redis Sentinels name for `primary`, and follows it
    /// across failovers (cargo feature `sentinel`).
    ///
    /// `primary` is the service name the Sentinels monitor (`"mymaster"`), or a URL whose
    /// host is that name and which carries the primary's credentials and database
    /// (`"redis://app:secret@mymaster/0"`); the Sentinels' own credentials go in their URLs.
    /// Every command goes to the server the Sentinels named last; after a failure a failover
    /// explains (broken or silent link, `READONLY` from a demoted primary, `MASTERDOWN`) the
    /// next command asks them again. Such failures are transient
    /// ([`Error::is_transient`]): a waiting `lock` retries them within its budget.
    ///
    /// **What a failover does to leases.** Replication is asynchronous: a lease written
    /// just before the primary failed may be missing on the promoted replica, and then a
    /// second owner can take the lock. A manual failover (`SENTINEL FAILOVER`) waits for
    /// the replica to catch up and loses nothing. Use fencing tokens where that matters.
    ///
    /// Release notifications subscribe on the primary found at connect, and move to one of
    /// the replicas the Sentinels listed at connect when that server fails: a replica
    /// receives every publish of its primary, and is the primary after a failover. They
    /// keep working while any of those servers lives; waiters poll otherwise.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no Sentinel URL, a bad URL or an empty name;
    /// [`Error::Redis`] when no Sentinel names a reachable primary within the connect
    /// timeout.
    ///
    /// ```no_run
    /// async fn demo() -> distlock::Result<()> {
    ///     let locks = distlock::LockManager::builder()
    ///         .connect_sentinel(
    ///             ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"],
    ///             "mymaster",
    ///         )
    ///         .await?;
    ///     locks.lock("jobs:nightly").await?.release().await
    /// }
    /// ```
    #[cfg(feature = "sentinel")]
    pub async fn connect_sentinel<I>(mut self, sentinels: I, primary: &str) -> Result<LockManager>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.check()?;
        let sentinels: Vec<String> = sentinels
            .into_iter()
            .map(|u| u.as_ref().to_owned())
            .collect();
        let (service, auth) = crate::sentinel::service_and_auth(primary)?;
        let started = std::time::Instant::now();
        let conn = crate::sentinel::SentinelConnection::connect(
            sentinels.clone(),
            &service,
            auth,
            self.connect_timeout,
            self.command_timeout,
        )
        .await?;
        if self.pubsub.is_none() {
            // Subscribe on the primary, and move to a replica (which receives every
            // publish, and may be the primary after a failover) when it fails.
            self.pubsub = conn.primary_client();
            // Within what is left of the connect timeout: a Sentinel that does not answer
            // costs the connect no more than the timeout it was given.
            let left = self.connect_timeout.saturating_sub(started.elapsed());
            self.pubsub_alternatives = conn.replica_clients(&sentinels, &service, left).await;
        }
        self.connection_times_out = true;
        // Replica-acknowledged calls get connections of their own to the primary the
        // Sentinels name, opened when used.
        let lane = crate::store::AckLane::new(conn.clone(), self.command_timeout);
        self.build_with_lane(conn, Some(lane))
    }

    /// Connects to a Redis Cluster through any of its nodes (cargo feature `cluster`).
    ///
    /// One lock's keys share a hash tag, so each lock lives in one slot, on the primary
    /// that owns it; commands follow `MOVED`/`ASK` redirections (redis-rs' cluster
    /// connection). Auto-extension sends one call per slot per tick, never a `CROSSSLOT`
    /// batch.
    ///
    /// Release notifications use sharded pub/sub (Redis 7): a release is announced with
    /// `SPUBLISH` on the lock's channel, which shares the lock's hash tag, so only the
    /// nodes of the lock's shard carry it, and the manager listens with `SSUBSCRIBE` on
    /// that shard, over a cluster connection of its own that follows the slots: when a
    /// lock's slot moves, its channel is subscribed again where the slot went (the
    /// waiters poll meanwhile). With [`with_notify_via`](Self::with_notify_via) the
    /// manager uses classic pub/sub through that client instead, and announces with
    /// `PUBLISH`. Managers that compete for the same locks should agree: one that
    /// announces one way does not wake the waiters of one that listens the other way
    /// (they fall back to polling, bounded as always).
    ///
    /// A failover in a cluster is asynchronous like any Redis replication: a lease written
    /// just before its primary failed may be missing on the promoted replica.
    /// [`with_replicas`](Self::with_replicas) narrows that window: the write and `WAIT` go
    /// in one pipeline to the lock's primary, on cluster connections of their own.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for no URL or a bad one; [`Error::Redis`] when no node
    /// answers within the connect timeout.
    ///
    /// ```no_run
    /// async fn demo() -> distlock::Result<()> {
    ///     let locks = distlock::LockManager::builder()
    ///         .connect_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///         .await?;
    ///     locks.lock("jobs:nightly").await?.release().await
    /// }
    /// ```
    #[cfg(feature = "cluster")]
    pub async fn connect_cluster<I>(mut self, urls: I) -> Result<LockManager>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.check()?;
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let Some(first) = urls.first() else {
            return Err(Error::invalid("url", "no cluster node URL given"));
        };
        let clients = urls
            .iter()
            .map(|u| open_client(u))
            .collect::<Result<Vec<_>>>()?;
        let infos: Vec<redis::ConnectionInfo> = clients
            .iter()
            .map(|c| c.get_connection_info().clone())
            .collect();
        let client = redis::cluster::ClusterClientBuilder::new(infos.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.command_timeout)
            .build()
            .map_err(|e| Error::invalid("url", e.to_string()))?;
        let named = format!("{first} (cluster)");
        let mut conn =
            match tokio::time::timeout(self.connect_timeout, client.get_async_connection()).await {
                Ok(conn) => conn.map_err(|e| connect_failed(&named, e))?,
                Err(_) => {
                    return Err(Error::timed_out(format!(
                        "could not connect to the Redis Cluster at {} within {:?}",
                        crate::connect::redacted(&named),
                        self.connect_timeout
                    )));
                }
            };
        check_server(&mut conn, first, true).await?;
        // Releases are announced with `SPUBLISH` and heard with `SSUBSCRIBE` on the lock's
        // shard, unless the caller chose a client to subscribe through: then classic
        // pub/sub, which a cluster carries to every node.
        let sharded = self.pubsub.is_none();
        if sharded {
            self.pubsub_shards = Some(infos.clone());
        }
        // Replica-acknowledged calls get cluster connections of their own (a `WAIT` blocks
        // the link it is sent on), opened when used; no response timeout of their own:
        // the lane bounds each pipeline by the command timeout plus the `WAIT` timeout.
        let acks = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(self.connect_timeout)
            .build()
            .map_err(|e| Error::invalid("url", e.to_string()))?;
        let lane = crate::store::AckLane::new(
            crate::store::ClusterSource { client: acks },
            self.command_timeout,
        );
        let mut store = RedisStore::new(conn, None, self.notify).with_ack_lane(lane);
        if sharded {
            store = store.with_sharded_announcements();
        }
        self.into_manager(Arc::new(crate::cluster::ClusterStore::new(store)))
    }
}

impl LockManagerBuilder {
    /// Connects to a ZooKeeper ensemble (`zk://host1:2181,host2:2181/chroot`, `zookeeper`
    /// feature) and builds a manager whose locks are ephemeral sequential nodes: fair
    /// (first come, first served), the lease is the session, the fencing token the node's
    /// creation zxid. [`connect`](Self::connect) calls it for a `zk://` URL. See the crate
    /// docs on [ZooKeeper](crate#redis-or-zookeeper) for what the options mean there: the
    /// default options' TTL is the session timeout asked for (the server negotiates it).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad URL or prefix, or without the `zookeeper`
    /// feature; `Error::ZooKeeper` when no session could be opened within the connect
    /// timeout.
    pub async fn connect_zookeeper(self, url: &str) -> Result<LockManager> {
        self.check()?;
        #[cfg(feature = "zookeeper")]
        {
            use crate::zookeeper::{Sessions, Target, ZkStore};
            let target = Target::parse(url)?;
            let timeout = self.defaults.ttl();
            let sessions = Sessions::open(target, timeout, self.connect_timeout).await?;
            let store = ZkStore::new(sessions, &self.prefix, self.command_timeout)?;
            self.with_notify(false).into_manager(Arc::new(store))
        }
        #[cfg(not(feature = "zookeeper"))]
        Err(Error::invalid(
            "url",
            format!("{url}: ZooKeeper needs distlock's `zookeeper` cargo feature"),
        ))
    }
}
