//! Leases on a Redis Cluster (feature `cluster`).
//!
//! Every key of one lock shares one hash tag (`<prefix>{<name>}`, see `key.rs`), so each
//! lock lives in one slot and its scripts run there; redis-rs' cluster connection routes
//! each command by its first key and follows `MOVED`/`ASK` redirections. The one call that
//! touches many locks, the batched auto-extension, is split here by slot: one script call
//! per slot per tick (never a `CROSSSLOT` error), the slots' calls sent together.
//! Replica-acknowledged calls send the write and `WAIT` in one pipeline on a cluster
//! connection of their own, which routes it to the lock's primary.
//! Fair mode works as on one primary: the queue shares the lock's hash tag.

use redis::cluster_async::ClusterConnection;

use crate::error::Result;
use crate::key::{LockKey, Token};
use crate::options::{Replicas, Ttl};
use crate::store::{Acquire, BoxFuture, Extension, LeaseStore, Queue, RedisStore, Verdict};

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// Leases on a Redis Cluster: the single-primary store over a cluster connection, with the
/// batch auto-extension grouped by slot.
pub(crate) struct ClusterStore {
    inner: RedisStore<ClusterConnection>,
}

impl ClusterStore {
    pub(crate) fn new(inner: RedisStore<ClusterConnection>) -> Self {
        ClusterStore { inner }
    }
}

/// The hash slot Redis Cluster puts `key` in: CRC16 (XMODEM) of the hash tag (the bytes
/// between the first `{` and the next `}`, when not empty) or of the whole key, mod 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis Cluster uses it.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The positions of `batch`'s leases grouped by slot, in order of first appearance.
fn by_slot(batch: &[Extension]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (at, extension) in batch.iter().enumerate() {
        let slot = slot(extension.key.lease());
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, members)) => members.push(at),
            None => groups.push((slot, vec![at])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

impl LeaseStore for ClusterStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        self.inner.acquire(key, token, ttl, fenced)
    }

    fn fences(&self) -> bool {
        self.inner.fences()
    }

    fn replica_acks(&self) -> Result<()> {
        // The write and `WAIT` go in one pipeline on a cluster connection of the ack lane:
        // routed by the write's key to the lock's primary, never broadcast.
        self.inner.replica_acks()
    }

    fn acquire_replicated<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
        replicas: Replicas,
    ) -> BoxFuture<'a, Result<Acquire>> {
        self.inner
            .acquire_replicated(key, token, ttl, fenced, replicas)
    }

    fn extend_replicated<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        replicas: Replicas,
    ) -> BoxFuture<'a, Result<Verdict>> {
        self.inner.extend_replicated(key, token, ttl, replicas)
    }

    fn extend_many_replicated<'a>(
        &'a self,
        batch: &'a [Extension],
        replicas: Replicas,
    ) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(per_slot(batch, move |slice| async move {
            self.inner.extend_many_replicated(&slice, replicas).await
        }))
    }

    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        self.inner.extend(key, token, ttl)
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        self.inner.release(key, token)
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        self.inner.release_in_background(key, token)
    }

    fn scripts(&self) -> Option<std::sync::Arc<dyn crate::store::ScriptRunner>> {
        self.inner.scripts()
    }

    fn queues(&self) -> bool {
        // Fair mode: the waiter queue shares the lock's hash tag, so the queue scripts
        // and the release that names the head run in the lock's slot, on its primary.
        self.inner.queues()
    }

    fn acquire_queued<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
        queue: Queue<'a>,
    ) -> BoxFuture<'a, Result<Acquire>> {
        self.inner.acquire_queued(key, token, ttl, fenced, queue)
    }

    fn leave_queue<'a>(&'a self, key: &'a LockKey, waiter: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        self.inner.leave_queue(key, waiter)
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(per_slot(batch, move |slice| async move {
            self.inner.extend_many(&slice).await
        }))
    }
}

/// `batch` split by slot, `call` run on each slot's leases (all slots at once), and the
/// verdicts put back in `batch`'s order.
async fn per_slot<F, Fut>(batch: &[Extension], call: F) -> Vec<Result<Verdict>>
where
    F: Fn(Vec<Extension>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<Verdict>>>,
{
    let groups = by_slot(batch);
    let calls = groups
        .iter()
        .map(|members| call(members.iter().map(|&i| batch[i].clone()).collect()));
    let answers = join_all(calls).await;
    let mut out: Vec<Option<Result<Verdict>>> = (0..batch.len()).map(|_| None).collect();
    for (members, verdicts) in groups.iter().zip(answers) {
        for (&at, verdict) in members.iter().zip(verdicts) {
            out[at] = Some(verdict);
        }
    }
    out.into_iter()
        .map(|v| {
            v.unwrap_or_else(|| {
                Err(crate::error::Error::unexpected_reply(
                    "no answer for a lease of the batch",
                ))
            })
        })
        .collect()
}

/// Runs the futures concurrently on this task; their outputs in order.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (fut, slot) in pending.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_ne!(
            slot(b"foo{}{bar}"),
            slot(b"bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"distlock:{job}"), slot(b"distlock:{job}:fence"));
    }
}
