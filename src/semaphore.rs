//! A semaphore with leased permits: at most N holders of one name, each holding a permit
//! that is a lease like a lock's ([`LockManager::semaphore`]).
//!
//! A permit is a member of a sorted set scored by its expiry on the server's clock (see
//! [`protocol::semaphore`](crate::protocol::semaphore)); expired permits are reclaimed by
//! the acquire script itself. The permit store implements the same seam as the lock store,
//! so a permit's guard is a [`LockGuard`]: `valid_until`, `extend`, auto-extension,
//! `lost()`, `release`, release on drop, a fencing token per grant, waiting with release
//! notifications and the wait budget, all with the lock's guarantees.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::{LockKey, Token};
use crate::manager::LockManager;
use crate::options::{LockOptions, Ttl};
use crate::protocol::semaphore::script;
use crate::store::{
    Acquire, BoxFuture, Extension, LeaseStore, NodeAnswer, ScriptRunner, Verdict, fence_ttl_ms,
};

/// The prefix a semaphore's keys get after the manager's: its permits live at
/// `<prefix>sem:{<name>}`, apart from any lock of the same name.
const SEMAPHORE_PREFIX: &[u8] = b"sem:";

/// At most [`permits`](Self::permits) holders at a time of one name, each holding a leased
/// permit. Cheap to clone; made by [`LockManager::semaphore`].
///
/// ```no_run
/// async fn call_api(locks: &distlock::LockManager) -> distlock::Result<()> {
///     // At most 5 requests in flight to the partner API, across every process.
///     let api = locks.semaphore("partner-api", 5)?;
///     let permit = api.acquire().await?;          // waits up to the wait budget
///     // ... one request ...
///     permit.release().await
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Semaphore {
    name: Vec<u8>,
    permits: u32,
    permit_manager: LockManager,
}

