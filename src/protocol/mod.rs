//! The wire protocol: every command and Lua script distlock sends, so that a program in
//! another language can take and release the same locks, and so that what distlock costs
//! a server can be read here.
//!
//! # Keys
//!
//! Lock `<name>` under prefix `<prefix>` (default `distlock:`):
//!
//! | what | key or channel |
//! |---|---|
//! | the lease: a string holding the holder's token, with a TTL | `<prefix>{<name>}` |
//! | the fencing counter (fenced locks only) | `<prefix>{<name>}:fence` |
//! | the release channel | `<prefix>{<name>}:released` |
//! | fair mode: the waiter queue, ids by arrival (a sorted set) | `<prefix>{<name>}:q` |
//! | fair mode: each waiter's entry expiry, server ms (a hash) | `<prefix>{<name>}:qx` |
//! | fair mode on one primary: handoff terms and handed leases (a hash) | `<prefix>{<name>}:qh` |
//!
//! The braces make `<name>` the Redis Cluster hash tag: all of them share one slot.
//!
//! # Commands
//!
//! - **Acquire** (the default, no fencing token): `SET <lease> <token> NX PX <ttl-ms> GET`.
//!   A nil reply means the lease is ours; a string reply is another holder's token (then
//!   `PTTL <lease>` tells how long it has left); a `WRONGTYPE` error means the key holds
//!   something that is not a lease. Needs Redis 7.0 (`NX` with `GET`).
//! - **Acquire with a fencing token**: [`ACQUIRE_FENCED`] (`EVALSHA`), keys lease and fence
//!   counter, arguments token, TTL in ms, counter TTL in ms.
//! - **Release**: [`RELEASE`], key lease, arguments token and (optionally) the release
//!   channel and the announcement's payload; compare-and-delete, then an announcement on
//!   the channel: empty (one waiter of each manager may go), or `~` from each node of a
//!   lock over several primaries (each manager counts the repeats once). On a Redis Cluster
//!   (`connect_cluster`) the scripts announce with `SPUBLISH` instead (sharded pub/sub: the
//!   channel shares the lock's hash tag, so only the lock's shard carries the message).
//! - **Extend**: [`EXTEND`], key lease, arguments token and TTL in ms; compare-and-`PEXPIRE`.
//! - **Pass** (a lock over several primaries, from a holder to the next waiter of the same
//!   manager): [`PASS`], key lease, arguments the holder's token, the waiter's fresh token
//!   and its TTL in ms; compare-and-`SET`, so the lease goes from one token to the other
//!   without the key ever being free, in one round trip instead of a release and an
//!   acquire.
//! - **Extend many** (auto-extension): [`EXTEND_MANY`], keys the leases, arguments token and
//!   TTL in ms per lease.
//! - **Fair mode** (`LockOptions::with_fair`): acquire with [`ACQUIRE_FAIR`] (queues the
//!   caller in Redis when it must wait), release with [`RELEASE_FAIR`] (the announcement
//!   names the next waiter, on the channel `<prefix>{<name>}:released:<manager id>` of the
//!   manager it waits in), and [`LEAVE_QUEUE`] when a waiter gives up. A waiter's entry
//!   is a short lease its retries refresh, so a crashed waiter holds up the queue for at
//!   most that lease. On one primary (not over several) a waiter also leaves its handoff
//!   terms, and the release (the same script, given the fence counter and the handoff
//!   hash too) writes the next waiter's lease itself, until its TTL or its queue entry ends
//!   (whichever comes first), and announces `<id> <token> <fence>`: the waiter holds
//!   without an acquire of its own, and extends the lease to its TTL in the background. A
//!   handed lease nobody takes up (a crashed waiter) ends with its queue entry.
//!
//! Tokens are 32 lower-case hex digits (a UUID v4 from the operating system's CSPRNG),
//! fresh for every acquisition. Scripts are sent by SHA (`EVALSHA`); when the server
//! answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`), by body (`EVAL`), which also
//! caches them again. A release retried in the background is always sent by body.
//!
//! Result codes shared by the compare-and-act scripts:
//! `1` done, `0` the key is gone (expired), `-1` the key holds another token (or a value
//! of another type).

/// The fencing counter's check (shared by [`ACQUIRE_FENCED`] and [`ACQUIRE_FAIR`]): `raw`
/// holds the counter's value; sets `last`.
macro_rules! fence_counter_check {
    () => {
        r#"if raw then
  if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
    return redis.error_reply('ERR distlock: the fence counter ' .. KEYS[2] ..
      ' holds ' .. string.sub(raw, 1, 32) .. ', not a counter below 2^53')
  end
  last = tonumber(raw)
end
"#
    };
}

