//! The read-write lock's scripts ([`LockManager::rw_lock`](crate::LockManager::rw_lock)):
//! many readers or one writer, writers preferred.
//!
//! Lock `<name>`: readers in the sorted set `<prefix>rw:{<name>}` (member: token; score:
//! expiry in ms on the server's clock), the writer's lease `<prefix>rw:{<name>}:w`, a waiting
//! writer's intent `<prefix>rw:{<name>}:i` (a short lease that stops new readers, so a
//! stream of readers cannot starve writers), the fencing counter
//! `<prefix>rw:{<name>}:fence`, and the release channel `<prefix>rw:{<name>}:released`.
//! Readers extend and give back their permits with
//! [`semaphore::EXTEND`](super::semaphore::EXTEND) and
//! [`semaphore::RELEASE`](super::semaphore::RELEASE); the writer extends with
//! [`EXTEND`](super::EXTEND) and gives the lease back with [`RELEASE_WRITE`].

/// Take a read permit unless a writer holds the lock or waits for it.
///
/// `KEYS[1]` readers, `KEYS[2]` writer, `KEYS[3]` intent, `KEYS[4]` fence counter.
/// `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` `1` for a fencing token,
/// `ARGV[4]` fence counter TTL in ms. Returns `{1, fence}` or `{0, ms to wait}`.
pub const READ: &str = concat!(
    fence_fn!(),
    r#"
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
  local err
  fence, err = next_fence(KEYS[4], ARGV[4], t)
  if not fence then return redis.error_reply(err) end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], longest[2])
return {1, fence}
"#
);

/// Take the write lease when no writer holds it and no reader holds a permit;
/// otherwise leave an intent that stops new readers while this writer waits.
///
/// `KEYS[1]` readers, `KEYS[2]` writer, `KEYS[3]` intent, `KEYS[4]` fence counter.
/// `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` `1` for a fencing token,
/// `ARGV[4]` fence counter TTL in ms, `ARGV[5]` intent TTL in ms. Returns `{1, fence}`
/// or `{0, ms to wait}` (at most half the intent's TTL, so a waiting writer renews it).
pub const WRITE: &str = concat!(
    fence_fn!(),
    r#"
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
  local err
  fence, err = next_fence(KEYS[4], ARGV[4], t)
  if not fence then return redis.error_reply(err) end
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
-- Every attempt has its own token, so the intent is not ours to compare: a writer got in,
-- and any other waiting writer sets its intent again at its next attempt.
redis.call('DEL', KEYS[3])
return {1, fence}
"#
);

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
