//! Fair mode on one primary: the waiter queue beside the lease ([`script::ACQUIRE_FAIR`],
//! [`script::LEAVE_QUEUE`]; the release that names the next waiter is the store's release
//! for a queued key).

use std::time::Duration;

use redis::aio::ConnectionLike;

use super::{Acquire, RedisStore, fence_ttl_ms};
use crate::error::{Error, Result};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::protocol::script;

/// Fair mode asked of a store that keeps no queue.
pub(crate) fn no_queue() -> Error {
    Error::invalid(
        "fair",
        "fair mode needs a waiter queue beside the lease, which this deployment does not \
         keep (it is offered on one primary, through Sentinel, on a Cluster and over \
         Redlock; ZooKeeper serves waiters in arrival order already)",
    )
}

/// Fair mode: how one attempt uses the lock's waiter queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Queue<'a> {
    /// The caller's id in the queue: one per waiting call, not the lease token;
    /// `<manager id>.<random>` when the manager listens for releases, so the release
    /// announces the head on that manager's own channel.
    pub(crate) waiter: &'a [u8],
    /// How long the caller's entry lasts unless refreshed.
    pub(crate) lease: Duration,
    /// Join the queue if the caller must wait (a waiting call); `false`: one attempt that
    /// leaves no entry (`try_lock`).
    pub(crate) join: bool,
    /// The attempt's number within its call, increasing: a release hands the lease to one
    /// attempt's token, and an earlier attempt arriving late must not take it over.
    pub(crate) attempt: u64,
    /// A release named the caller as the next waiter just before this attempt: over
    /// several primaries, the attempt asks every node at once (the release let the lease
    /// go on the others before it named the caller on the queue's node).
    pub(crate) named: bool,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Fair mode's acquire on this server: [`script::ACQUIRE_FAIR`].
    pub(crate) async fn acquire_queued_here(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        fenced: bool,
        queue: Queue<'_>,
    ) -> Result<Acquire> {
        let mut conn = self.conn.clone();
        let (q, qx) = (key.queue(), key.queue_expiry());
        let fence_ttl = if fenced && self.fences {
            fence_ttl_ms(ttl)
        } else {
            0
        };
        let entry_ms = u64::try_from(queue.lease.as_millis()).unwrap_or(u64::MAX);
        let qh = self.hands_off().then(|| key.queue_handoff());
        let call = |cmd: &mut redis::Cmd| {
            cmd.arg(if qh.is_some() { 5 } else { 4 })
                .arg(key.lease())
                .arg(key.fence())
                .arg(&q)
                .arg(&qx);
            if let Some(qh) = &qh {
                cmd.arg(qh);
            }
            cmd.arg(token.as_bytes())
                .arg(ttl.as_millis())
                .arg(fence_ttl)
                .arg(queue.waiter)
                .arg(entry_ms)
                .arg(if queue.join { 1 } else { 0 });
            if qh.is_some() {
                cmd.arg(queue.attempt);
            }
        };
        let reply: Vec<i64> = self.invoke(&script::ACQUIRE_FAIR, call, &mut conn).await?;
        match reply[..] {
            [1, _] if fence_ttl == 0 => Ok(Acquire::Taken { fence: None }),
            [1, fence] => u64::try_from(fence)
                .map(|fence| Acquire::Taken { fence: Some(fence) })
                .map_err(|_| Error::unexpected_reply(format!("negative fencing token {fence}"))),
            // -1: a key without expiry (set by something else than distlock).
            [0, wait, _place] => Ok(Acquire::Held {
                pttl: u64::try_from(wait).ok().map(Duration::from_millis),
                holder: None,
            }),
            _ => Err(Error::unexpected_reply(format!(
                "fair acquire returned {reply:?}"
            ))),
        }
    }

    /// Key count and keys of fair mode's release and leave scripts: the lease, the queue
    /// and its entry expiries; where a release hands the lease over, also the fence counter
    /// and the handoff hash.
    pub(super) fn queue_keys(&self, cmd: &mut redis::Cmd, key: &LockKey) {
        if self.hands_off() {
            cmd.arg(5)
                .arg(key.lease())
                .arg(key.queue())
                .arg(key.queue_expiry());
            cmd.arg(key.fence()).arg(key.queue_handoff());
        } else {
            cmd.arg(3)
                .arg(key.lease())
                .arg(key.queue())
                .arg(key.queue_expiry());
        }
    }

    /// Fair mode: `waiter` leaves the queue of `key` on this server ([`script::LEAVE_QUEUE`]),
    /// sent by body like a background release.
    pub(crate) async fn leave_queue_here(&self, key: &LockKey, waiter: &[u8]) -> Result<()> {
        let mut conn = self.conn.clone();
        let eval = self.script_cmd(&script::LEAVE_QUEUE, true, &|cmd| {
            self.queue_keys(cmd, key);
            cmd.arg(waiter);
            if self.announce_releases {
                cmd.arg(key.released_channel());
            }
        });
        let _removed: i64 = self.bounded(eval.query_async(&mut conn)).await?;
        Ok(())
    }
}
