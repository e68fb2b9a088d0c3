//! Passing a lease from its holder to the next waiter of the same manager, on every node
//! at once: one round trip where a release and the waiter's acquire take two.
//!
//! Each node runs [`PASS`](crate::protocol::PASS): if the key holds the holder's token it
//! now holds the waiter's, with the waiter's TTL; the key is never free in between, so no
//! other contender can slip in, and nothing is announced. The waiter holds the lock when a
//! majority passed it with validity left (counted from before the call, as for an
//! acquire). Otherwise the pass is undone and the holder's lease released as usual:
//! the waiter's token is deleted wherever it may have been set, the holder's wherever the
//! pass did not move it, both announced, so waiters elsewhere hear the lock is free.

use std::time::Instant;

use redis::aio::ConnectionLike;

use super::{RedlockStore, bounded, count, join_all};
use crate::error::Result;
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::store::{NodeAnswer, Passed};

impl<C> RedlockStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Hands the lease of `from` to `to` for `ttl` on every node; see the module docs.
    pub(super) async fn pass_all(
        &self,
        key: &LockKey,
        from: &Token,
        to: &Token,
        ttl: Ttl,
    ) -> Result<Passed> {
        let started = Instant::now();
        let answers = self.ask(|node| node.pass_here(key, from, to, ttl)).await;
        let in_time = Instant::now() < ttl.valid_until(started);
        if in_time && count(&answers, |a| *a == NodeAnswer::Done) >= self.quorum {
            // A node that did not answer may still hold `from`, as after a release it
            // did not answer; its TTL ends it.
            return Ok(Passed::Passed);
        }
        tracing::debug!(key = %key, "pass did not take; releasing instead");
        let limit = self.node_timeout;
        let undo = answers
            .iter()
            .enumerate()
            .map(|(i, answer)| async move {
                let passed = matches!(answer, Ok(NodeAnswer::Done));
                // `to` may be set where the pass took or did not answer: take it back,
                // and release `from` where the pass did not move it, both at once (each
                // a compare-and-delete of its own token), so a node that does not answer
                // costs one node timeout, not two.
                let take_back = async {
                    if (passed || answer.is_err())
                        && let Err(e) = bounded(limit, self.release_one(i, key, to, false)).await
                    {
                        tracing::warn!(
                            node = self.nodes[i].name,
                            key = %key,
                            error = %e,
                            "could not undo a pass; the lease set there ends with its TTL"
                        );
                    }
                };
                let release = async {
                    if passed {
                        // The key held `from` until the pass moved it: released.
                        Ok(NodeAnswer::Done)
                    } else {
                        bounded(limit, self.release_one(i, key, from, false)).await
                    }
                };
                tokio::join!(take_back, release).1
            })
            .collect();
        let released = join_all(undo).await;
        Ok(Passed::Released(self.release_verdict(
            key,
            released,
            started.elapsed(),
        )?))
    }
}
