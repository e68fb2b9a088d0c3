//! Replica-acknowledged writes: a lease command followed by `WAIT n timeout` in one
//! pipeline, on the primary that ran the command.
//!
//! `WAIT` counts the writes of the connection it is sent on and blocks that connection
//! until enough replicas acknowledged them or the timeout passed. On the store's shared,
//! multiplexed connection every command queued behind it would wait as long (up to the
//! timeout when a replica lags), so a store that can open connections keeps a small lane of
//! its own ([`AckLane`]): each replica-acknowledged call borrows one connection of it for
//! its pipeline alone and gives it back when the reply is in (on a Redis Cluster, each
//! connection of the lane is a cluster connection of its own, and the pipeline goes to the
//! primary of the lock's slot). Plain locks never queue
//! behind a `WAIT`; replica-acknowledged calls wait for each other only beyond
//! [`ACK_CONNECTIONS`] at once.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{RedisResult, Value};

use super::{Acquire, BoxFuture, Extension, NodeAnswer, RENEWALS_PER_CALL, RedisStore};
use super::{answer, fence_ttl_ms};
use crate::error::{Error, Result};
use crate::key::{LockKey, Token};
use crate::options::{Replicas, Ttl};
use crate::protocol::{Script, script};

/// The most connections a lane keeps: replica-acknowledged calls beyond this many at once
/// wait for a connection to come back.
pub(crate) const ACK_CONNECTIONS: usize = 8;

/// A connection of an [`AckLane`]: to one primary, or a cluster connection of its own
/// (which sends each pipeline to the primary of its keys' slot).
pub(crate) enum AckConn {
    /// A single server, or the primary the Sentinels name.
    Single(MultiplexedConnection),
    /// A Redis Cluster: a pipeline goes to the primary of its first key's slot, and `WAIT`
    /// (which has no key) rides along to that primary instead of being broadcast.
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl AckConn {
    async fn run(&mut self, pipe: &redis::Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
        match self {
            AckConn::Single(conn) => pipe.query_async(conn).await,
            #[cfg(feature = "cluster")]
            AckConn::Cluster(conn) => pipe.query_async(conn).await,
        }
    }
}

/// Opens connections to the primary for an [`AckLane`].
pub(crate) trait AckSource: Send + Sync + 'static {
    /// A new connection to the current primary, and the generation of the primary it
    /// reaches.
    fn open(&self) -> BoxFuture<'_, RedisResult<(u64, AckConn)>>;

    /// The generation of the current primary, if known: connections of another one are
    /// not reused. A single server is always generation 0.
    fn generation(&self) -> Option<u64> {
        Some(0)
    }
}

/// A single server, through its client.
pub(crate) struct ClientSource {
    pub(crate) client: redis::Client,
    pub(crate) connect_timeout: Duration,
}

impl AckSource for ClientSource {
    fn open(&self) -> BoxFuture<'_, RedisResult<(u64, AckConn)>> {
        Box::pin(async move {
            // No response timeout of the connection's own: the lane bounds each pipeline by
            // the command timeout plus the `WAIT` timeout.
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(None);
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok((0, AckConn::Single(conn)))
        })
    }
}

/// A Redis Cluster, through its client: each lane connection is a cluster connection of
/// its own (one link per primary, opened as it is used).
#[cfg(feature = "cluster")]
pub(crate) struct ClusterSource {
    /// Built without a response timeout: the lane bounds each pipeline.
    pub(crate) client: redis::cluster::ClusterClient,
}

#[cfg(feature = "cluster")]
impl AckSource for ClusterSource {
    fn open(&self) -> BoxFuture<'_, RedisResult<(u64, AckConn)>> {
        Box::pin(async move {
            let conn = self.client.get_async_connection().await?;
            Ok((0, AckConn::Cluster(conn)))
        })
    }
}

#[cfg(feature = "sentinel")]
impl AckSource for crate::sentinel::SentinelConnection {
    fn open(&self) -> BoxFuture<'_, RedisResult<(u64, AckConn)>> {
        Box::pin(async move {
            let (generation, conn) = self.open_dedicated().await?;
            Ok((generation, AckConn::Single(conn)))
        })
    }

    fn generation(&self) -> Option<u64> {
        self.primary_generation()
    }
}

/// Connections used only for replica-acknowledged pipelines, one caller at a time each.
pub(crate) struct AckLane {
    source: Box<dyn AckSource>,
    idle: Mutex<Vec<(u64, AckConn)>>,
    permits: tokio::sync::Semaphore,
    /// The command timeout: a pipeline is bounded by it plus the `WAIT` timeout.
    command_timeout: Duration,
}

