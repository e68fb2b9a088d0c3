//! Compare-and-delete on one server: the release, announced to waiters or not.

use redis::aio::ConnectionLike;

use super::{NodeAnswer, RedisStore, answer, release_script};
use crate::error::Result;
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::protocol::script;

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Compare-and-delete on this server, announced to waiters if the store does.
    pub(crate) async fn release_here(&self, key: &LockKey, token: &Token) -> Result<NodeAnswer> {
        let mut conn = self.conn.clone();
        let call = |cmd: &mut redis::Cmd| self.release_args(cmd, key, token);
        let code: i64 = self.invoke(release_script(key), call, &mut conn).await?;
        answer(code)
    }

    /// Compare-and-`SET` on this server: the lease goes from `from` to `to`, for `ttl`
    /// ([`PASS`](crate::protocol::PASS)); nothing is announced.
    pub(crate) async fn pass_here(
        &self,
        key: &LockKey,
        from: &Token,
        to: &Token,
        ttl: Ttl,
    ) -> Result<NodeAnswer> {
        let mut conn = self.conn.clone();
        let call = |cmd: &mut redis::Cmd| {
            cmd.arg(1)
                .arg(key.lease())
                .arg(from.as_bytes())
                .arg(to.as_bytes())
                .arg(ttl.as_millis());
        };
        let code: i64 = self.invoke(&script::PASS, call, &mut conn).await?;
        answer(code)
    }

    /// [`release_here`](Self::release_here), announced only if `announce` and the store
    /// announces releases.
    pub(crate) async fn release_maybe_announced(
        &self,
        key: &LockKey,
        token: &Token,
        announce: bool,
    ) -> Result<NodeAnswer> {
        if announce || !self.announce_releases {
            return self.release_here(key, token).await;
        }
        let mut quiet = self.clone();
        quiet.announce_releases = false;
        quiet.release_here(key, token).await
    }

    /// [`release_here`](Self::release_here) with the script's body (`EVAL`), for a release
    /// tried in the background after a failure: a server that lost its script cache runs
    /// it in one round trip, where `EVALSHA` would need a `NOSCRIPT` answer first, an
    /// answer a slow link may never deliver within the command timeout.
    pub(crate) async fn release_by_body(&self, key: &LockKey, token: &Token) -> Result<NodeAnswer> {
        let mut conn = self.conn.clone();
        let eval = self.script_cmd(release_script(key), true, &|cmd| {
            self.release_args(cmd, key, token)
        });
        let code: i64 = self.bounded(eval.query_async(&mut conn)).await?;
        answer(code)
    }

    /// Fair mode on one primary that announces releases: a release hands the lease to the
    /// next waiter ([`RELEASE_FAIR`](crate::protocol::RELEASE_FAIR) with the handoff keys);
    /// over several primaries (whose nodes announce `~`) no single node may hand a lease over.
    pub(crate) fn hands_off(&self) -> bool {
        self.announce_releases && self.release_payload.is_none()
    }

    /// Key count, keys and arguments of the release script.
    fn release_args(&self, cmd: &mut redis::Cmd, key: &LockKey, token: &Token) {
        if key.is_queued() {
            self.queue_keys(cmd, key);
        } else {
            cmd.arg(1).arg(key.lease());
        }
        cmd.arg(token.as_bytes());
        if self.announce_releases {
            cmd.arg(key.released_channel());
            if let Some(payload) = self.release_payload {
                cmd.arg(payload);
            }
        }
    }
}
