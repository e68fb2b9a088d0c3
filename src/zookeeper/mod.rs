//! Leases on ZooKeeper (`zookeeper` feature): Curator's `InterProcessMutex` recipe behind
//! the [`LeaseStore`] seam.
//!
//! - Acquire: an ephemeral sequential child of the lock's node, named after the attempt's
//!   token (`path`); after a connection loss during the create, the owner finds its node by
//!   that name. The lowest sequence holds the lock; its creation zxid is the fencing token
//!   (strictly increasing over the whole ensemble).
//! - Wait ([`acquire_waiting`](LeaseStore::acquire_waiting)): watch only the immediate
//!   predecessor (no herd on release), first come first served; a waiter that gives up
//!   deletes its node, one that is cancelled has it deleted in the background by the
//!   manager's abandoned-acquire release (by token), which keeps trying for as long as the
//!   session lives: a create sent while disconnected can reach the server much later.
//! - Release: delete the node. Extend: a `sync` through the leader, then a read that finds
//!   the node owned by the current session; it keeps the session alive, so the lease's
//!   belief counts from its send time with half the negotiated session timeout as TTL
//!   ([`session_ttl`](LeaseStore::session_ttl)).
//!   A session that expired loses its leases (`Expired`); the next call opens a new one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zookeeper_client as zk;

mod path;
mod session;

use crate::error::{Error, LostReason, Result};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::redlock::join_all;
use crate::store::{Acquire, BoxFuture, Extension, LeaseStore, Verdict};

pub(crate) use session::{Sessions, Target};
use session::{bounded, connection_lost, zk_error};

/// A pause before a step is tried again after a connection loss inside a wait.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// A pause between tries of a background release while its session is disconnected.
const BACKGROUND_PAUSE: Duration = Duration::from_millis(200);

/// One lock node this store created and has not seen deleted.
#[derive(Debug, Clone)]
struct Node {
    path: String,
    session: i64,
    czxid: i64,
}

/// Leases on one ZooKeeper ensemble.
pub(crate) struct ZkStore {
    sessions: Sessions,
    /// The directory of every lock of this manager (from the key prefix).
    base: String,
    command_timeout: Duration,
    /// The nodes of live attempts and leases, by token: a release or extend is one request.
    nodes: Mutex<HashMap<Token, Node>>,
}