impl AckLane {
    pub(crate) fn new(source: impl AckSource, command_timeout: Duration) -> Self {
        AckLane {
            source: Box::new(source),
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(ACK_CONNECTIONS),
            command_timeout,
        }
    }

    /// Runs `pipe` on a connection of its own. The connection goes back to the lane only
    /// after a reply: a call dropped mid-flight, or one whose link failed, closes it (its
    /// `WAIT` may still hold it on the server).
    async fn run(&self, pipe: &redis::Pipeline) -> RedisResult<Vec<RedisResult<Value>>> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| crate::error::timed_out("the replica connection lane is closed"))?;
        let current = self.source.generation();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            // Connections to a primary the Sentinels no longer name are closed.
            idle.retain(|(g, _)| current.is_none_or(|now| now == *g));
            idle.pop()
        };
        let (generation, mut conn) = match found {
            Some(found) => found,
            None => self.source.open().await?,
        };
        let result = conn.run(pipe).await;
        if result.is_ok() {
            self.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((generation, conn));
        }
        result
    }
}

/// `WAIT`'s answer: how many replicas acknowledged.
fn acknowledged(reply: Option<RedisResult<Value>>) -> Result<u32> {
    let value = reply
        .ok_or_else(|| Error::unexpected_reply("no reply to WAIT"))?
        .map_err(Error::Redis)?;
    let count: i64 = redis::from_redis_value(value)
        .map_err(|e| Error::unexpected_reply(format!("WAIT answered {e}")))?;
    u32::try_from(count).map_err(|_| Error::unexpected_reply(format!("WAIT answered {count}")))
}

/// The error of a write fewer replicas acknowledged than asked.
pub(crate) fn not_replicated(key: &LockKey, acknowledged: u32, replicas: Replicas) -> Error {
    Error::NotReplicated {
        key: key.display(),
        acknowledged,
        requested: replicas.count(),
        timeout: replicas.timeout(),
    }
}

/// `Ok(())` when enough replicas acknowledged.
fn enough(key: &LockKey, acked: u32, replicas: Replicas) -> Result<()> {
    if acked >= replicas.count() {
        Ok(())
    } else {
        Err(not_replicated(key, acked, replicas))
    }
}

