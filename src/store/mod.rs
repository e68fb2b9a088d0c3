//! Where a lease lives: the only code that sends lease commands to Redis.
//!
//! [`LeaseStore`] is the seam between the lock logic (waiting, guards, drop-release) and the
//! servers: acquire, extend and release one lease. [`RedisStore`] keeps leases on one
//! primary; other stores (several primaries) implement the same trait, and the manager and
//! guard code stay as they are.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use crate::error::{Error, LostReason, Result};
use crate::key::{LockKey, Token};
use crate::options::{Replicas, Ttl};
use crate::protocol::{Script, script};

mod acquire;
mod background;
mod lease_store;
mod queue;
mod release;
mod replicas;
mod scripts;

pub(crate) use background::{release_in_background, release_retrying};
pub(crate) use scripts::ScriptRunner;

pub(crate) use queue::{Queue, no_queue};
#[cfg(feature = "cluster")]
pub(crate) use replicas::ClusterSource;
pub(crate) use replicas::{AckLane, ClientSource};

/// A boxed, `Send` future borrowed for `'a`.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one acquire attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// The lease is ours; `fence` is its fencing token, where the store can give one.
    Taken { fence: Option<u64> },
    /// Another owner holds the key; `pttl` is how long its lease has left, if known, and
    /// `holder` a hash of the holder's token where the server's answer named it (over
    /// several primaries, answers from different holders tell a split vote from a lost
    /// race).
    Held {
        pttl: Option<Duration>,
        holder: Option<u64>,
    },
}

/// What one server's compare-and-act command (extend, release) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeAnswer {
    /// The key held our token and the command took effect.
    Done,
    /// The key was gone: the lease expired.
    Expired,
    /// The key holds another token (or a value of another type).
    Taken,
}

/// What a store's compare-and-act call comes to for the lease: done, or the lease is lost
/// and why. A store over one server answers with its [`NodeAnswer`]; a store over several
/// counts theirs (and may answer [`LostReason::NoQuorum`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The command took effect where it had to.
    Done,
    /// The lease is gone.
    Lost(LostReason),
}

impl From<NodeAnswer> for Verdict {
    fn from(answer: NodeAnswer) -> Self {
        match answer {
            NodeAnswer::Done => Verdict::Done,
            NodeAnswer::Expired => Verdict::Lost(LostReason::Expired),
            NodeAnswer::Taken => Verdict::Lost(LostReason::Taken),
        }
    }
}

/// What passing a lease to the next waiter came to (see [`LeaseStore::pass`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Passed {
    /// The lease now holds the next holder's token where it had to, with validity left.
    Passed,
    /// It did not: the store released the holder's lease instead (and whatever the pass
    /// may have set), and this is that release's verdict.
    Released(Verdict),
}

