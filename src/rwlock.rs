//! A read-write lock: many readers or one writer, writers preferred
//! ([`LockManager::rw_lock`]).
//!
//! Readers hold leased permits in a sorted set (as a semaphore's, without a count); the
//! writer holds a lease like a lock's. A writer that finds readers leaves a short intent
//! that stops new readers, so a stream of readers cannot starve it; the intent is a lease
//! too, so a writer that gives up or crashes stops blocking readers within its TTL. Both
//! kinds of guard are [`LockGuard`]s, over the same lease seam as locks.
//!
//! No upgrade from read to write: two readers upgrading at once would each wait for the
//! other's read permit to go, forever (or until a TTL). Release the read guard and take
//! the write lock; re-check what was read.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::{LockKey, Token};
use crate::manager::LockManager;
use crate::options::{LockOptions, Ttl};
use crate::protocol::rw::script as rw_script;
use crate::protocol::script as lock_script;
use crate::semaphore::{extend_one, extend_permits, grant, release_permit};
use crate::store::{
    Acquire, BoxFuture, Extension, LeaseStore, ScriptRunner, Verdict, fence_ttl_ms,
};

/// The prefix a read-write lock's keys get after the manager's.
const RW_PREFIX: &[u8] = b"rw:";

/// The longest a waiting writer's intent lasts without being renewed: a writer that
/// vanished while waiting stops blocking new readers within it.
const MAX_INTENT_MS: u64 = 2_000;

/// Many readers or one writer on one name. Cheap to clone; made by
/// [`LockManager::rw_lock`].
///
/// ```no_run
/// async fn rebuild(locks: &distlock::LockManager) -> distlock::Result<()> {
///     let cache = locks.rw_lock("cache:prices")?;
///     let read = cache.read().await?;   // many readers at once
///     // ... serve from the cache ...
///     read.release().await?;
///     let write = cache.write().await?; // alone: no reader, no other writer
///     // ... rebuild the cache ...
///     write.release().await
/// }
/// ```
#[derive(Clone, Debug)]
pub struct RwLock {
    name: Vec<u8>,
    readers: LockManager,
    writers: LockManager,
}

impl RwLock {
    /// The lock's name.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// A read guard, with the manager's default options, waiting while a writer holds the
    /// lock or waits for it.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::lock_with`].
    pub async fn read(&self) -> Result<LockGuard> {
        self.readers.lock(&self.name).await
    }

    /// [`read`](Self::read) with `options`.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::lock_with`].
    pub async fn read_with(&self, options: LockOptions) -> Result<LockGuard> {
        self.readers.lock_with(&self.name, options).await
    }

    /// One attempt at a read guard: [`Error::Contended`] while a writer holds or waits.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::try_lock`].
    pub async fn try_read(&self) -> Result<LockGuard> {
        self.readers.try_lock(&self.name).await
    }

    /// The write guard, with the manager's default options, waiting while readers or
    /// another writer hold the lock.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::lock_with`]; an intent left by the abandoned wait expires
    /// within 2 s.
    pub async fn write(&self) -> Result<LockGuard> {
        self.writers.lock(&self.name).await
    }

    /// [`write`](Self::write) with `options`.
    ///
    /// # Cancel safety
    ///
    /// As for [`write`](Self::write).
    pub async fn write_with(&self, options: LockOptions) -> Result<LockGuard> {
        self.writers.lock_with(&self.name, options).await
    }

