//! Replica-acknowledged leases in the facade: which acknowledgement a call asks for, and
//! an acquire that too few replicas acknowledged, undone.

use super::LockManager;
use super::cleanup::PendingAcquire;
use crate::error::{Error, Result};
use crate::options::{Checked, LockOptions};

impl LockManager {
    /// `options`, checked for a call whose auto-extension default is `auto_extend_default`,
    /// with the replica acknowledgement of the manager where the options leave it to it.
    pub(super) fn request(
        &self,
        options: &LockOptions,
        auto_extend_default: bool,
    ) -> Result<Checked> {
        let mut request = options.check(auto_extend_default)?;
        request.replicas = options
            .replicas_or(self.shared.replicas)
            .map(|replicas| replicas.check(request.ttl.as_duration()))
            .transpose()?;
        Ok(request)
    }

    /// Whether this manager's store can wait for replicas, for a call in fair mode
    /// (`queued`) or not; nothing was sent yet.
    pub(super) fn replicas_usable(&self, queued: bool) -> Result<()> {
        self.shared.store.replica_acks()?;
        if queued {
            return Err(Error::invalid(
                "replicas",
                "fair mode's acquire cannot wait for replica acknowledgement yet: use one or \
                 the other",
            ));
        }
        Ok(())
    }

    /// An acquire took the lease on the primary but too few replicas acknowledged it:
    /// deletes it again (compare-and-delete with its token) before the call returns `err`.
    /// If that delete fails or is dropped, `pending` stays armed and releases it in the
    /// background.
    pub(super) async fn undo(&self, pending: &mut PendingAcquire<'_>, err: Error) -> Error {
        tracing::debug!(error = %err, "acquired without enough replicas; releasing");
        match self.shared.store.release(pending.key, &pending.token).await {
            Ok(verdict) => {
                tracing::debug!(?verdict, "released the unacknowledged lease");
                pending.armed = false;
            }
            Err(e) => tracing::debug!(error = %e, "release failed; retried in the background"),
        }
        err
    }
}
