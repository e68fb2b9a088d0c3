//! One acquire attempt: a fresh token, the store's acquire of the kind the call needs,
//! and the guard of a lease taken in time.

use std::time::Instant;

use tokio::runtime::Handle;

use super::cleanup::PendingAcquire;
use super::{Attempt, LockManager};
use crate::error::{Error, Result};
use crate::key::{LockKey, Token};
use crate::lease::Lease;
use crate::options::Checked;
use crate::store::{Acquire, Queue, no_queue};

impl LockManager {
    /// One acquire round trip with a fresh token; in fair mode (`queue`) through the lock's
    /// queue in Redis; with a `deadline`, a store with a queue of its own (ZooKeeper) waits
    /// in it until then. `retry`: this call found the lock held before.
    pub(super) async fn attempt(
        &self,
        key: &LockKey,
        request: &Checked,
        queue: Option<Queue<'_>>,
        deadline: Option<Instant>,
        retry: bool,
    ) -> Result<Attempt> {
        // A lease that is a session has the session's TTL (or the hold-time cap, if
        // shorter) and is always kept alive.
        let session_ttl = self.shared.store.session_ttl();
        let ttl = match (session_ttl, request.max_hold) {
            (Some(session), Some(hold)) if hold < session.as_duration() => request.ttl,
            (Some(session), _) => session,
            (None, _) => request.ttl,
        };
        let auto_extend = request.auto_extend || session_ttl.is_some();
        let token = Token::generate();
        let runtime = Handle::try_current().ok();
        if queue.is_some() && !self.shared.store.queues() {
            return Err(no_queue());
        }
        if request.fencing && !self.shared.store.fences() {
            return Err(Error::invalid(
                "fencing",
                "fencing tokens need a single primary: over several primaries no token has \
                 the guarantee (see the crate docs on Redlock)",
            ));
        }
        if let Some(replicas) = request.replicas {
            self.replicas_usable(queue.is_some())?;
            tracing::trace!(count = replicas.count(), "waiting for replicas");
        }
        if auto_extend && runtime.is_none() {
            return Err(Error::invalid(
                "auto_extend",
                "auto-extension needs a tokio runtime to run in",
            ));
        }
        let mut pending = PendingAcquire {
            store: &self.shared.store,
            key,
            token,
            ttl,
            runtime: runtime.as_ref(),
            armed: true,
        };
        let sent = Instant::now();
        let store = &self.shared.store;
        let waiting = match queue {
            Some(_) => None,
            None => deadline.and_then(|until| store.acquire_waiting(key, &token, until)),
        };
        let outcome = match (queue, waiting) {
            (Some(queue), _) => store
                .acquire_queued(key, &token, ttl, request.fencing, queue)
                .await
                .map(|outcome| (outcome, sent)),
            (None, Some(waiting)) => waiting.await,
            (None, None) => match request.replicas {
                Some(replicas) => {
                    store
                        .acquire_replicated(key, &token, ttl, request.fencing, replicas)
                        .await
                }
                None if retry => {
                    store
                        .acquire_contended(key, &token, ttl, request.fencing)
                        .await
                }
                None => store.acquire(key, &token, ttl, request.fencing).await,
            }
            .map(|outcome| (outcome, sent)),
        };
        // From here on the outcome is known (or an error is returned): on error the
        // armed `pending` cleans up, since the SET may have landed before the failure.
        let (outcome, sent) = match outcome {
            // Taken, but too few replicas acknowledged it: deleted again before returning.
            Err(e @ Error::NotReplicated { .. }) => return Err(self.undo(&mut pending, e).await),
            other => other?,
        };
        let replied = Instant::now();
        if let Acquire::Taken { .. } = outcome
            && replied >= ttl.valid_until(sent)
        {
            // The reply came back after the lease's validity ended: another owner may
            // hold the key by now, so this attempt failed. `pending` releases the lease in
            // the background, in case the key still holds it.
            tracing::debug!(token = token.short(), "acquired too late; releasing");
            return Err(Error::timed_out(format!(
                "the acquire's reply came back after its lease's validity ({:?} TTL)",
                ttl.as_duration()
            )));
        }
        pending.armed = false;
        drop(pending);
        match outcome {
            Acquire::Taken { fence } => {
                tracing::debug!(token = token.short(), ?fence, "acquired");
                let lease = Lease::new(key.clone(), token, fence, ttl, sent, replied);
                let lease = lease.with_replicas(request.replicas);
                Ok(Attempt::Taken(self.guard_for(
                    lease,
                    sent,
                    auto_extend,
                    request.max_hold,
                    runtime,
                )))
            }
            Acquire::Held { pttl, .. } => Ok(Attempt::Held { pttl, token, sent }),
        }
    }
}