/// Acquire, extend and release one lease. Implementations bound every call in time.
pub(crate) trait LeaseStore: Send + Sync + 'static {
    /// `SET key token NX PX ttl`; with `fenced`, also a fencing token on success (only
    /// where [`fences`](Self::fences) says the store can give one).
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>>;

    /// [`acquire`](Self::acquire) by a caller that found the lock held before: a store
    /// may order its work so that contenders collide cheaply (several primaries ask the
    /// key's first node alone first).
    fn acquire_contended<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        self.acquire(key, token, ttl, fenced)
    }

    /// Whether this store can hand out fencing tokens with the guarantee they promise
    /// (strictly increasing per lock).
    fn fences(&self) -> bool;

    /// Compare-and-`PEXPIRE`.
    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>>;

    /// Compare-and-delete.
    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>>;

    /// Compare-and-delete in the background, after a failure or for an abandoned acquire:
    /// sent so that it needs no script cache on the server (see
    /// [`RedisStore::release_by_body`]).
    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>>;

    /// Compare-and-`PEXPIRE` for many leases at once, in as few round trips as the store
    /// allows: one verdict (or error) per lease, in order.
    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>>;

    /// Whether a holder's release may [`pass`](Self::pass) the lease to the next waiter of
    /// its manager.
    fn passes(&self) -> bool {
        false
    }

    /// Ends the lease of `from` by handing it to `to` for `ttl` (validity counted from
    /// before the call), or, where that does not take, by releasing it: never leaves `to`'s
    /// lease behind unless it answers [`Passed::Passed`]. An error leaves both tokens to
    /// the caller to release.
    fn pass<'a>(
        &'a self,
        key: &'a LockKey,
        from: &'a Token,
        _to: &'a Token,
        _ttl: Ttl,
    ) -> BoxFuture<'a, Result<Passed>> {
        Box::pin(async move { Ok(Passed::Released(self.release(key, from).await?)) })
    }

    /// Whether this store keeps a waiter queue beside the lease (fair mode).
    fn queues(&self) -> bool {
        false
    }

    /// Fair mode's acquire: the lease if it is free and the caller heads the queue (or
    /// nobody queues); otherwise the caller queues as `queue` says. Only where
    /// [`queues`](Self::queues) says so.
    fn acquire_queued<'a>(
        &'a self,
        _key: &'a LockKey,
        _token: &'a Token,
        _ttl: Ttl,
        _fenced: bool,
        _queue: Queue<'a>,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(std::future::ready(Err(no_queue())))
    }

    /// Fair mode: `waiter` leaves the queue of `key`.
    fn leave_queue<'a>(
        &'a self,
        _key: &'a LockKey,
        _waiter: &'a [u8],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(std::future::ready(Err(no_queue())))
    }

    /// For a store whose lease is its session (ZooKeeper): the TTL of every lease, derived
    /// from the session's timeout, whatever TTL the caller asked for. Such leases are always
    /// auto-extended: an extension is a request that confirms the session and the lease, so
    /// the belief counts from its send time as for a TTL. `None` (the default): leases have
    /// the TTL the caller asked for.
    fn session_ttl(&self) -> Option<Ttl> {
        None
    }

    /// For a store with a queue of its own (ZooKeeper): an acquire that waits its
    /// turn until `deadline`, and leaves the queue when it gives up (`Held`). Returns the
    /// outcome and the send time of the request that confirmed it, from which the lease's
    /// validity counts. `None` (the default): the store has no queue, and a waiting call
    /// polls with [`acquire`](Self::acquire).
    fn acquire_waiting<'a>(
        &'a self,
        _key: &'a LockKey,
        _token: &'a Token,
        _deadline: Instant,
    ) -> Option<BoxFuture<'a, Result<(Acquire, Instant)>>> {
        None
    }

    /// Whether leases here can wait for replica acknowledgement
    /// ([`LockOptions::with_replicas`](crate::options::LockOptions::with_replicas)): `Ok`
    /// for a single primary; otherwise the [`Error::InvalidArgument`] that says why not.
    fn replica_acks(&self) -> Result<()> {
        Err(no_replicas("this kind of lock"))
    }

    /// [`acquire`](Self::acquire) followed by `WAIT` on the same primary, in one round
    /// trip: [`Error::NotReplicated`] when the lease was taken but too few replicas
    /// acknowledged it (the caller releases it). Only where
    /// [`replica_acks`](Self::replica_acks) is `Ok`.
    fn acquire_replicated<'a>(
        &'a self,
        _key: &'a LockKey,
        _token: &'a Token,
        _ttl: Ttl,
        _fenced: bool,
        _replicas: Replicas,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(std::future::ready(Err(no_replicas("this kind of lock"))))
    }

    /// [`extend`](Self::extend) followed by `WAIT`: [`Error::NotReplicated`] when the
    /// primary extended the lease but too few replicas acknowledged it.
    fn extend_replicated<'a>(
        &'a self,
        _key: &'a LockKey,
        _token: &'a Token,
        _ttl: Ttl,
        _replicas: Replicas,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(std::future::ready(Err(no_replicas("this kind of lock"))))
    }

    /// [`extend_many`](Self::extend_many) followed by `WAIT`, for leases that all wait
    /// for `replicas`.
    fn extend_many_replicated<'a>(
        &'a self,
        batch: &'a [Extension],
        _replicas: Replicas,
    ) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        let err = no_replicas("this kind of lock");
        Box::pin(std::future::ready(
            batch.iter().map(|_| Err(err.clone())).collect(),
        ))
    }

    /// Scripts of other lease kinds (semaphore permits) on this store's connection, where
    /// the store is one server (or one slot's server) per key; `None` where a lease spans
    /// several independent servers.
    fn scripts(&self) -> Option<Arc<dyn ScriptRunner>> {
        None
    }
}

/// One lease in a batch auto-extension.
#[derive(Debug, Clone)]
pub(crate) struct Extension {
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) ttl: Ttl,
}

/// Leases per `EXTEND_MANY` call: large enough that a thousand leases extend in one call,
/// small enough that one call never blocks the server for long.
pub(crate) const RENEWALS_PER_CALL: usize = 1000;

/// How long the fencing counter outlives the last acquisition: the larger of twice the
/// lease TTL and one day. Tokens stay increasing after it expires because they never fall
/// below the server's clock in microseconds.
pub(crate) fn fence_ttl_ms(ttl: Ttl) -> u64 {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    ttl.as_millis().saturating_mul(2).max(DAY_MS)
}

/// Leases on one Redis primary, through any async connection.
#[derive(Clone)]
pub(crate) struct RedisStore<C> {
    conn: C,
    command_timeout: Option<Duration>,
    /// Publish each release on the lock's channel for waiters.
    announce_releases: bool,
    /// What a release publishes, when not the empty message (which wakes one waiter): a
    /// node of several primaries publishes `~`, which the waiters' managers count once
    /// however many nodes repeat it.
    release_payload: Option<&'static [u8]>,
    /// Whether acquire may hand out fencing tokens. A node of a Redlock set may not: a
    /// per-node counter is no token for the lock as a whole.
    fences: bool,
    /// Connections of their own for replica-acknowledged calls (their `WAIT` blocks the
    /// connection it is sent on); without them such calls use `conn`.
    acks: Option<Arc<AckLane>>,
    /// Announce with `SPUBLISH` (a Redis Cluster's sharded pub/sub) instead of `PUBLISH`.
    sharded: bool,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(conn: C, command_timeout: Option<Duration>, announce_releases: bool) -> Self {
        RedisStore {
            conn,
            command_timeout,
            announce_releases,
            release_payload: None,
            fences: true,
            acks: None,
            sharded: false,
        }
    }

