//! Fair mode's scripts: the waiter queue beside the lock, its acquire, its release (which
//! hands the lease to the next waiter or names it) and leaving it. Re-exported from
//! [`crate::protocol`]; the macros they share with the other scripts
//! (`fence_counter_check!`, `fence_next!`, `fence_fn!`) come from there.

/// Fair mode's Lua helpers: `head_of` drops the expired entries at the head of the queue
/// (and their handoff terms, if `terms` is given) and returns the first live waiter id (or
/// `nil`); `announce` publishes a message (by default the waiter id) on the channel of the
/// waiter's manager (`<channel>:<manager id>` for an id `<manager id>.<random>`, the lock's
/// channel for an id without a dot); `server_ms` is the server time in ms; `handed_to`
/// returns the token of a lease (a string key) that a release handed to waiter `id` and
/// nobody took up yet, with the rest of its handoff record (`<fence> <attempt number>`).
macro_rules! queue_head {
    () => {
        r#"
local function head_of(queue, expiries, now_ms, terms)
  while true do
    local first = redis.call('ZRANGE', queue, 0, 0)[1]
    if not first then return nil end
    local expires = tonumber(redis.call('HGET', expiries, first))
    if expires and expires > now_ms then return first end
    redis.call('ZREM', queue, first)
    redis.call('HDEL', expiries, first)
    if terms then redis.call('HDEL', terms, first) end
  end
end
local function announce(channel, head, message)
  local at = string.find(head, '.', 1, true)
  if at then channel = channel .. ':' .. string.sub(head, 1, at - 1) end
  redis.pcall('PUBLISH', channel, message or head)
end
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function handed_to(lease, terms, id)
  local holder = redis.call('GET', lease)
  local handed = holder and redis.call('HGET', terms, holder)
  local mine = id .. ' '
  if handed and string.sub(handed, 1, #mine) == mine then
    return holder, string.sub(handed, #mine + 1)
  end
end
"#
    };
}

/// Fair mode on one primary, the lock just freed: `next_turn` hands the lease to the first
/// live waiter that left handoff terms (`<token> <ttl ms> <fence counter ttl ms or 0>
/// <entry lease ms> <attempt number>`): sets the lease to its token until its TTL or its
/// queue entry ends, whichever comes first (the attempt that left the terms set the
/// entry's expiry, its entry lease after it ran, so the lease ends no earlier than the
/// waiter believes), takes the next fencing token if it asked for one, takes it out of the
/// queue, records the handed lease (`<token>` → `<id> <fence> <attempt number>`) and
/// announces `<id> <token> <fence>`. A waiter without terms is announced as by
/// [`RELEASE_FAIR`]; nobody waiting: an empty message. A fence counter that is not a
/// counter hands nothing over (the waiter's own acquire then reports it). Needs
/// `queue_head!()` and `fence_fn!()` before it.
macro_rules! queue_handoff {
    () => {
        r#"
local function next_turn(lease, queue, expiries, fence, terms, channel)
  if not channel then return end
  local now = server_ms()
  local head = head_of(queue, expiries, now, terms)
  if not head then
    redis.pcall('PUBLISH', channel, '')
    return
  end
  local t = terms and redis.call('HGET', terms, head)
  local token, ttl, fence_ttl, entry, attempt
  if t then
    token, ttl, fence_ttl, entry, attempt = string.match(t, '^(%x+) (%d+) (%d+) (%d+) (%d+)$')
  end
  if not token then
    announce(channel, head)
    return
  end
  local f = 0
  if fence_ttl ~= '0' then
    f = next_fence(fence, fence_ttl, redis.call('TIME'))
    if not f then
      announce(channel, head)
      return
    end
  end
  local left = tonumber(redis.call('HGET', expiries, head)) - now
  local px = math.min(tonumber(ttl), tonumber(entry), left)
  redis.call('SET', lease, token, 'PX', px)
  redis.call('ZREM', queue, head)
  redis.call('HDEL', expiries, head)
  redis.call('HDEL', terms, head)
  redis.call('HSET', terms, token, head .. ' ' .. string.format('%d', f) .. ' ' .. attempt)
  if redis.call('PTTL', terms) < px then redis.call('PEXPIRE', terms, px) end
  announce(channel, head, head .. ' ' .. token .. ' ' .. string.format('%d', f))
end
"#
    };
}

/// Fair mode's acquire: take the lease if it is free and nobody waits before the caller;
/// otherwise queue the caller (or refresh its entry) behind the waiters already there.
///
/// `KEYS[1]` lease key, `KEYS[2]` fence counter key, `KEYS[3]` the queue (a sorted set of
/// waiter ids by arrival), `KEYS[4]` the queue's entry expiries (a hash: waiter id → server
/// time in ms). `ARGV[1]` token, `ARGV[2]` TTL in ms, `ARGV[3]` fence counter TTL in ms, or
/// `0` for no fencing token, `ARGV[4]` the waiter id (one per waiting call), `ARGV[5]` the
/// entry lease in ms, `ARGV[6]` `1` to join the queue if the caller must wait, `0` for one
/// attempt that leaves no entry (`try_lock`).
///
/// `KEYS[5]` (optional, one primary only): the handoff hash, and `ARGV[7]` the attempt's
/// number within its call (increasing). With them, a queued caller leaves its handoff terms
/// (`ARGV[1]`, `ARGV[2]`, `ARGV[3]`, `ARGV[5]`, `ARGV[7]`) for [`RELEASE_FAIR`], and a
/// later attempt of a caller whose waiter id a lease was handed to takes it up: the lease
/// is set to `ARGV[1]` with the full TTL and the handoff's fencing token returned. An
/// earlier attempt arriving late (the caller may hold the lease on the announcement alone)
/// changes nothing and answers "held", not queued.
///
/// First the expired entries at the head are dropped: a waiter that stopped refreshing its
/// entry (crashed, or gave up without cleaning up) holds up the queue for at most its entry
/// lease. The lease is taken when the key is free and the queue is empty or headed by the
/// caller, who then leaves the queue. Otherwise a caller that queues gets (or keeps) its
/// place: arrival order by the server clock in µs, strictly increasing. Each write keeps
/// the queue's keys alive for at least one entry lease, so they vanish with their waiters.
///
/// Returns `{1, fence}` when taken (`fence` is `0` without fencing), `{0, wait_ms, place}`
/// otherwise: `wait_ms` is the holder's PTTL, or, when the key is free but another waiter
/// heads the queue, that waiter's remaining entry lease (`-1`: a key without expiry);
/// `place` is the caller's place in the queue (`0` first, `-1` not queued). A key of
/// another type answers a `WRONGTYPE` error.
pub const ACQUIRE_FAIR: &str = concat!(
    queue_head!(),
    r#"local now_ms = server_ms()
local last = 0
if ARGV[3] ~= '0' then
local raw = redis.call('GET', KEYS[2])
"#,
    fence_counter_check!(),
    r#"end
local head = head_of(KEYS[3], KEYS[4], now_ms, KEYS[5])
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' and (not head or head == ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if head then
    redis.call('ZREM', KEYS[3], head)
    redis.call('HDEL', KEYS[4], head)
  end
  if head and KEYS[5] then redis.call('HDEL', KEYS[5], ARGV[4]) end
  if ARGV[3] == '0' then return {1, 0} end
"#,
    fence_next!(),
    r#"  return {1, fence}
end
if kind ~= 'none' and kind ~= 'string' then
  return redis.error_reply('WRONGTYPE lock key holds a ' .. kind .. ', not a lease')
end
if kind == 'string' and KEYS[5] then
  local holder, handed = handed_to(KEYS[1], KEYS[5], ARGV[4])
  if holder then
    local fence, attempt = string.match(handed, '^(%d+) (%d+)$')
    if not attempt or tonumber(ARGV[7]) <= tonumber(attempt) then
      -- An attempt sent before the one the lease was handed to, arriving late: its
      -- caller may hold the lease on the announcement alone.
      return {0, redis.call('PTTL', KEYS[1]), -1}
    end
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('HDEL', KEYS[5], holder, ARGV[4])
    redis.call('ZREM', KEYS[3], ARGV[4])
    redis.call('HDEL', KEYS[4], ARGV[4])
    if ARGV[3] == '0' then return {1, 0} end
    return {1, tonumber(fence)}
  end
end
local entry = tonumber(ARGV[5])
if ARGV[6] == '1' or redis.call('ZSCORE', KEYS[3], ARGV[4]) then
  if not redis.call('ZSCORE', KEYS[3], ARGV[4]) then
    local t = redis.call('TIME')
    local score = tonumber(t[1]) * 1000000 + tonumber(t[2])
    local tail = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
    if tail[2] and tonumber(tail[2]) >= score then score = tonumber(tail[2]) + 1 end
    redis.call('ZADD', KEYS[3], string.format('%d', score), ARGV[4])
  end
  redis.call('HSET', KEYS[4], ARGV[4], string.format('%d', now_ms + entry))
  if KEYS[5] then
    local terms = {ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[7]}
    redis.call('HSET', KEYS[5], ARGV[4], table.concat(terms, ' '))
  end
  for _, k in ipairs({KEYS[3], KEYS[4], KEYS[5]}) do
    if redis.call('PTTL', k) < entry then redis.call('PEXPIRE', k, entry) end
  end
  if not head then head = ARGV[4] end
end
local place = redis.call('ZRANK', KEYS[3], ARGV[4]) or -1
if kind == 'none' then
  return {0, tonumber(redis.call('HGET', KEYS[4], head)) - now_ms, place}
end
return {0, redis.call('PTTL', KEYS[1]), place}
"#
);

/// Fair mode's release: [`RELEASE`](super::RELEASE), then the turn passes to the first
/// live waiter (expired entries at the head are dropped first). On one primary the lease is
/// handed to it if it left handoff terms (see `next_turn`); otherwise, and over several
/// primaries, the message names it, so that only that waiter (in whichever process it
/// waits) is woken: its id, published on the channel of its manager (`<channel>:<manager
/// id>` for an id `<manager id>.<random>`), or an empty message on the lock's channel if
/// nobody queues.
///
/// `KEYS[1]` lease key, `KEYS[2]` the queue, `KEYS[3]` the queue's entry expiries; on one
/// primary also `KEYS[4]` the fence counter and `KEYS[5]` the handoff hash. `ARGV[1]`
/// token, `ARGV[2]` (optional) the release channel: without it nothing is handed over or
/// announced. Result codes as for [`RELEASE`](super::RELEASE).
pub const RELEASE_FAIR: &str = concat!(
    queue_head!(),
    fence_fn!(),
    queue_handoff!(),
    r#"local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if KEYS[5] then redis.call('HDEL', KEYS[5], ARGV[1]) end
  next_turn(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2])
  return 1
elseif v then
  return -1
end
return 0
"#
);

/// Fair mode: a waiter leaves the queue (it gave up or was cancelled). If it headed the
/// queue and the key is free, the next live waiter is announced, as a release would.
///
/// `KEYS[1]` lease key, `KEYS[2]` the queue, `KEYS[3]` the queue's entry expiries;
/// on one primary also `KEYS[4]` the fence counter and `KEYS[5]` the handoff hash: then a
/// lease handed to the waiter and not taken up is deleted and handed on.
/// `ARGV[1]` the waiter id, `ARGV[2]` (optional) the release channel. Returns `1` if the
/// entry was there, `0` if not.
pub const LEAVE_QUEUE: &str = concat!(
    queue_head!(),
    fence_fn!(),
    queue_handoff!(),
    r#"local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if KEYS[5] then
  redis.call('HDEL', KEYS[5], ARGV[1])
  local holder = redis.call('TYPE', KEYS[1])['ok'] == 'string'
    and handed_to(KEYS[1], KEYS[5], ARGV[1])
  if holder then
    redis.call('DEL', KEYS[1])
    redis.call('HDEL', KEYS[5], holder)
    next_turn(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2])
    return removed
  end
end
if first == ARGV[1] and ARGV[2] and redis.call('EXISTS', KEYS[1]) == 0 then
  local head = head_of(KEYS[2], KEYS[3], server_ms(), KEYS[5])
  if head then announce(ARGV[2], head) end
end
return removed
"#
);
