//! Locks on a connection pool your service already has (features `deadpool` and `bb8`).
//!
//! [`LockManagerBuilder::build_pool`](crate::LockManagerBuilder::build_pool) takes a
//! [`deadpool_redis::Pool`] (feature `deadpool`) or a
//! `bb8::Pool<bb8_redis::RedisConnectionManager>` (feature `bb8`): every [`ConnectionPool`].
//! Each command distlock sends (an acquire, an extend, a release, a batch of
//! auto-extensions) checks one connection out of the pool and returns it as soon as the
//! reply is in; no connection is held between commands, and the pooled connection type
//! needs no `Clone`.
//!
//! ```no_run
//! # #[cfg(feature = "deadpool")]
//! async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//!     use std::time::Duration;
//!
//!     let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379")
//!         .create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
//!     let locks = distlock::LockManager::builder()
//!         .with_command_timeout(Duration::from_millis(500))
//!         .build_pool(pool)?;
//!     let guard = locks.lock("jobs:nightly").await?;
//!     guard.release().await?;
//!     Ok(())
//! }
//! ```
//!
//! # Time bounds and an exhausted pool
//!
//! The builder's [command timeout](crate::LockManagerBuilder::with_command_timeout) bounds
//! the checkout and the command together, whatever the pool's own timeouts are (deadpool
//! waits for a free connection forever unless configured otherwise). When no connection
//! comes free in time the call fails with [`Error::Redis`] whose
//! message says the pool is exhausted, its source a [`PoolExhausted`] ([`exhausted`] and
//! [`is_exhausted`] find it); it is a time-out
//! ([`Error::is_transient`]), so [`lock`](crate::LockManager::lock)
//! and friends retry it within their wait budget like any connection failure, and
//! [`try_lock`](crate::LockManager::try_lock) returns it at once. A connection that breaks
//! mid-command fails that command only: the pool checks connections before handing them
//! out (deadpool's recycle, bb8's `test_on_check_out`) and opens a new one.
//!
//! Size the pool for the lock traffic too: a service that holds every connection while it
//! waits for a lock starves its own lock calls.
//!
//! # Release notifications
//!
//! A pool has no connection that can subscribe: waiters poll with the backoff policy
//! unless you pass a client for one subscription connection per manager with
//! [`with_notify_via`](crate::LockManagerBuilder::with_notify_via):
//!
//! ```no_run
//! # #[cfg(feature = "deadpool")]
//! fn demo(pool: deadpool_redis::Pool) -> distlock::Result<distlock::LockManager> {
//!     let client = distlock::redis::Client::open("redis://127.0.0.1:6379")?;
//!     distlock::LockManager::builder()
//!         .with_notify_via(client)
//!         .build_pool(pool)
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::ops::DerefMut;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};
use tokio::time::Instant;

use crate::error::{Error, timed_out};

/// A connection pool a [`LockManager`](crate::LockManager) can run on: see the
/// [module docs](self). Implemented for [`deadpool_redis::Pool`] (feature `deadpool`) and
/// `bb8::Pool<bb8_redis::RedisConnectionManager>` (feature `bb8`); sealed.
pub trait ConnectionPool: sealed::Source {}

impl<P: sealed::Source> ConnectionPool for P {}

use sealed::Checkout;

mod sealed {
    use super::*;

    /// Why a pool gave no connection.
    pub enum Checkout {
        /// The pool's own wait for a free connection timed out.
        Exhausted,
        /// Opening (or checking) a connection failed.
        Redis(RedisError),
        /// The pool cannot be used (closed, misconfigured).
        Unusable(String),
    }

    /// What distlock needs of a pool: a connection, and how full the pool is.
    pub trait Source: Clone + Send + Sync + 'static {
        /// A checked-out connection, returned to the pool when dropped.
        type Conn: DerefMut<Target = MultiplexedConnection> + Send;

        /// One connection out of the pool.
        fn checkout(&self) -> impl Future<Output = Result<Self::Conn, Checkout>> + Send;

        /// How full the pool is, for the exhaustion error.
        fn usage(&self) -> String;

        /// Every connection the pool may open is open and checked out.
        fn full(&self) -> bool;
    }
}

#[cfg(feature = "deadpool")]
impl sealed::Source for deadpool_redis::Pool {
    type Conn = deadpool_redis::Connection;

    async fn checkout(&self) -> Result<Self::Conn, Checkout> {
        use deadpool_redis::{PoolError, TimeoutType};
        self.get().await.map_err(|e| match e {
            PoolError::Timeout(TimeoutType::Wait) => Checkout::Exhausted,
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => Checkout::Redis(
                timed_out("timed out opening or checking a pooled connection"),
            ),
            PoolError::Backend(e) => Checkout::Redis(e),
            other => Checkout::Unusable(other.to_string()),
        })
    }

    fn usage(&self) -> String {
        let status = self.status();
        format!(
            "{} of at most {} connections open, {} idle, {} callers waiting",
            status.size, status.max_size, status.available, status.waiting
        )
    }

    fn full(&self) -> bool {
        let status = self.status();
        status.size >= status.max_size && status.available == 0
    }
}

#[cfg(feature = "bb8")]
impl sealed::Source for bb8::Pool<bb8_redis::RedisConnectionManager> {
    type Conn = bb8::PooledConnection<'static, bb8_redis::RedisConnectionManager>;

