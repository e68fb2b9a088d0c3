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
//!
//! The braces make `<name>` the Redis Cluster hash tag: all three share one slot.
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
//!   channel; compare-and-delete, then an announcement on the channel.
//! - **Extend**: [`EXTEND`], key lease, arguments token and TTL in ms; compare-and-`PEXPIRE`.
//! - **Extend many** (auto-extension): [`EXTEND_MANY`], keys the leases, arguments token and
//!   TTL in ms per lease.
//!
//! Tokens are 32 lower-case hex digits (a UUID v4 from the operating system's CSPRNG),
//! fresh for every acquisition. Scripts are sent by SHA (`EVALSHA`); when the server
//! answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`), by body (`EVAL`), which also
//! caches them again. A release retried in the background is always sent by body.
//!
//! Result codes shared by the compare-and-act scripts:
//! `1` done, `0` the key is gone (expired), `-1` the key holds another token (or a value
//! of another type).

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
pub const ACQUIRE_FENCED: &str = r#"
-- The counter is read and checked before anything is written: a counter another program
-- wrote (not an integer, negative, or too large for Lua's doubles to count exactly) is an
-- error, and no lease is left behind by the failed call.
local raw = redis.call('GET', KEYS[2])
local last = 0
if raw then
  if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
    return redis.error_reply('ERR distlock: the fence counter ' .. KEYS[2] ..
      ' holds ' .. string.sub(raw, 1, 32) .. ', not a counter below 2^53')
  end
  last = tonumber(raw)
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local now = redis.call('TIME')
  local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
  local fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[3])
  return {1, fence}
end
-- A key of another type is not a lease held by someone: say so instead of "contended".
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' then
  return redis.error_reply('WRONGTYPE lock key holds a ' .. kind .. ', not a lease')
end
return {0, redis.call('PTTL', KEYS[1])}
"#;

/// Delete the lease only if it still holds our token, and announce it to waiters.
///
/// `KEYS[1]` lease key. `ARGV[1]` token, `ARGV[2]` (optional) the channel to publish the release
/// on.
///
/// The announcement is a courtesy: it runs under `pcall`, so a user without permission on
/// the channel (Redis 7's default `acl-pubsub-default resetchannels`) still gets a release
/// that reports what it did. A script cannot roll back the `DEL` anyway.
pub const RELEASE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] then redis.pcall('PUBLISH', ARGV[2], '') end
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

/// A script of the protocol: its body and its SHA1, computed once.
pub(crate) struct Script {
    body: &'static str,
    sha: String,
}

impl Script {
    pub(crate) fn new(body: &'static str) -> Self {
        Script {
            sha: redis::Script::new(body).get_hash().to_owned(),
            body,
        }
    }

    /// The Lua source, for `EVAL`.
    pub(crate) fn body(&self) -> &'static str {
        self.body
    }

    /// The SHA1 of the source, for `EVALSHA`.
    pub(crate) fn sha(&self) -> &str {
        &self.sha
    }
}

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
    /// [`super::EXTEND_MANY`].
    pub(crate) static EXTEND_MANY: LazyLock<Script> =
        LazyLock::new(|| Script::new(super::EXTEND_MANY));
}