/// The next fencing token from `last` and the server clock, written back to the counter
/// (shared by [`ACQUIRE_FENCED`] and [`ACQUIRE_FAIR`]): sets `fence`.
macro_rules! fence_next {
    () => {
        r#"  local now = redis.call('TIME')
  local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
"#
    };
}

/// `next_fence(key, ttl_ms, t)`: the semaphore's and the read-write lock's fencing token,
/// the same rule as [`ACQUIRE_FENCED`] (`max(counter + 1, server time in µs)`, the counter
/// checked before it is used), as one Lua function for scripts whose keys and arguments sit
/// elsewhere. `t` is the script's `TIME`; returns the token, or `false` and an error text.
macro_rules! fence_fn {
    () => {
        r#"
local function next_fence(key, ttl_ms, t)
  local raw = redis.call('GET', key)
  local last = 0
  if raw then
    if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
      return false, 'ERR distlock: the fence counter ' .. key .. ' holds ' ..
        string.sub(raw, 1, 32) .. ', not a counter below 2^53'
    end
    last = tonumber(raw)
  end
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', key, string.format('%d', fence), 'PX', ttl_ms)
  return fence
end"#
    };
}

/// Take the lease if the key is free and hand out a fencing token.
///
/// `KEYS[1]` lease key, `KEYS[2]` fence counter key (same hash tag).
/// `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` fence counter TTL in ms.
///
/// Returns `{1, fence}` when taken, `{0, pttl}` when held by another owner, and a
/// `WRONGTYPE` error when the key holds something other than a string (not a lease).
///
/// The fencing token is `max(counter + 1, server time in µs)`: it keeps increasing even when
/// the counter key is lost (flush, restart without persistence, failover to a replica that
/// missed the last write), as long as the server clock does not step backwards. That is
/// also why the counter may expire instead of living forever.
pub const ACQUIRE_FENCED: &str = concat!(
    r#"
-- The counter is read and checked before anything is written: a counter another program
-- wrote (not an integer, negative, or too large for Lua's doubles to count exactly) is an
-- error, and no lease is left behind by the failed call.
local raw = redis.call('GET', KEYS[2])
local last = 0
"#,
    fence_counter_check!(),
    r#"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
"#,
    fence_next!(),
    r#"  return {1, fence}
end
-- A key of another type is not a lease held by someone: say so instead of "contended".
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' then
  return redis.error_reply('WRONGTYPE lock key holds a ' .. kind .. ', not a lease')
end
return {0, redis.call('PTTL', KEYS[1])}
"#
);

/// Delete the lease only if it still holds our token, and announce it to waiters.
///
/// `KEYS[1]` lease key. `ARGV[1]` token, `ARGV[2]` (optional) the channel to publish the release
/// on, `ARGV[3]` (optional) the message to publish (empty if absent).
///
/// The announcement is a courtesy: it runs under `pcall`, so a user without permission on
/// the channel (Redis 7's default `acl-pubsub-default resetchannels`) still gets a release
/// that reports what it did. A script cannot roll back the `DEL` anyway.
pub const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] then redis.pcall('PUBLISH', ARGV[2], ARGV[3] or '') end
  return 1
elseif v then
  return -1
end
return 0
"#;

/// Set a new TTL on the lease only if it still holds our token.
///
/// `KEYS[1]` lease key. `ARGV[1]` token, `ARGV[2]` new TTL in ms.
pub const EXTEND: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
elseif v then
  return -1
end
return 0
"#;

/// Hand the lease to another token, only if it still holds ours: the holder's release
/// when the next waiter of its manager takes the lease over.
///
/// `KEYS[1]` lease key. `ARGV[1]` the holder's token, `ARGV[2]` the next holder's token,
/// `ARGV[3]` its TTL in ms. Nothing is announced: the lock is never free.
pub const PASS: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
elseif v then
  return -1
end
return 0
"#;

/// [`EXTEND`] for many leases in one call: the auto-extension task's batch.
///
/// `KEYS[i]` lease key i. `ARGV[2i-1]` token i, `ARGV[2i]` new TTL in ms for lease i.
/// Returns one result code per key, in order. Each key's outcome is its own: a key that
/// another program replaced by a value of another type (`GET` fails with `WRONGTYPE`) is
/// not our lease any more and answers `-1`, and the other leases are auto-extended as usual.
pub const EXTEND_MANY: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.pcall('GET', key)
  if type(v) == 'table' and v.err then
    out[i] = -1
  elseif v == ARGV[2 * i - 1] then
    redis.call('PEXPIRE', key, ARGV[2 * i])
    out[i] = 1
  elseif v then
    out[i] = -1
  else
    out[i] = 0
  end
end
return out
"#;

mod fair;
pub use fair::{ACQUIRE_FAIR, LEAVE_QUEUE, RELEASE_FAIR};

