//! [`LeaseStore`] for [`RedisStore`]: one primary.

use std::sync::Arc;

use redis::aio::ConnectionLike;

use super::{
    Acquire, BoxFuture, Extension, LeaseStore, Queue, RedisStore, ScriptRunner, Verdict,
    no_replicas,
};
use crate::error::Result;
use crate::key::{LockKey, Token};
use crate::options::{Replicas, Ttl};

impl<C> LeaseStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_here(key, token, ttl, fenced))
    }

    fn fences(&self) -> bool {
        self.fences
    }

    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move { self.extend_here(key, token, ttl).await.map(Verdict::from) })
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move { self.release_here(key, token).await.map(Verdict::from) })
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move { self.release_by_body(key, token).await.map(Verdict::from) })
    }

    fn queues(&self) -> bool {
        // A node of a Redlock set does not announce releases and gives no fences: it keeps
        // no queue either.
        self.fences
    }

    fn acquire_queued<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
        queue: Queue<'a>,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_queued_here(key, token, ttl, fenced, queue))
    }

    fn leave_queue<'a>(&'a self, key: &'a LockKey, waiter: &'a [u8]) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.leave_queue_here(key, waiter))
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            self.extend_many_here(batch)
                .await
                .into_iter()
                .map(|answer| answer.map(Verdict::from))
                .collect()
        })
    }

    fn scripts(&self) -> Option<Arc<dyn ScriptRunner>> {
        Some(Arc::new(self.clone()))
    }

    fn replica_acks(&self) -> Result<()> {
        if self.fences {
            Ok(())
        } else {
            Err(no_replicas("a node of several primaries"))
        }
    }

    fn acquire_replicated<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
        replicas: Replicas,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(self.acquire_replicated_here(key, token, ttl, fenced, replicas))
    }

    fn extend_replicated<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        replicas: Replicas,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            self.extend_replicated_here(key, token, ttl, replicas)
                .await
                .map(Verdict::from)
        })
    }

    fn extend_many_replicated<'a>(
        &'a self,
        batch: &'a [Extension],
        replicas: Replicas,
    ) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            self.extend_many_replicated_here(batch, replicas)
                .await
                .into_iter()
                .map(|answer| answer.map(Verdict::from))
                .collect()
        })
    }
}