/// The semaphore's scripts ([`LockManager::semaphore`](crate::LockManager::semaphore)):
/// at most N permits on one name, each permit a lease.
///
/// Semaphore `<name>` under prefix `<prefix>` keeps its permits in the sorted set
/// `<prefix>sem:{<name>}` (member: the permit's token; score: its expiry in ms on the
/// server's clock), its fencing counter in `<prefix>sem:{<name>}:fence`, and announces
/// releases on `<prefix>sem:{<name>}:released`. Every script reads `TIME` once, drops the
/// permits that expired, and never trusts a client's clock. The set's own TTL follows its
/// longest permit, so an unused semaphore leaves nothing behind.
///
/// Result codes as for the lock: `1` done, `0` the permit is gone (expired), `-1` the key
/// holds something that is not a set of permits.
pub mod semaphore {
    /// Take a permit if fewer than N are held.
    ///
    /// `KEYS[1]` permits, `KEYS[2]` fence counter. `ARGV[1]` token, `ARGV[2]` TTL in ms,
    /// `ARGV[3]` N, `ARGV[4]` `1` for a fencing token, `ARGV[5]` fence counter TTL in ms.
    /// Returns `{1, fence}` (fence `0` when not asked for) or `{0, ms until the first
    /// permit expires}`.
    pub const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE semaphore key holds a ' .. kind .. ', not permits')
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  local fence = 0
  if ARGV[4] == '1' then
    local raw = redis.call('GET', KEYS[2])
    local last = 0
    if raw then
      if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
        return redis.error_reply('ERR distlock: the fence counter ' .. KEYS[2] ..
          ' holds ' .. string.sub(raw, 1, 32) .. ', not a counter below 2^53')
      end
      last = tonumber(raw)
    end
    local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
    fence = last + 1
    if now_us > fence then fence = now_us end
    redis.call('SET', KEYS[2], string.format('%d', fence), 'PX', ARGV[5])
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], longest[2])
  return {1, fence}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
"#;

    /// Give a permit a new TTL if it is still held.
    ///
    /// `KEYS[i]` permits of permit i (one key per permit: a batch of one semaphore's
    /// permits repeats it). `ARGV[2i-1]` token i, `ARGV[2i]` new TTL in ms. One result code
    /// per permit.
    pub const EXTEND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local score = redis.pcall('ZSCORE', key, ARGV[2 * i - 1])
  if type(score) == 'table' and score.err then
    out[i] = -1
  elseif not score then
    out[i] = 0
  elseif tonumber(score) <= now then
    redis.call('ZREM', key, ARGV[2 * i - 1])
    out[i] = 0
  else
    redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2 * i]), ARGV[2 * i - 1])
    local longest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', key, longest[2])
    out[i] = 1
  end
end
return out
"#;

    /// Give a permit back, and announce it to waiters.
    ///
    /// `KEYS[1]` permits. `ARGV[1]` token, `ARGV[2]` (optional) the release channel,
    /// `ARGV[3]` (optional) the announcement: empty wakes one waiter per manager, `*`
    /// every waiter (a read permit given back may let every waiting reader and writer try).
    pub const RELEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = redis.pcall('ZSCORE', KEYS[1], ARGV[1])
if type(score) == 'table' and score.err then return -1 end
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] then redis.pcall('PUBLISH', ARGV[2], ARGV[3] or '') end
if tonumber(score) <= now then return 0 end
return 1
"#;

    /// The scripts, hashed once.
    pub(crate) mod script {
        use std::sync::LazyLock;

        use crate::protocol::Script;

        /// [`super::ACQUIRE`].
        pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(super::ACQUIRE));
        /// [`super::EXTEND`].
        pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| Script::new(super::EXTEND));
        /// [`super::RELEASE`].
        pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(super::RELEASE));
    }
}