    async fn checkout(&self) -> Result<Self::Conn, Checkout> {
        self.get_owned().await.map_err(|e| match e {
            bb8::RunError::TimedOut => Checkout::Exhausted,
            bb8::RunError::User(e) => Checkout::Redis(e),
        })
    }

    fn usage(&self) -> String {
        let state = self.state();
        format!(
            "{} of at most {} connections open, {} idle",
            state.connections,
            self.config().max_size,
            state.idle_connections
        )
    }

    fn full(&self) -> bool {
        let state = self.state();
        state.connections >= self.config().max_size && state.idle_connections == 0
    }
}

/// The cause of the error a call gives when the pool had no free connection in time: the
/// source of an [`Error::Redis`] that is a time-out (so
/// [`Error::is_transient`]). Tell it apart with [`is_exhausted`].
#[derive(Debug, Clone)]
pub struct PoolExhausted {
    waited: Duration,
    usage: String,
}

impl PoolExhausted {
    /// How long the call waited for a connection.
    pub fn waited(&self) -> Duration {
        self.waited
    }
}

impl fmt::Display for PoolExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no connection from the pool within {:?}: the pool is exhausted ({})",
            self.waited, self.usage
        )
    }
}

impl std::error::Error for PoolExhausted {}

impl From<PoolExhausted> for RedisError {
    fn from(exhausted: PoolExhausted) -> Self {
        std::io::Error::new(std::io::ErrorKind::TimedOut, exhausted).into()
    }
}

/// The [`PoolExhausted`] behind `err`, if the pool had no free connection in time.
///
/// ```no_run
/// # async fn demo(locks: distlock::LockManager) -> distlock::Result<()> {
/// match locks.try_lock("jobs:nightly").await {
///     Ok(guard) => guard.release().await?,
///     Err(e) if distlock::pool::exhausted(&e).is_some() => eprintln!("pool too small: {e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok(()) }
/// ```
pub fn exhausted(err: &Error) -> Option<&PoolExhausted> {
    use std::error::Error as _;
    use std::sync::Arc;
    let Error::Redis(e) = err else {
        return None;
    };
    // redis-rs keeps the I/O error behind an `Arc`; the pool's error is its payload.
    let source = e.source()?;
    let io = match source.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
        Some(inner) => inner.downcast_ref::<std::io::Error>()?,
        None => source.downcast_ref::<std::io::Error>()?,
    };
    io.get_ref()?.downcast_ref::<PoolExhausted>()
}

/// `true` when `err` says the pool had no free connection in time; see [`exhausted`].
pub fn is_exhausted(err: &Error) -> bool {
    exhausted(err).is_some()
}

/// A pool as one connection: each command checks a connection out, runs, and returns it;
/// checkout and command together are bounded by `timeout`.
#[derive(Clone)]
pub(crate) struct Pooled<P> {
    pool: P,
    timeout: Duration,
}

impl<P: sealed::Source> Pooled<P> {
    pub(crate) fn new(pool: P, timeout: Duration) -> Self {
        Pooled { pool, timeout }
    }

    /// One connection out of the pool, and the deadline of the command to run on it.
    async fn checkout(&self) -> redis::RedisResult<(P::Conn, Instant)> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        match tokio::time::timeout_at(deadline, self.pool.checkout()).await {
            Ok(Ok(conn)) => Ok((conn, deadline)),
            Ok(Err(Checkout::Redis(e))) => Err(e),
            Ok(Err(Checkout::Unusable(why))) => Err(RedisError::from((
                ErrorKind::Client,
                "the connection pool cannot be used",
                why,
            ))),
            // Out of time with room in the pool: opening a connection is what took long.
            Err(_) if !self.pool.full() => Err(timed_out(format!(
                "no connection from the pool within {:?}: opening one did not finish ({})",
                started.elapsed(),
                self.pool.usage()
            ))),
            Ok(Err(Checkout::Exhausted)) | Err(_) => Err(PoolExhausted {
                waited: started.elapsed(),
                usage: self.pool.usage(),
            }
            .into()),
        }
    }

    /// The reply of a command bounded by the deadline.
    fn reply<T>(
        &self,
        reply: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> redis::RedisResult<T> {
        reply.unwrap_or_else(|_| {
            Err(timed_out(format!(
                "no reply from Redis within {:?}",
                self.timeout
            )))
        })
    }
}

impl<P: sealed::Source> ConnectionLike for Pooled<P> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            // The connection goes back to the pool when this future ends or is dropped.
            let (mut conn, deadline) = self.checkout().await?;
            let reply = tokio::time::timeout_at(deadline, conn.req_packed_command(cmd)).await;
            self.reply(reply)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (mut conn, deadline) = self.checkout().await?;
            let reply = tokio::time::timeout_at(
                deadline,
                conn.req_packed_commands(pipeline, offset, count),
            )
            .await;
            self.reply(reply)
        })
    }

    /// The pool's connections are the pool's business; distlock does not use this.
    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_pool_is_told_apart_from_other_time_outs() {
        let err = Error::Redis(
            PoolExhausted {
                waited: Duration::from_millis(300),
                usage: "1 of at most 1".into(),
            }
            .into(),
        );
        assert!(err.is_transient());
        assert_eq!(
            exhausted(&err).map(|e| e.waited()),
            Some(Duration::from_millis(300))
        );
        assert!(
            err.to_string()
                .contains("the pool is exhausted (1 of at most 1)")
        );
        assert!(!is_exhausted(&Error::Redis(timed_out("no reply"))));
    }
}