fn is_noscript(reply: Option<&RedisResult<Value>>) -> bool {
    matches!(reply, Some(Err(e)) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Sends `commands` then `WAIT`, in one pipeline, on the lane (or, without one, on the
    /// store's connection); returns each command's reply and `WAIT`'s count.
    async fn with_wait(
        &self,
        commands: &[redis::Cmd],
        replicas: Replicas,
    ) -> Result<(Vec<RedisResult<Value>>, u32)> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for cmd in commands {
            pipe.add_command(cmd.clone());
        }
        pipe.cmd("WAIT")
            .arg(replicas.count())
            .arg(replicas.timeout_ms());
        let mut replies = match &self.acks {
            Some(lane) => {
                let limit = lane.command_timeout + replicas.timeout();
                tokio::time::timeout(limit, lane.run(&pipe))
                    .await
                    .map_err(|_| {
                        Error::timed_out(format!(
                            "no reply from Redis within {limit:?} (command timeout + replica timeout)"
                        ))
                    })??
            }
            None => {
                let mut conn = self.conn.clone();
                self.bounded(pipe.query_async(&mut conn)).await?
            }
        };
        let acked = acknowledged(replies.pop())?;
        Ok((replies, acked))
    }

    /// A script call then `WAIT`: by SHA, and by body again if the server lost the script.
    async fn script_with_wait(
        &self,
        script: &Script,
        call: &(dyn Fn(&mut redis::Cmd) + Sync),
        replicas: Replicas,
    ) -> Result<(RedisResult<Value>, u32)> {
        let (mut replies, mut acked) = self
            .with_wait(&[self.script_cmd(script, false, call)], replicas)
            .await?;
        if is_noscript(replies.first()) {
            (replies, acked) = self
                .with_wait(&[self.script_cmd(script, true, call)], replicas)
                .await?;
        }
        let reply = replies
            .pop()
            .ok_or_else(|| Error::unexpected_reply("no reply to the script"))?;
        Ok((reply, acked))
    }

    /// [`acquire_here`](Self::acquire_here) followed by `WAIT`: the lease when it was free
    /// and enough replicas acknowledged it; [`Error::NotReplicated`] when it was taken here
    /// but too few did (the caller releases it).
    pub(crate) async fn acquire_replicated_here(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        fenced: bool,
        replicas: Replicas,
    ) -> Result<Acquire> {
        let outcome = if fenced && self.fences {
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(2)
                    .arg(key.lease())
                    .arg(key.fence())
                    .arg(token.as_bytes())
                    .arg(ttl.as_millis())
                    .arg(fence_ttl_ms(ttl));
            };
            let (reply, acked) = self
                .script_with_wait(&script::ACQUIRE_FENCED, &call, replicas)
                .await?;
            let (taken, value): (i64, i64) = redis::from_redis_value(reply?)
                .map_err(|e| Error::unexpected_reply(e.to_string()))?;
            let outcome = match taken {
                1 => Acquire::Taken {
                    fence: Some(u64::try_from(value).map_err(|_| {
                        Error::unexpected_reply(format!("negative fencing token {value}"))
                    })?),
                },
                0 => Acquire::Held {
                    pttl: u64::try_from(value).ok().map(Duration::from_millis),
                    holder: None,
                },
                other => {
                    return Err(Error::unexpected_reply(format!("acquire returned {other}")));
                }
            };
            (outcome, acked)
        } else {
            let set = super::acquire::set_if_free(key, token, ttl);
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(key.lease());
            // PTTL rides along: a contended attempt needs no second round trip.
            let (mut replies, acked) = self.with_wait(&[set, pttl], replicas).await?;
            let pttl = replies
                .pop()
                .ok_or_else(|| Error::unexpected_reply("no reply to PTTL"))??;
            let held = replies
                .pop()
                .ok_or_else(|| Error::unexpected_reply("no reply to SET"))??;
            let outcome = if held == Value::Nil {
                Acquire::Taken { fence: None }
            } else {
                let pttl: i64 = redis::from_redis_value(pttl)
                    .map_err(|e| Error::unexpected_reply(e.to_string()))?;
                super::acquire::held_by(&held, pttl)
            };
            (outcome, acked)
        };
        match outcome {
            (Acquire::Taken { .. }, acked) => enough(key, acked, replicas).map(|()| outcome.0),
            // Nothing was written: how many acknowledged does not matter.
            (held, _) => Ok(held),
        }
    }

    /// [`extend_here`](Self::extend_here) followed by `WAIT`: [`Error::NotReplicated`] when
    /// the primary extended the lease but too few replicas acknowledged it.
    pub(crate) async fn extend_replicated_here(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        replicas: Replicas,
    ) -> Result<NodeAnswer> {
        let call = |cmd: &mut redis::Cmd| {
            cmd.arg(1)
                .arg(key.lease())
                .arg(token.as_bytes())
                .arg(ttl.as_millis());
        };
        let (reply, acked) = self
            .script_with_wait(&script::EXTEND, &call, replicas)
            .await?;
        let code: i64 =
            redis::from_redis_value(reply?).map_err(|e| Error::unexpected_reply(e.to_string()))?;
        match answer(code)? {
            NodeAnswer::Done => enough(key, acked, replicas).map(|()| NodeAnswer::Done),
            refused => Ok(refused),
        }
    }

    /// [`extend_many_here`](Self::extend_many_here) followed by `WAIT`, per call of
    /// [`RENEWALS_PER_CALL`] leases; a lease extended without enough acknowledgements is
    /// [`Error::NotReplicated`].
    pub(crate) async fn extend_many_replicated_here(
        &self,
        batch: &[Extension],
        replicas: Replicas,
    ) -> Vec<Result<NodeAnswer>> {
        let mut out = Vec::with_capacity(batch.len());
        for chunk in batch.chunks(RENEWALS_PER_CALL) {
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(chunk.len());
                for extension in chunk {
                    cmd.arg(extension.key.lease());
                }
                for extension in chunk {
                    cmd.arg(extension.token.as_bytes())
                        .arg(extension.ttl.as_millis());
                }
            };
            let codes = self
                .script_with_wait(&script::EXTEND_MANY, &call, replicas)
                .await
                .and_then(|(reply, acked)| {
                    let codes: Vec<i64> = redis::from_redis_value(reply?)
                        .map_err(|e| Error::unexpected_reply(e.to_string()))?;
                    if codes.len() != chunk.len() {
                        return Err(Error::unexpected_reply(format!(
                            "{} results for {} leases",
                            codes.len(),
                            chunk.len()
                        )));
                    }
                    Ok((codes, acked))
                });
            match codes {
                Ok((codes, acked)) => {
                    out.extend(
                        codes
                            .into_iter()
                            .zip(chunk)
                            .map(|(code, extension)| match answer(code)? {
                                NodeAnswer::Done => enough(&extension.key, acked, replicas)
                                    .map(|()| NodeAnswer::Done),
                                refused => Ok(refused),
                            }),
                    );
                }
                Err(err) => out.extend(chunk.iter().map(|_| Err(err.clone()))),
            }
        }
        out
    }
}