/// The read-write lock's scripts ([`LockManager::rw_lock`](crate::LockManager::rw_lock)):
/// many readers or one writer, writers preferred.
///
/// Lock `<name>`: readers in the sorted set `<prefix>rw:{<name>}` (member: token; score:
/// expiry in ms on the server's clock), the writer's lease `<prefix>rw:{<name>}:w`, a waiting
/// writer's intent `<prefix>rw:{<name>}:i` (a short lease that stops new readers, so a
/// stream of readers cannot starve writers), the fencing counter
/// `<prefix>rw:{<name>}:fence`, and the release channel `<prefix>rw:{<name>}:released`.
/// Readers extend and give back their permits with [`semaphore::EXTEND`] and
/// [`semaphore::RELEASE`]; the writer with [`EXTEND`] and [`RELEASE`] on its lease.
pub mod rw {
    /// Take a read permit unless a writer holds the lock or waits for it.
    ///
    /// `KEYS[1]` readers, `KEYS[2]` writer, `KEYS[3]` intent, `KEYS[4]` fence counter.
    /// `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` `1` for a fencing token,
    /// `ARGV[4]` fence counter TTL in ms. Returns `{1, fence}` or `{0, ms to wait}`.
    pub const READ: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, key in ipairs({KEYS[2], KEYS[3]}) do
  local left = redis.call('PTTL', key)
  if left > 0 then return {0, left} end
  if left == -1 then return {0, 1000} end
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE read-write lock key holds a ' .. kind .. ', not readers')
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local fence = 0
if ARGV[3] == '1' then
  local raw = redis.call('GET', KEYS[4])
  local last = 0
  if raw then
    if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
      return redis.error_reply('ERR distlock: the fence counter ' .. KEYS[4] ..
        ' holds ' .. string.sub(raw, 1, 32) .. ', not a counter below 2^53')
    end
    last = tonumber(raw)
  end
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', KEYS[4], string.format('%d', fence), 'PX', ARGV[4])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], longest[2])
return {1, fence}
"#;

    /// Take the write lease when no writer holds it and no reader holds a permit;
    /// otherwise leave an intent that stops new readers while this writer waits.
    ///
    /// `KEYS[1]` readers, `KEYS[2]` writer, `KEYS[3]` intent, `KEYS[4]` fence counter.
    /// `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` `1` for a fencing token,
    /// `ARGV[4]` fence counter TTL in ms, `ARGV[5]` intent TTL in ms. Returns `{1, fence}`
    /// or `{0, ms to wait}` (at most half the intent's TTL, so a waiting writer renews it).
    pub const WRITE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local intent_ttl = tonumber(ARGV[5])
local writer = redis.call('PTTL', KEYS[2])
if writer > 0 or writer == -1 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', intent_ttl)
  return {0, math.max(1, math.min(writer > 0 and writer or 1000, math.floor(intent_ttl / 2)))}
end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE read-write lock key holds a ' .. kind .. ', not readers')
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) > 0 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', intent_ttl)
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.min(tonumber(first[2]) - now, math.floor(intent_ttl / 2)))}
end
local fence = 0
if ARGV[3] == '1' then
  local raw = redis.call('GET', KEYS[4])
  local last = 0
  if raw then
    if not string.match(raw, '^%d+$') or #raw > 16 or tonumber(raw) >= 9007199254740992 then
      return redis.error_reply('ERR distlock: the fence counter ' .. KEYS[4] ..
        ' holds ' .. string.sub(raw, 1, 32) .. ', not a counter below 2^53')
    end
    last = tonumber(raw)
  end
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  fence = last + 1
  if now_us > fence then fence = now_us end
  redis.call('SET', KEYS[4], string.format('%d', fence), 'PX', ARGV[4])
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
-- Every attempt has its own token, so the intent is not ours to compare: a writer got in,
-- and any other waiting writer sets its intent again at its next attempt.
redis.call('DEL', KEYS[3])
return {1, fence}
"#;

    /// Give the write lease back if it still holds our token, and announce it to every
    /// waiter (`*`): readers may all go in.
    ///
    /// `KEYS[1]` writer. `ARGV[1]` token, `ARGV[2]` (optional) the release channel.
    pub const RELEASE_WRITE: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] then redis.pcall('PUBLISH', ARGV[2], '*') end
  return 1
elseif v then
  return -1
end
return 0
"#;

    /// The scripts, hashed once.
    pub(crate) mod script {
        use std::sync::LazyLock;

        use crate::protocol::Script;

        /// [`super::RELEASE_WRITE`].
        pub(crate) static RELEASE_WRITE: LazyLock<Script> =
            LazyLock::new(|| Script::new(super::RELEASE_WRITE));
        /// [`super::READ`].
        pub(crate) static READ: LazyLock<Script> = LazyLock::new(|| Script::new(super::READ));
        /// [`super::WRITE`].
        pub(crate) static WRITE: LazyLock<Script> = LazyLock::new(|| Script::new(super::WRITE));
    }
}