    /// Releases are announced with `SPUBLISH` (sharded pub/sub), for a Redis Cluster whose
    /// notifier listens with `SSUBSCRIBE` on the lock's shard.
    #[cfg(feature = "cluster")]
    pub(crate) fn with_sharded_announcements(mut self) -> Self {
        self.sharded = true;
        self
    }

    /// Replica-acknowledged calls use `lane`'s connections instead of the shared one.
    pub(crate) fn with_ack_lane(mut self, lane: AckLane) -> Self {
        self.acks = Some(Arc::new(lane));
        self
    }

    /// A node of a lock over several primaries: acquire sets the lease only, without a
    /// fencing counter; releases are announced with the payload `~` if `announce`.
    pub(crate) fn unfenced(conn: C, command_timeout: Option<Duration>, announce: bool) -> Self {
        RedisStore {
            conn,
            command_timeout,
            announce_releases: announce,
            release_payload: Some(b"~"),
            fences: false,
            acks: None,
            sharded: false,
        }
    }

    /// Runs one script: `EVALSHA` first; if the server lost the script (`NOSCRIPT`, after a
    /// restart or `SCRIPT FLUSH`; nothing ran), `EVAL` with its body, which runs it and
    /// caches it again in the same round trip. `call` appends the key count, keys and
    /// arguments; each command is sized up front (one allocation for its arguments).
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        call: impl Fn(&mut redis::Cmd),
        conn: &mut C,
    ) -> redis::RedisResult<T> {
        let evalsha = self.script_cmd(script, false, &call);
        match self.bounded(evalsha.query_async(conn)).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let eval = self.script_cmd(script, true, &call);
                self.bounded(eval.query_async(conn)).await
            }
            other => other,
        }
    }

    /// Runs one script call under the command timeout.
    pub(super) async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match self.command_timeout {
            None => call.await,
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(result) => result,
                Err(_) => Err(crate::error::timed_out(format!(
                    "no reply from Redis within {limit:?}"
                ))),
            },
        }
    }
}

/// The release script of `key`: in fair mode, the one that hands the lease to the next
/// waiter or names it.
fn release_script(key: &LockKey) -> &'static Script {
    if key.is_queued() {
        &script::RELEASE_FAIR
    } else {
        &script::RELEASE
    }
}

/// The refusal of replica acknowledgement where `what` has no single primary to ask.
pub(crate) fn no_replicas(what: &str) -> Error {
    Error::invalid(
        "replicas",
        format!(
            "{what} cannot wait for replica acknowledgement (`WAIT` needs the one primary that \
             took the write): use a single primary or Sentinel, or leave the option off"
        ),
    )
}

fn answer(code: i64) -> Result<NodeAnswer> {
    match code {
        1 => Ok(NodeAnswer::Done),
        0 => Ok(NodeAnswer::Expired),
        -1 => Ok(NodeAnswer::Taken),
        other => Err(Error::unexpected_reply(format!("script returned {other}"))),
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Compare-and-`PEXPIRE` on this server.
    pub(crate) async fn extend_here(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
    ) -> Result<NodeAnswer> {
        {
            let mut conn = self.conn.clone();
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(1)
                    .arg(key.lease())
                    .arg(token.as_bytes())
                    .arg(ttl.as_millis());
            };
            let code: i64 = self.invoke(&script::EXTEND, call, &mut conn).await?;
            answer(code)
        }
    }

    /// Compare-and-`PEXPIRE` of many leases on this server, one script call per
    /// [`RENEWALS_PER_CALL`]; one answer per lease, in order.
    pub(crate) async fn extend_many_here(&self, batch: &[Extension]) -> Vec<Result<NodeAnswer>> {
        {
            let mut out = Vec::with_capacity(batch.len());
            for chunk in batch.chunks(RENEWALS_PER_CALL) {
                let mut conn = self.conn.clone();
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
                match self
                    .invoke::<Vec<i64>>(&script::EXTEND_MANY, call, &mut conn)
                    .await
                {
                    Ok(codes) if codes.len() == chunk.len() => {
                        out.extend(codes.into_iter().map(answer));
                    }
                    Ok(codes) => {
                        let err = Error::unexpected_reply(format!(
                            "{} results for {} leases",
                            codes.len(),
                            chunk.len()
                        ));
                        out.extend(chunk.iter().map(|_| Err(err.clone())));
                    }
                    Err(e) => {
                        let err = Error::Redis(e);
                        out.extend(chunk.iter().map(|_| Err(err.clone())));
                    }
                }
            }
            out
        }
    }
}