    /// One attempt at the write guard: [`Error::Contended`] while readers or a writer
    /// hold the lock (the attempt leaves an intent that holds new readers back for up to
    /// 2 s, or the lease TTL if shorter).
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::try_lock`].
    pub async fn try_write(&self) -> Result<LockGuard> {
        self.writers.try_lock(&self.name).await
    }
}

impl LockManager {
    /// A read-write lock on `name`, on this manager's server: many readers or one writer,
    /// with writer preference (a waiting writer stops new readers). Read and write guards
    /// are [`LockGuard`]s with the lock's lease behaviour; every grant can carry a fencing
    /// token, and a writer's is greater than every earlier grant's.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad name, or a manager over several independent
    /// primaries (Redlock), where reader sets do not combine soundly across a quorum.
    pub fn rw_lock(&self, name: impl AsRef<[u8]>) -> Result<RwLock> {
        let Some(scripts) = self.scripts() else {
            return Err(Error::invalid(
                "rw_lock",
                "not offered on this backend (several independent primaries, ZooKeeper)",
            ));
        };
        let mut prefix = self.prefix().to_vec();
        prefix.extend_from_slice(RW_PREFIX);
        let name = name.as_ref().to_vec();
        LockKey::new(&prefix, &name)?;
        let store = |write| {
            Arc::new(RwStore {
                scripts: Arc::clone(&scripts),
                write,
            }) as Arc<dyn LeaseStore>
        };
        Ok(RwLock {
            readers: self.derived(store(false), prefix.clone().into()),
            writers: self.derived(store(true), prefix.into()),
            name,
        })
    }
}

/// One side (readers or the writer) of read-write locks on one server.
struct RwStore {
    scripts: Arc<dyn ScriptRunner>,
    write: bool,
}

fn with_suffix(key: &LockKey, suffix: &[u8]) -> Vec<u8> {
    let mut out = key.lease().to_vec();
    out.extend_from_slice(suffix);
    out
}

impl RwStore {
    async fn release_writer(&self, key: &LockKey, token: &Token, by_body: bool) -> Result<Verdict> {
        let writer = with_suffix(key, b":w");
        let announce = self.scripts.announces();
        let call = |cmd: &mut redis::Cmd| {
            cmd.arg(1).arg(&writer).arg(token.as_bytes());
            if announce {
                cmd.arg(key.released_channel());
            }
        };
        let reply = self
            .scripts
            .run(&rw_script::RELEASE_WRITE, by_body, &call)
            .await?;
        code(&reply)
    }
}

fn code(reply: &redis::Value) -> Result<Verdict> {
    match reply {
        redis::Value::Int(1) => Ok(Verdict::Done),
        redis::Value::Int(0) => Ok(Verdict::Lost(crate::error::LostReason::Expired)),
        redis::Value::Int(-1) => Ok(Verdict::Lost(crate::error::LostReason::Taken)),
        other => Err(Error::unexpected_reply(format!(
            "script returned {other:?}"
        ))),
    }
}

impl LeaseStore for RwStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(async move {
            let (writer, intent) = (with_suffix(key, b":w"), with_suffix(key, b":i"));
            let intent_ms = ttl.as_millis().min(MAX_INTENT_MS);
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(4)
                    .arg(key.lease())
                    .arg(&writer)
                    .arg(&intent)
                    .arg(key.fence())
                    .arg(token.as_bytes())
                    .arg(ttl.as_millis())
                    .arg(if fenced { "1" } else { "0" })
                    .arg(fence_ttl_ms(ttl));
                if self.write {
                    cmd.arg(intent_ms);
                }
            };
            let script = if self.write {
                &rw_script::WRITE
            } else {
                &rw_script::READ
            };
            grant(self.scripts.run(script, false, &call).await?, fenced)
        })
    }

    fn fences(&self) -> bool {
        true
    }

    fn extend<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            if !self.write {
                return extend_one(&*self.scripts, key, token, ttl).await;
            }
            let writer = with_suffix(key, b":w");
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(1)
                    .arg(&writer)
                    .arg(token.as_bytes())
                    .arg(ttl.as_millis());
            };
            code(&self.scripts.run(&lock_script::EXTEND, false, &call).await?)
        })
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            if self.write {
                self.release_writer(key, token, false).await
            } else {
                release_permit(&*self.scripts, key, token, false, true).await
            }
        })
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(async move {
            if self.write {
                self.release_writer(key, token, true).await
            } else {
                release_permit(&*self.scripts, key, token, true, true).await
            }
        })
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        Box::pin(async move {
            if !self.write {
                return extend_permits(&*self.scripts, batch).await;
            }
            // One writer per lock and one lock per store: a batch holds at most one lease
            // per call, each extended on its own.
            let mut out = Vec::with_capacity(batch.len());
            for extension in batch {
                out.push(
                    self.extend(&extension.key, &extension.token, extension.ttl)
                        .await,
                );
            }
            out
        })
    }
}