/// A script of the protocol: its body and its SHA1, computed once.
pub(crate) struct Script {
    body: std::borrow::Cow<'static, str>,
    sha: String,
    /// The same script announcing with `SPUBLISH` (sharded pub/sub: the message stays
    /// within the lock's shard of a Redis Cluster), if it announces at all.
    sharded: Option<Box<Script>>,
}

impl Script {
    pub(crate) fn new(body: &'static str) -> Self {
        let sharded = body
            .contains(PUBLISH)
            .then(|| Box::new(Self::hashed(body.replace(PUBLISH, SPUBLISH).into(), None)));
        Self::hashed(body.into(), sharded)
    }

    fn hashed(body: std::borrow::Cow<'static, str>, sharded: Option<Box<Script>>) -> Self {
        Script {
            sha: redis::Script::new(&body).get_hash().to_owned(),
            body,
            sharded,
        }
    }

    /// The Lua source, for `EVAL`.
    pub(crate) fn body(&self) -> &str {
        &self.body
    }

    /// The SHA1 of the source, for `EVALSHA`.
    pub(crate) fn sha(&self) -> &str {
        &self.sha
    }

    /// The variant that announces releases with `SPUBLISH` instead of `PUBLISH` (itself
    /// if it announces nothing).
    pub(crate) fn sharded(&self) -> &Script {
        self.sharded.as_deref().unwrap_or(self)
    }
}

/// How the scripts announce a release: a classic publication, which a Redis Cluster
/// carries to every node.
const PUBLISH: &str = "redis.pcall('PUBLISH',";

/// How a cluster store's scripts announce: sharded, so only the nodes of the lock's shard
/// carry the message (`SSUBSCRIBE` listens there).
const SPUBLISH: &str = "redis.pcall('SPUBLISH',";

/// The scripts, hashed once.
pub(crate) mod script {
    use std::sync::LazyLock;

    use super::Script;

    /// [`super::ACQUIRE_FENCED`].
    pub(crate) static ACQUIRE_FENCED: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::ACQUIRE_FENCED));
    /// [`super::RELEASE`].
    pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(super::RELEASE));
    /// [`super::EXTEND`].
    pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(super::EXTEND));
    /// [`super::PASS`].
    pub(crate) static PASS: LazyLock<Script> = LazyLock::new(|| Script::new(super::PASS));
    /// [`super::EXTEND_MANY`].
    pub(crate) static EXTEND_MANY: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::EXTEND_MANY));
    /// [`super::ACQUIRE_FAIR`].
    pub(crate) static ACQUIRE_FAIR: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::ACQUIRE_FAIR));
    /// [`super::RELEASE_FAIR`].
    pub(crate) static RELEASE_FAIR: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::RELEASE_FAIR));
    /// [`super::LEAVE_QUEUE`].
    pub(crate) static LEAVE_QUEUE: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::LEAVE_QUEUE));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_shared_lua_leaves_the_published_scripts_as_they_were() {
        assert_eq!(
            super::script::ACQUIRE_FENCED.sha(),
            "8a1e14b89848fc3911dd65bd38e5f8907422ab52"
        );
        // RELEASE gained its optional payload (ARGV[3]) for locks over several primaries;
        // a caller that sends two arguments gets the same behaviour as before.
        assert_eq!(
            super::script::RELEASE.sha(),
            "8294ff361279f859e954d8be0cfd6d2653962811"
        );
    }

    #[test]
    fn the_sharded_variants_announce_with_spublish_and_change_nothing_else() {
        use super::{rw, script, semaphore};
        let announcing = [
            (&*script::RELEASE, 1),
            (&*script::RELEASE_FAIR, 2),
            (&*script::LEAVE_QUEUE, 2),
            (&*semaphore::script::RELEASE, 1),
            (&*rw::script::RELEASE_WRITE, 1),
        ];
        for (plain, announcements) in announcing {
            let sharded = plain.sharded();
            assert_eq!(sharded.body().matches("'PUBLISH'").count(), 0);
            assert_eq!(
                sharded.body().matches("'SPUBLISH'").count(),
                plain.body().matches("'PUBLISH'").count()
            );
            assert!(sharded.body().matches("'SPUBLISH'").count() >= announcements);
            assert_eq!(
                sharded.body().replace("'SPUBLISH'", "'PUBLISH'"),
                plain.body()
            );
            assert_ne!(sharded.sha(), plain.sha());
        }
        // Scripts that announce nothing are their own sharded variant.
        for quiet in [
            &*script::ACQUIRE_FENCED,
            &*script::EXTEND,
            &*script::EXTEND_MANY,
        ] {
            assert!(std::ptr::eq(quiet.sharded(), quiet));
        }
    }
}

pub mod semaphore;

pub mod rw;
