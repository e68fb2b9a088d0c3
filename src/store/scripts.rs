//! Scripts of other lease kinds (semaphore permits, read-write locks) on a store's
//! connection: the seam they share with the lock's own commands.

use redis::aio::ConnectionLike;

use super::{BoxFuture, RedisStore};
use crate::protocol::Script;

/// Runs one of the protocol's scripts on the server of its keys: by SHA with a fallback to
/// the body on `NOSCRIPT`, or by body (`by_body`, for background calls), under the store's
/// command timeout. `call` appends the key count, keys and arguments.
pub(crate) trait ScriptRunner: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        script: &'static Script,
        by_body: bool,
        call: &'a (dyn Fn(&mut redis::Cmd) + Send + Sync),
    ) -> BoxFuture<'a, redis::RedisResult<redis::Value>>;

    /// Whether releases are announced to waiters (the store's setting).
    fn announces(&self) -> bool;
}

impl<C> RedisStore<C> {
    /// [`script_cmd`] for this store's variant of `script` (announcing with `SPUBLISH` on
    /// a cluster store that listens sharded).
    pub(super) fn script_cmd(
        &self,
        script: &Script,
        by_body: bool,
        call: &dyn Fn(&mut redis::Cmd),
    ) -> redis::Cmd {
        let script = if self.sharded {
            script.sharded()
        } else {
            script
        };
        script_cmd(script, by_body, call)
    }
}

impl<C> ScriptRunner for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn run<'a>(
        &'a self,
        script: &'static Script,
        by_body: bool,
        call: &'a (dyn Fn(&mut redis::Cmd) + Send + Sync),
    ) -> BoxFuture<'a, redis::RedisResult<redis::Value>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            if by_body {
                let eval = self.script_cmd(script, true, call);
                self.bounded(eval.query_async(&mut conn)).await
            } else {
                self.invoke(script, call, &mut conn).await
            }
        })
    }

    fn announces(&self) -> bool {
        self.announce_releases
    }
}

/// `EVALSHA <sha> …` or, `by_body`, `EVAL <body> …`; `call` appends the key count, keys and
/// arguments. Sized up front: one allocation for the arguments.
fn script_cmd(script: &Script, by_body: bool, call: &dyn Fn(&mut redis::Cmd)) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(8, 160 + if by_body { script.body().len() } else { 0 });
    if by_body {
        cmd.arg("EVAL").arg(script.body());
    } else {
        cmd.arg("EVALSHA").arg(script.sha());
    }
    call(&mut cmd);
    cmd
}
