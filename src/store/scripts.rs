//! Scripts of other lease kinds (semaphore permits, read-write locks) on a store's
//! connection: the seam they share with the lock's own commands.

use redis::aio::ConnectionLike;

use super::{BoxFuture, RedisStore, script_cmd};
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
                let eval = script_cmd(script, true, call);
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
