//! The semaphore's scripts ([`LockManager::semaphore`](crate::LockManager::semaphore)):
//! at most N permits on one name, each permit a lease.
//!
//! Semaphore `<name>` under prefix `<prefix>` keeps its permits in the sorted set
//! `<prefix>sem:{<name>}` (member: the permit's token; score: its expiry in ms on the
//! server's clock), its fencing counter in `<prefix>sem:{<name>}:fence`, and announces
//! releases on `<prefix>sem:{<name>}:released`. Every script reads `TIME` once, drops the
//! permits that expired, and never trusts a client's clock. The set's own TTL follows its
//! longest permit, so an unused semaphore leaves nothing behind.
//!
//! Result codes as for the lock: `1` done, `0` the permit is gone (expired), `-1` the key
//! holds something that is not a set of permits.

/// Take a permit if fewer than N are held.
///
/// `KEYS[1]` permits, `KEYS[2]` fence counter. `ARGV[1]` token, `ARGV[2]` TTL in ms,
/// `ARGV[3]` N, `ARGV[4]` `1` for a fencing token, `ARGV[5]` fence counter TTL in ms.
/// Returns `{1, fence}` (fence `0` when not asked for) or `{0, ms until the first
/// permit expires}`.
pub const ACQUIRE: &str = concat!(
    fence_fn!(),
    r#"
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
    local err
    fence, err = next_fence(KEYS[2], ARGV[5], t)
    if not fence then return redis.error_reply(err) end
  end
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], longest[2])
  return {1, fence}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(first[2]) - now}
"#
);

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
