//! What a lock call leaves to the background when it ends without its outcome in hand: an
//! acquire abandoned mid-flight (its possible lease is released) and, in fair mode, the
//! caller's entry in the lock's queue (removed).

use std::sync::Arc;

use tokio::runtime::Handle;
use tracing::Instrument;

use crate::key::{LockKey, Token};
use crate::notify::Notifier;
use crate::options::Ttl;
use crate::store::LeaseStore;
use crate::store::release_in_background;

/// Cleans up after an acquire whose outcome is unknown: dropped mid-flight, or failed
/// after the command may have reached the server. The compare-and-delete only removes a
/// lease carrying this attempt's token, so it can never hurt another owner.
pub(super) struct PendingAcquire<'a> {
    pub(super) store: &'a Arc<dyn LeaseStore>,
    pub(super) key: &'a LockKey,
    pub(super) token: Token,
    pub(super) ttl: Ttl,
    pub(super) runtime: Option<&'a Handle>,
    pub(super) armed: bool,
}

impl Drop for PendingAcquire<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(runtime) = self.runtime else {
            return;
        };
        tracing::debug!(
            key = %self.key,
            token = self.token.short(),
            "acquire abandoned; releasing in the background"
        );
        release_in_background(
            runtime,
            Arc::clone(self.store),
            self.key.clone(),
            self.token,
            self.ttl.as_duration(),
        );
    }
}

/// Fair mode: a waiting call's id in the lock's queue, fresh per call:
/// `<manager id>.<32 hex digits>` when the manager listens for releases (the release
/// announces the next waiter on the channel of its manager), else the 32 hex digits.
pub(super) fn waiter_id(notifier: Option<&Notifier>) -> Box<[u8]> {
    let token = Token::generate();
    match notifier {
        Some(notifier) => [notifier.id(), b".", token.as_bytes()].concat().into(),
        None => token.as_bytes().into(),
    }
}

/// Fair mode: the caller's entry in the lock's queue in Redis, while it waits. Dropped
/// armed (the call timed out, failed or was cancelled at any await), it hands the removal
/// of the entry to the background; if that fails too, the entry expires with its lease.
pub(super) struct QueueEntry<'a> {
    pub(super) store: &'a Arc<dyn LeaseStore>,
    pub(super) key: &'a LockKey,
    pub(super) id: Box<[u8]>,
    pub(super) runtime: Option<&'a Handle>,
    pub(super) armed: bool,
}

impl<'a> QueueEntry<'a> {
    /// The armed entry of waiter `id` in the queue of `key`.
    pub(super) fn new(
        store: &'a Arc<dyn LeaseStore>,
        key: &'a LockKey,
        id: Box<[u8]>,
        runtime: Option<&'a Handle>,
    ) -> Self {
        QueueEntry {
            store,
            key,
            id,
            runtime,
            armed: true,
        }
    }

    /// The call holds the lock (which took it out of the queue): nothing to leave.
    pub(super) fn disarm(entry: &mut Option<Self>) {
        if let Some(entry) = entry {
            entry.armed = false;
        }
    }
}

impl Drop for QueueEntry<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(runtime) = self.runtime else {
            return;
        };
        let (store, key) = (Arc::clone(self.store), self.key.clone());
        let id = std::mem::take(&mut self.id);
        let span = tracing::debug_span!("distlock.leave_queue", key = %key);
        runtime.spawn(
            async move {
                match store.leave_queue(&key, &id).await {
                    Ok(()) => tracing::debug!("left the queue"),
                    Err(e) => tracing::debug!(
                        error = %e,
                        "could not leave the queue; the entry expires with its lease"
                    ),
                }
            }
            .instrument(span),
        );
    }
}
