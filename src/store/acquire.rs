//! Taking the lease on one server: the card's `SET NX PX` (with `GET`), the contended
//! variant that asks the holder's `PTTL` in the same round trip, and the fenced script.

use std::time::Duration;

use redis::aio::ConnectionLike;

use super::{Acquire, RedisStore, fence_ttl_ms};
use crate::error::{Error, Result};
use crate::key::{LockKey, Token};
use crate::options::Ttl;
use crate::protocol::script;

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Takes the lease on this server if the key is free: the card's `SET key token NX PX
    /// ttl` (with `GET`, so one reply tells "ours", "another holder's" and "not a lease");
    /// with `fenced`, the fenced acquire script instead, which also hands out a token.
    pub(crate) async fn acquire_here(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        fenced: bool,
    ) -> Result<Acquire> {
        let mut conn = self.conn.clone();
        if fenced && self.fences {
            // Boxed: the fenced path's larger future would otherwise make every acquire's
            // future (moved on each call) that large.
            return Box::pin(self.acquire_fenced(key, token, ttl, &mut conn)).await;
        }
        let set = set_if_free(key, token, ttl);
        // A key of another type answers `WRONGTYPE`: an error, not contention.
        let held: Option<redis::Value> = self.bounded(set.query_async(&mut conn)).await?;
        let Some(held) = held else {
            return Ok(Acquire::Taken { fence: None });
        };
        // Held by another owner: how long it has left bounds the caller's wait. Only
        // contended attempts pay for this second command.
        let pttl: i64 = self
            .bounded(redis::cmd("PTTL").arg(key.lease()).query_async(&mut conn))
            .await?;
        // -1: a key without expiry (set by something else than distlock); -2: gone since.
        Ok(held_by(&held, pttl))
    }

    /// [`acquire_here`](Self::acquire_here) for a contended attempt over several
    /// primaries: the `PTTL` a "held" answer needs goes with the `SET`, in one round trip
    /// (one command more, also when the `SET` takes the key). A node that another
    /// contender holds then costs no second round trip, which the whole vote, the
    /// winner's included, would wait for.
    pub(crate) async fn acquire_here_contended(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
    ) -> Result<Acquire> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.add_command(set_if_free(key, token, ttl))
            .cmd("PTTL")
            .arg(key.lease());
        // A key of another type answers `WRONGTYPE`: an error, not contention.
        let (held, pttl): (Option<redis::Value>, i64) =
            self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(match held {
            None => Acquire::Taken { fence: None },
            Some(held) => held_by(&held, pttl),
        })
    }

    async fn acquire_fenced(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        conn: &mut C,
    ) -> Result<Acquire> {
        let call = |cmd: &mut redis::Cmd| {
            cmd.arg(2)
                .arg(key.lease())
                .arg(key.fence())
                .arg(token.as_bytes())
                .arg(ttl.as_millis())
                .arg(fence_ttl_ms(ttl));
        };
        let (taken, value): (i64, i64) = self.invoke(&script::ACQUIRE_FENCED, call, conn).await?;
        match taken {
            1 => u64::try_from(value)
                .map(|fence| Acquire::Taken { fence: Some(fence) })
                .map_err(|_| Error::unexpected_reply(format!("negative fencing token {value}"))),
            // PTTL is -1 for a key without expiry (set by something else than distlock).
            0 => Ok(Acquire::Held {
                pttl: u64::try_from(value).ok().map(Duration::from_millis),
                holder: None,
            }),
            other => Err(Error::unexpected_reply(format!("acquire returned {other}"))),
        }
    }
}

/// The card's acquire: `SET key token NX PX ttl GET` (with `GET`, one reply tells
/// "ours", "another holder's" and "not a lease").
pub(super) fn set_if_free(key: &LockKey, token: &Token, ttl: Ttl) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(key.lease())
        .arg(token.as_bytes())
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis())
        .arg("GET");
    set
}

/// "Held": the holder's token as the `SET ... GET` answered it, and the `PTTL` of its
/// lease (-1: a key without expiry, set by something else than distlock; -2: gone since).
pub(super) fn held_by(held: &redis::Value, pttl: i64) -> Acquire {
    Acquire::Held {
        pttl: u64::try_from(pttl).ok().map(Duration::from_millis),
        holder: match held {
            redis::Value::BulkString(value) => Some(holder_hash(value)),
            _ => None,
        },
    }
}

/// A hash of a holder's token (FNV-1a, 64 bit): enough to tell the holders of a lock's
/// nodes apart in one vote, never used for anything a lease depends on.
fn holder_hash(token: &[u8]) -> u64 {
    token.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