impl Semaphore {
    /// How many permits the semaphore hands out at most.
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The semaphore's name.
    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Takes a permit with the manager's default options, waiting while all are held.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::lock_with`].
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.permit_manager.lock(&self.name).await
    }

    /// Takes a permit with `options` (TTL, wait budget, backoff, auto-extension,
    /// fencing), waiting while all are held.
    ///
    /// # Errors
    ///
    /// As [`LockManager::lock_with`]: [`Error::Timeout`] when no permit came free within
    /// the budget.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::lock_with`]: a permit the server may have granted to an
    /// abandoned attempt is given back in the background.
    pub async fn acquire_with(&self, options: LockOptions) -> Result<LockGuard> {
        self.permit_manager.lock_with(&self.name, options).await
    }

    /// One attempt with the manager's default options: [`Error::Contended`] when all
    /// permits are held (its `retry_after` is when the first of them expires).
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::try_lock`].
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        self.permit_manager.try_lock(&self.name).await
    }

    /// One attempt with `options`.
    ///
    /// # Cancel safety
    ///
    /// As for [`LockManager::try_lock`].
    pub async fn try_acquire_with(&self, options: LockOptions) -> Result<LockGuard> {
        self.permit_manager.try_lock_with(&self.name, options).await
    }
}

impl LockManager {
    /// A semaphore of `permits` leased permits on `name`, on this manager's server.
    ///
    /// Each permit is a lease: it expires after its TTL unless extended (or
    /// auto-extended), so a crashed holder's permit comes back by itself. The permit's
    /// guard is a [`LockGuard`] and behaves like a lock's.
    ///
    /// `permits` is checked by every acquire, against the permits held then: callers that
    /// use different counts for one name each get their own limit (raising it admits more
    /// holders at once; lowering it admits none until enough permits are given back or
    /// expire, and takes none away).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for zero permits, a bad name, or a manager over several
    /// independent primaries (Redlock): per-node permit counts do not add up to N across
    /// a quorum (two majorities may count different holders), so no sound semaphore is
    /// offered there.
    pub fn semaphore(&self, name: impl AsRef<[u8]>, permits: u32) -> Result<Semaphore> {
        if permits == 0 {
            return Err(Error::invalid(
                "permits",
                "a semaphore needs at least one permit",
            ));
        }
        let Some(scripts) = self.scripts() else {
            return Err(Error::invalid(
                "semaphore",
                "not offered on this backend: over several independent primaries (Redlock) \
                 permit counts per node do not add up to N across a quorum; on ZooKeeper, \
                 not built yet",
            ));
        };
        let mut prefix = self.prefix().to_vec();
        prefix.extend_from_slice(SEMAPHORE_PREFIX);
        let name = name.as_ref().to_vec();
        LockKey::new(&prefix, &name)?;
        let store = PermitStore { scripts, permits };
        Ok(Semaphore {
            name,
            permits,
            permit_manager: self.derived(Arc::new(store), prefix.into()),
        })
    }
}

/// Permits of one semaphore (one count) on one server: the lease seam over the
/// semaphore's scripts.
struct PermitStore {
    scripts: Arc<dyn ScriptRunner>,
    permits: u32,
}

fn answer(value: &redis::Value) -> Result<NodeAnswer> {
    match value {
        redis::Value::Int(1) => Ok(NodeAnswer::Done),
        redis::Value::Int(0) => Ok(NodeAnswer::Expired),
        redis::Value::Int(-1) => Ok(NodeAnswer::Taken),
        other => Err(Error::unexpected_reply(format!(
            "semaphore script returned {other:?}"
        ))),
    }
}

/// Gives a permit back (semaphore or read permit), announced when the store announces:
/// to one waiter per manager, or to all of them with `wake_all` (read permits).
pub(crate) async fn release_permit(
    scripts: &dyn ScriptRunner,
    key: &LockKey,
    token: &Token,
    by_body: bool,
    wake_all: bool,
) -> Result<Verdict> {
    let announce = scripts.announces();
    let call = |cmd: &mut redis::Cmd| {
        cmd.arg(1).arg(key.lease()).arg(token.as_bytes());
        if announce {
            cmd.arg(key.released_channel())
                .arg(if wake_all { "*" } else { "" });
        }
    };
    let reply = scripts.run(&script::RELEASE, by_body, &call).await?;
    answer(&reply).map(Verdict::from)
}

/// Extends many permits (semaphore or read permits) in one call per
/// [`RENEWALS_PER_CALL`](crate::store::RENEWALS_PER_CALL); one verdict per permit.
pub(crate) async fn extend_permits(
    scripts: &dyn ScriptRunner,
    batch: &[Extension],
) -> Vec<Result<Verdict>> {
    let mut out = Vec::with_capacity(batch.len());
    for chunk in batch.chunks(crate::store::RENEWALS_PER_CALL) {
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
        match scripts.run(&script::EXTEND, false, &call).await {
            Ok(redis::Value::Array(codes)) if codes.len() == chunk.len() => {
                out.extend(codes.iter().map(|c| answer(c).map(Verdict::from)));
            }
            Ok(other) => {
                let err = Error::unexpected_reply(format!("extend returned {other:?}"));
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

/// `{granted, value}` of an acquire script: a grant (with its fence when `fenced`) or how
/// long to wait.
pub(crate) fn grant(reply: redis::Value, fenced: bool) -> Result<Acquire> {
    let (granted, value): (i64, i64) = redis::FromRedisValue::from_redis_value(reply)
        .map_err(|e| Error::unexpected_reply(e.to_string()))?;
    match granted {
        1 if fenced => u64::try_from(value)
            .map(|fence| Acquire::Taken { fence: Some(fence) })
            .map_err(|_| Error::unexpected_reply(format!("fencing token {value}"))),
        1 => Ok(Acquire::Taken { fence: None }),
        0 => Ok(Acquire::Held {
            pttl: u64::try_from(value)
                .ok()
                .map(std::time::Duration::from_millis),
            holder: None,
        }),
        other => Err(Error::unexpected_reply(format!("acquire returned {other}"))),
    }
}

impl LeaseStore for PermitStore {
    fn acquire<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
        ttl: Ttl,
        fenced: bool,
    ) -> BoxFuture<'a, Result<Acquire>> {
        Box::pin(async move {
            let call = |cmd: &mut redis::Cmd| {
                cmd.arg(2)
                    .arg(key.lease())
                    .arg(key.fence())
                    .arg(token.as_bytes())
                    .arg(ttl.as_millis())
                    .arg(self.permits)
                    .arg(if fenced { "1" } else { "0" })
                    .arg(fence_ttl_ms(ttl));
            };
            let reply = self.scripts.run(&script::ACQUIRE, false, &call).await?;
            grant(reply, fenced)
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
        Box::pin(extend_one(&*self.scripts, key, token, ttl))
    }

    fn release<'a>(&'a self, key: &'a LockKey, token: &'a Token) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(release_permit(&*self.scripts, key, token, false, false))
    }

    fn release_in_background<'a>(
        &'a self,
        key: &'a LockKey,
        token: &'a Token,
    ) -> BoxFuture<'a, Result<Verdict>> {
        Box::pin(release_permit(&*self.scripts, key, token, true, false))
    }

    fn extend_many<'a>(&'a self, batch: &'a [Extension]) -> BoxFuture<'a, Vec<Result<Verdict>>> {
        // One semaphore per store: every permit of the batch has the same key (one slot).
        Box::pin(extend_permits(&*self.scripts, batch))
    }
}

/// Extends one permit.
pub(crate) async fn extend_one(
    scripts: &dyn ScriptRunner,
    key: &LockKey,
    token: &Token,
    ttl: Ttl,
) -> Result<Verdict> {
    let batch = [Extension {
        key: key.clone(),
        token: *token,
        ttl,
    }];
    extend_permits(scripts, &batch)
        .await
        .pop()
        .unwrap_or_else(|| Err(Error::unexpected_reply("no answer for the permit")))
}