impl ZkStore {
    pub(crate) fn new(
        sessions: Sessions,
        prefix: &[u8],
        command_timeout: Duration,
    ) -> Result<Self> {
        Ok(ZkStore {
            sessions,
            base: path::base_dir(prefix)?,
            command_timeout,
            nodes: Mutex::new(HashMap::new()),
        })
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<Token, Node>> {
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn dir(&self, key: &LockKey) -> Result<String> {
        path::lock_dir(&self.base, key.name())
    }

    /// Creates this attempt's node (and the lock's container node if needed); finds it
    /// after a connection loss. Returns the node.
    async fn create(&self, client: &zk::Client, dir: &str, token: &Token) -> Result<Node> {
        let prefix = path::node_prefix(dir, token);
        let ephemeral = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let container = zk::CreateMode::Container.with_acls(zk::Acls::anyone_all());
        let session = client.session_id().0;
        let mut made_dir = 0;
        loop {
            match client.create(&prefix, &[], &ephemeral).await {
                Ok((stat, sequence)) => {
                    let node = Node {
                        path: format!("{prefix}{sequence}"),
                        session,
                        czxid: stat.czxid,
                    };
                    self.nodes().insert(*token, node.clone());
                    return Ok(node);
                }
                // The lock's node does not exist (first use, or a container the server
                // removed while empty): create it, then try again.
                Err(zk::Error::NoNode) if made_dir < 3 => {
                    made_dir += 1;
                    match client.mkdir(dir, &container).await {
                        Ok(()) | Err(zk::Error::NodeExists) => {}
                        Err(e) => return Err(zk_error(e)),
                    }
                }
                // The create may or may not have run: look for the node by its name (the
                // ZOOKEEPER-1262 trap). Requests of one session run in order, so the
                // listing sees it if it was made.
                Err(e) if connection_lost(&e) => loop {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    match self.find(client, dir, token).await {
                        Ok(Some(node)) => return Ok(node),
                        Ok(None) => break,
                        Err(e)
                            if e.is_transient() && client.state() != zk::SessionState::Expired => {}
                        Err(e) => return Err(e),
                    }
                },
                Err(e) => return Err(zk_error(e)),
            }
        }
    }

    /// This attempt's node under `dir`, if it exists.
    async fn find(&self, client: &zk::Client, dir: &str, token: &Token) -> Result<Option<Node>> {
        let children = match client.list_children(dir).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(zk_error(e)),
        };
        let Some(name) = children.iter().find(|c| path::is_own(c, token)) else {
            return Ok(None);
        };
        let path = format!("{dir}/{name}");
        let Some(stat) = client.check_stat(&path).await.map_err(zk_error)? else {
            return Ok(None);
        };
        let node = Node {
            path,
            session: stat.ephemeral_owner,
            czxid: stat.czxid,
        };
        self.nodes().insert(*token, node.clone());
        Ok(Some(node))
    }

    /// Where `node` stands in its lock's queue: `None` if it is gone, `Some(None)` if it
    /// holds the lock, else the path of its predecessor.
    async fn standing(
        &self,
        client: &zk::Client,
        dir: &str,
        node: &Node,
    ) -> Result<Option<Option<String>>> {
        let children = match client.list_children(dir).await {
            Ok(children) => children,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(zk_error(e)),
        };
        let own = node.path.rsplit('/').next().unwrap_or_default();
        Ok(path::standing(&children, own)
            .map(|predecessor| predecessor.map(|name| format!("{dir}/{name}"))))
    }

    /// Deletes the node of `token`: `Done` if this call deleted it, `Expired` if it was
    /// gone (its session ended, or it was released before).
    async fn delete(&self, key: &LockKey, token: &Token) -> Result<Verdict> {
        let known = self.nodes().get(token).cloned();
        let Some(client) = self.sessions.live() else {
            // No live session: the session that made the node is over, and the node with it.
            self.nodes().remove(token);
            return Ok(Verdict::Lost(LostReason::Expired));
        };
        let node = match known {
            Some(node) => node,
            None => {
                let Ok(dir) = self.dir(key) else {
                    return Ok(Verdict::Lost(LostReason::Expired));
                };
                match self.find(&client, &dir, token).await? {
                    Some(node) => node,
                    None => return Ok(Verdict::Lost(LostReason::Expired)),
                }
            }
        };
        if node.session != client.session_id().0 {
            // Made by a session that is over: the server deleted it with that session.
            self.nodes().remove(token);
            return Ok(Verdict::Lost(LostReason::Expired));
        }
        let verdict = match client.delete(&node.path, None).await {
            Ok(()) => Verdict::Done,
            Err(zk::Error::NoNode | zk::Error::SessionExpired) => {
                Verdict::Lost(LostReason::Expired)
            }
            Err(e) => return Err(zk_error(e)),
        };
        self.nodes().remove(token);
        Ok(verdict)
    }

    /// Catches the current session's server up with the leader (`sync` goes through the
    /// leader): a read after it is not a stale answer from a follower that lost the leader.
    /// A session that is over is left to [`confirm`](Self::confirm) to report.
    async fn sync(&self) -> Result<()> {
        let Some(client) = self.sessions.live() else {
            return Ok(());
        };
        match client.sync("/").await {
            Ok(()) | Err(zk::Error::SessionExpired) => Ok(()),
            Err(e) => Err(zk_error(e)),
        }
    }

    /// Confirms that the node of `token` exists and belongs to the current session: one
    /// read after a [`sync`](Self::sync), which also keeps the session alive.
    async fn confirm(&self, token: &Token) -> Result<Verdict> {
        let Some(node) = self.nodes().get(token).cloned() else {
            return Ok(Verdict::Lost(LostReason::Expired));
        };
        let Some(client) = self.sessions.live() else {
            return Ok(Verdict::Lost(LostReason::Expired));
        };
        if node.session != client.session_id().0 {
            return Ok(Verdict::Lost(LostReason::Expired));
        }
        match client.check_stat(&node.path).await {
            Ok(Some(stat)) if stat.ephemeral_owner == node.session => Ok(Verdict::Done),
            Ok(Some(_)) => Ok(Verdict::Lost(LostReason::Taken)),
            Ok(None) | Err(zk::Error::SessionExpired) => Ok(Verdict::Lost(LostReason::Expired)),
            Err(e) => Err(zk_error(e)),
        }
    }

    /// One attempt: create, look, and leave again unless it holds the lock.
    async fn try_once(&self, key: &LockKey, token: &Token) -> Result<Acquire> {
        let dir = self.dir(key)?;
        let client = self.sessions.client().await?;
        let node = self.create(&client, &dir, token).await?;
        match self.standing(&client, &dir, &node).await? {
            Some(None) => Ok(Acquire::Taken {
                fence: fence(node.czxid),
            }),
            Some(Some(_)) => {
                self.leave(key, token).await?;
                Ok(Acquire::Held {
                    pttl: None,
                    holder: None,
                })
            }
            None => Err(vanished()),
        }
    }

    /// Waits in the queue until the lock is ours or `deadline`.
    async fn queue(
        &self,
        key: &LockKey,
        token: &Token,
        deadline: Instant,
    ) -> Result<(Acquire, Instant)> {
        let dir = self.dir(key)?;
        let client = bounded("session", self.command_timeout, self.sessions.client()).await?;
        let node = bounded(
            "create",
            self.command_timeout,
            self.create(&client, &dir, token),
        )
        .await?;
        loop {
            let asked = Instant::now();
            let step = async {
                // Synced first: `asked` is the validity base if this look finds the lock
                // ours, so the look must not come from a follower cut off from the leader.
                client.sync("/").await.map_err(zk_error)?;
                let Some(predecessor) = self.standing(&client, &dir, &node).await? else {
                    return Err(vanished());
                };
                let Some(predecessor) = predecessor else {
                    return Ok(None);
                };
                // Watch the predecessor alone: its deletion wakes this waiter and nobody
                // else. Gone already: look again.
                match client.check_and_watch_stat(&predecessor).await {
                    Ok((Some(_), watcher)) => Ok(Some(Some(watcher))),
                    Ok((None, _)) => Ok(Some(None)),
                    Err(e) => Err(zk_error(e)),
                }
            };
            let step = tokio::time::timeout_at(deadline.into(), step).await;
            match step {
                Ok(Ok(None)) => {
                    return Ok((
                        Acquire::Taken {
                            fence: fence(node.czxid),
                        },
                        asked,
                    ));
                }
                Ok(Ok(Some(None))) => continue,
                Ok(Ok(Some(Some(watcher)))) => {
                    let woken = tokio::time::timeout_at(deadline.into(), watcher.changed()).await;
                    if woken.is_ok() {
                        continue;
                    }
                }
                Ok(Err(e)) if e.is_transient() && client.state() != zk::SessionState::Expired => {
                    tracing::debug!(error = %e, "ZooKeeper wait step failed; trying again");
                    if Instant::now() + RETRY_PAUSE < deadline {
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                    return Err(e);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {}
            }
            // The budget is spent: leave the queue. If the delete fails, the error keeps
            // the manager's abandoned-acquire release armed, which deletes it later.
            self.leave(key, token).await?;
            return Ok((
                Acquire::Held {
                    pttl: None,
                    holder: None,
                },
                asked,
            ));
        }
    }

    /// Deletes this attempt's node within the command timeout.
    async fn leave(&self, key: &LockKey, token: &Token) -> Result<()> {
        bounded("delete", self.command_timeout, self.delete(key, token))
            .await
            .map(drop)
    }
}

/// The fencing token of a node: its creation zxid (never negative on a real server).
fn fence(czxid: i64) -> Option<u64> {
    u64::try_from(czxid).ok()
}

/// The attempt's node is not in the queue any more: its session ended.
fn vanished() -> Error {
    zk_error(zk::Error::SessionExpired)
}

impl LeaseStore for ZkStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        _ttl: Ttl,
        _fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(bounded(
            "acquire",
            self.command_timeout,
            self.try_once(key, token),
        ))
    }

    fn fences(&self) -> bool {
        true
    }

    fn replica_acks(&self) -> Result<()> {
        // A ZooKeeper write is acknowledged by a quorum already.
        Err(crate::store::no_replicas("a ZooKeeper manager"))
    }

    fn extend<'a>(
        &'a self,
        _key: &'a LockKey,
        token: &'a Token,
        _ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(bounded("extend", self.command_timeout, async move {
            self.sync().await?;
            self.confirm(token).await
        }))
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(bounded(
            "release",
            self.command_timeout,
            self.delete(key, token),
        ))
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            // A create sent while the session was disconnected waits in the client and
            // reaches the server when the session reconnects, maybe long after its caller
            // gave up; its node then lives as long as the session, not for a TTL. So keep
            // trying for as long as the session that may have made it lives: once it is
            // connected, the listing runs after the create (one session's requests run in
            // order) and the answer is final; a session that stays away ends, and the
            // server deletes its nodes with it.
            let session = self.sessions.live().map(|client| client.session_id());
            loop {
                let out = bounded("release", self.command_timeout, self.delete(key, token)).await;
                let same = session.is_some()
                    && self.sessions.live().map(|client| client.session_id()) == session;
                match out {
                    Err(e) if e.is_transient() && same => {
                        tracing::debug!(error = %e, "ZooKeeper release failed; trying again while the session lives");
                        tokio::time::sleep(BACKGROUND_PAUSE).await;
                    }
                    out => return out,
                }
            }
        })
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            // One sync for the batch, then one read per lease, all in flight at once on the
            // session's connection.
            let synced = bounded("sync", self.command_timeout, self.sync()).await;
            if let Err(e) = synced {
                return batch.iter().map(|_| Err(e.clone())).collect();
            }
            let calls = batch
                .iter()
                .map(|extension| {
                    bounded(
                        "extend",
                        self.command_timeout,
                        self.confirm(&extension.token),
                    )
                })
                .collect();
            join_all(calls).await
        })
    }

    fn session_ttl(&self) -> Option<Ttl> {
        // Half the negotiated timeout: the leader expires sessions by the activity its
        // followers report on their pings (every half tick, a tick being at most half the
        // timeout), so it may know of a request of ours only later than it was sent; and a
        // lease is confirmed every sixth of the timeout. See the README.
        Ttl::new(self.sessions.timeout() / 2).ok()
    }

    fn acquire_waiting<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<(Acquire, Instant)>>> {
        Some(Box::pin(self.queue(key, token, deadline)))
    }
}
