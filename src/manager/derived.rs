//! What the lock's siblings (semaphores, read-write locks, `lock_all`) need from a manager:
//! a manager over another store on the same connection, and the manager's prefix and names.

use std::sync::Arc;

use super::{LockManager, Shared};
use crate::auto_extend::AutoExtender;
use crate::error::Result;
use crate::key::LockKey;
use crate::options::LockOptions;
use crate::store::{LeaseStore, ScriptRunner};

impl LockManager {
    /// The keys of lock `name` under this manager's prefix, in fair mode if `options` ask.
    pub(super) fn key_for(&self, name: &[u8], options: &LockOptions) -> Result<LockKey> {
        let key = LockKey::new(&self.shared.prefix, name)?;
        if !options.fair() {
            return Ok(key);
        }
        if !self.shared.store.queues() {
            return Err(crate::store::no_queue());
        }
        Ok(key.queued())
    }

    /// A manager over another store on the same connection (a semaphore's), with this
    /// one's notifications and default options, and keys under `prefix`.
    pub(crate) fn derived(&self, store: Arc<dyn LeaseStore>, prefix: Box<[u8]>) -> LockManager {
        LockManager {
            shared: Arc::new(Shared {
                auto_extender: AutoExtender::new(Arc::clone(&store)),
                store,
                notifier: self.shared.notifier.clone(),
                prefix,
                defaults: self.shared.defaults,
                replicas: self.shared.replicas,
            }),
        }
    }

    /// The store's scripts for other lease kinds, where it has them.
    pub(crate) fn scripts(&self) -> Option<Arc<dyn ScriptRunner>> {
        self.shared.store.scripts()
    }

    /// The key prefix of this manager.
    pub(crate) fn prefix(&self) -> &[u8] {
        &self.shared.prefix
    }

    /// Whether `name` can name a lock of this manager (nothing is sent).
    pub(crate) fn check_name(&self, name: &[u8]) -> Result<()> {
        LockKey::new(&self.shared.prefix, name).map(drop)
    }
}
