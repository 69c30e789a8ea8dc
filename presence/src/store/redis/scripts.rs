//! The Lua scripts of [`RedisStore`](super::RedisStore) and the record layout they
//! share with the Rust side (see the [data model](super#data-model)).
//!
//! Lua in Redis is slow at exactly what a parser does: formatting a number costs
//! about 1 µs, a pattern match about as much, a string operation 0.2 µs (measured on
//! the benchmark machine with `EVAL` loops). The record layout is chosen so that the
//! hot script, [`HEARTBEATS`], needs neither: fixed-width times compare as strings
//! and are replaced by substring, the lease is found with one plain `find`.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::model::Status;

/// How long `{prefix}:nodes` and `{prefix}:records` outlive the garbage-collection
/// time of their newest record. The slack lets a script renew their expiry once
/// per [`KEY_SLACK`] instead of on every write.
pub const KEY_SLACK: Duration = Duration::from_secs(60);

/// [`KEY_SLACK`] in ms, as the scripts' source spells it.
macro_rules! lua_key_slack_ms {
    () => {
        "60000"
    };
}

/// Prelude shared by the scripts: `now` in epoch ms from the Redis clock, and
/// `now_s`, the same as a record spells it (15 digits). Redis 7 replicates script
/// effects, so `TIME` may precede writes; the guarded call makes Redis 6.2 do the
/// same (Redis 7 has `REDIS_VERSION_NUM` and skips the deprecated call).
macro_rules! lua_now {
    () => {
        "if not redis.REDIS_VERSION_NUM then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = string.format('%015d', now)
"
    };
}

/// `valid(rec)`: whether a record starts like one (50 digits: three times and the
/// lease length). Only needed where a record that fails the cheap checks must be
/// told apart from garbage.
macro_rules! lua_valid {
    () => {
        "local function valid(rec)
  return string.find(rec, '^' .. string.rep('%d', 50)) ~= nil
end
"
    };
}

/// `keep(gc)`: keeps the deployment's keys (all but the sweep's watermark, which
/// has its own expiry) alive until at least `gc`, the garbage-collection time of a
/// record just written; renews them [`KEY_SLACK`] beyond it, so this writes only
/// once per slack.
macro_rules! lua_keep {
    () => {
        concat!(
            "local function keep(gc)
  if redis.call('PTTL', KEYS[1]) < gc - now then
    for _, k in ipairs({1, 2, 3, 4, 6, 7, 8, 9}) do
      redis.call('PEXPIREAT', KEYS[k], gc + ",
            lua_key_slack_ms!(),
            ")
    end
  end
end
"
        )
    };
}

/// `emit(minid, field, value, ...)`: appends one event to the feed (KEYS[3]),
/// trimming entries older than `minid` ms. The first event of a feed creates it and
/// its epoch (KEYS[4], the creation time in µs), so a feed that was deleted and
/// created again is told apart by its epoch; `NOMKSTREAM` makes that check free.
/// `unreported(rec)`: whether the expiry of an expired record has not been
/// reported yet (its expiry is after the sweep's watermark, KEYS[5]).
macro_rules! lua_emit {
    () => {
        concat!(
            "local function emit(minid, ...)
  local id = redis.call('XADD', KEYS[3], 'NOMKSTREAM', 'MINID', '~', minid, '*', ...)
  if not id then
    redis.call('SET', KEYS[4], t[1] .. string.format('%06d', tonumber(t[2])))
    redis.call('XADD', KEYS[3], '*', ...)
    for k = 3, 4 do
      redis.call('PEXPIRE', KEYS[k], ",
            lua_key_slack_ms!(),
            " + 2 * tonumber(ARGV[#ARGV]))
    end
  end
end
local function unreported(rec)
  local swept = redis.call('GET', KEYS[5])
  return not swept or string.sub(rec, 1, 15) > swept
end
"
        )
    };
}

/// `mark_of(rec)`: a record's status as the counters (KEYS[7]) name it: `u`, `d`
/// or `r` (the mark after the lease; none is `u`). `count(rec, n)`: adds `n` to the
/// counter of the record's status.
macro_rules! lua_count {
    () => {
        "local function mark_of(rec)
  local len = tonumber(string.sub(rec, 46, 50))
  if not len then return 'u' end
  local p = 51 + len
  local c = string.sub(rec, p, p)
  if c == 'd' or c == 'r' then return c end
  return 'u'
end
local function count(rec, n)
  redis.call('HINCRBY', KEYS[7], mark_of(rec), n)
end
"
    };
}

/// `label(id, labels)`: gives node `id` the labels `labels` (see
/// [labels](crate::store::query#labels-the-index-of-meta-values); joined by `\1`, as
/// [`labels_arg`] writes them) in the label index (KEYS[8], members
/// `<label>\0<id>` at score 0) and remembers them (KEYS[9], field `id`), replacing
/// the ones it had; nothing when they are the same. `unlabel(id)`: takes them all
/// away (for a record removed). A key the index creates gets the records' expiry
/// at once, so an abandoned deployment leaves no index behind.
macro_rules! lua_labels {
    () => {
        "local function unlabel(id)
  local old = redis.call('HGET', KEYS[9], id)
  if not old then return end
  local m = {}
  for l in string.gmatch(old, '[^\\1]+') do m[#m + 1] = l .. '\\0' .. id end
  if #m > 0 then redis.call('ZREM', KEYS[8], unpack(m)) end
  redis.call('HDEL', KEYS[9], id)
end
local function label(id, labels)
  local old = redis.call('HGET', KEYS[9], id)
  if old == labels or (not old and labels == '') then return end
  if old then unlabel(id) end
  if labels == '' then return end
  local m = {}
  for l in string.gmatch(labels, '[^\\1]+') do
    m[#m + 1] = 0
    m[#m + 1] = l .. '\\0' .. id
  end
  redis.call('ZADD', KEYS[8], unpack(m))
  redis.call('HSET', KEYS[9], id, labels)
  if redis.call('PTTL', KEYS[9]) == -1 then
    local ttl = redis.call('PTTL', KEYS[2])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[8], ttl)
      redis.call('PEXPIRE', KEYS[9], ttl)
    end
  end
end
"
    };
}

/// How far a node's score in `{prefix}:nodes` may lag behind its record's
/// `expires_at` (it is never ahead): a heartbeat updates the score only when the
/// expiry moves into another slot of this width (see [`HEARTBEATS`]). Readers of the
/// sorted set widen their score ranges by it and decide by the record.
pub const INDEX_GRANULARITY: Duration = Duration::from_secs(10);

/// [`MAX_LABEL`](crate::store::query::MAX_LABEL), as the scripts' source spells it.
macro_rules! lua_max_label {
    () => {
        "256"
    };
}

/// The leading digits of a 15-digit time that name its [`INDEX_GRANULARITY`] slot
/// (15 - 11 = 4 digits cut off: 10 000 ms).
macro_rules! lua_index_digits {
    () => {
        "11"
    };
}

/// Records that one `login` removes at most (expired more than
/// [`MAX_PRESERVED_OUTAGE`](crate::store::MAX_PRESERVED_OUTAGE) ago): bounds the call,
/// and keeps up since every record comes from a login.
pub(super) const LOGIN_PURGE: usize = 64;

/// The keys every script takes, in this order: nodes zset, records hash, feed
/// stream, feed epoch, sweep watermark, id index (a score-0 zset of every record's
/// id, read `BYLEX` for pages), counters by status (a hash `u`/`d`/`r` of the
/// records online or expired but not yet reported; its field `l` says the label
/// index is built), the label index and each record's labels (see [`lua_labels`])
/// (see the [data model](super#data-model)). The
/// scripts that write the feed take the feed's retention in ms as their **last**
/// argument.
pub(super) const SCRIPT_KEYS: usize = 9;

/// KEYS: see [`SCRIPT_KEYS`]. ARGV: node_id, lease header (see
/// [`lease_header`]), ttl_ms, meta JSON, grace_ms (how long expired records are
/// kept, [`MAX_PRESERVED_OUTAGE`](crate::store::MAX_PRESERVED_OUTAGE)), purge limit,
/// [`INDEX_GRANULARITY`] in ms, the meta's labels (see [`labels_arg`]), feed
/// retention ms. Returns `{now, expires_at}`.
/// The lease header is followed by the record's status mark (see
/// [`status_mark`]). Events: `leave`/`expired` for an expired record it replaces (or
/// purges) that was not reported yet, then `join` (`k j`, `n` id, `r` record). The
/// counters lose the record replaced (unless its expiry was reported) and gain the
/// new one; a new id joins the index, and the node gets its labels.
pub(super) static LOGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_keep!(),
        lua_valid!(),
        lua_count!(),
        lua_emit!(),
        lua_labels!(),
        "local minid = now - tonumber(ARGV[9])
local grace = tonumber(ARGV[5])
local exp = now + tonumber(ARGV[3])
local old = redis.call('ZRANGE', KEYS[1], '-inf', now - grace - tonumber(ARGV[7]),
  'BYSCORE', 'LIMIT', 0, tonumber(ARGV[6]))
if #old > 0 then
  local recs = redis.call('HMGET', KEYS[2], unpack(old))
  for j = 1, #old do
    local r = recs[j]
    if r and valid(r) and unreported(r) then
      emit(minid, 'k', 'l', 'n', old[j], 'w', 'expired')
      count(r, -1)
    end
  end
  redis.call('HDEL', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[6], unpack(old))
  for j = 1, #old do unlabel(old[j]) end
end
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev and valid(prev) then
  if string.sub(prev, 1, 15) > now_s then
    count(prev, -1)
  elseif unreported(prev) then
    emit(minid, 'k', 'l', 'n', ARGV[1], 'w', 'expired')
    count(prev, -1)
  end
else
  redis.call('ZADD', KEYS[6], 0, ARGV[1])
end
local rec = string.format('%015d', exp) .. now_s .. now_s .. ARGV[2] .. ARGV[4]
redis.call('HSET', KEYS[2], ARGV[1], rec)
redis.call('ZADD', KEYS[1], exp, ARGV[1])
label(ARGV[1], ARGV[8])
count(rec, 1)
keep(exp + grace)
emit(minid, 'k', 'j', 'n', ARGV[1], 'r', rec)
return {now, exp}
"
    ))
});

/// Heartbeats, several per call (see [`RedisStore`](super::RedisStore)'s batching),
/// all with the same TTL and each of another node. KEYS: see [`SCRIPT_KEYS`]. ARGV:
/// grace_ms, ttl_ms, then per heartbeat its node_id and lease header (see
/// [`lease_header`]), and last the feed retention in ms. A heartbeat that brings a
/// new meta or status has a `+` before its lease header and three more values: the
/// new meta (`""` keeps the stored one), the new status (see [`status_arg`]; `""`
/// keeps the stored one) and the new meta's labels (see [`labels_arg`]; read only
/// with a new meta). A plain heartbeat, nearly every one, is two values: each value
/// costs Redis a Lua string per heartbeat.
/// Returns one integer per heartbeat: `0` not online, `1` lease mismatch, otherwise
/// the new `expires_at`. A heartbeat whose meta or status differs from the stored
/// one is an `update` event (`k u`, `n` id, `r` record), a status change moves
/// the node between the counters, and a meta change gives it the new meta's labels; one that keeps both (the common case) writes no
/// event and costs two string comparisons at most.
///
/// The hot path, written for what Lua is slow at in Redis (number formatting about
/// 1 µs, pattern matching about as much): per call `TIME`, one `HMGET` for all
/// records, one `HSET` for all renewed ones, the keys' expiry once per
/// [`KEY_SLACK`], and two numbers formatted; per heartbeat two substring
/// comparisons (fixed-width times compare as strings), one plain `find` for the
/// lease and one concatenation. The sorted set is only written for a renewal that
/// moves the expiry into another [`INDEX_GRANULARITY`] slot (one `ZADD` for those,
/// if any): its scores stay within that of the records' expiry, at a fraction of the
/// cost of a `ZADD` per heartbeat (the most expensive command of the batch). A record
/// that is expired is left alone (`0`): a heartbeat that was queued while Redis was paused runs before the
/// server can give the outage back, and must not destroy the record it would
/// restore. A record that does not parse counts as not online, so the node logs in
/// again and replaces it.
pub(super) static HEARTBEATS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_keep!(),
        lua_valid!(),
        lua_emit!(),
        lua_labels!(),
        "local grace = tonumber(ARGV[1])
local exp = now + tonumber(ARGV[2])
local exp_s = string.format('%015d', exp)
local bucket = string.sub(exp_s, 1, ",
        lua_index_digits!(),
        ")
local ids, leases, changes = {}, {}, {}
local n, a, last = 0, 3, #ARGV - 1
while a < last do
  n = n + 1
  ids[n] = ARGV[a]
  local lease = ARGV[a + 1]
  if string.byte(lease, 1) == 43 then
    leases[n] = string.sub(lease, 2)
    changes[n] = a + 2
    a = a + 5
  else
    leases[n] = lease
    a = a + 2
  end
end
local recs = redis.call('HMGET', KEYS[2], unpack(ids))
local out, hset, zadd = {}, {}, {}
local w, z = 0, 0
for i = 1, n do
  local rec = recs[i]
  local code = 0
  if rec and string.sub(rec, 1, 15) > now_s then
    local lease = leases[i]
    if string.find(rec, lease, 46, true) ~= 46 then
      if valid(rec) then code = 1 end
    else
      local at = changes[i]
      local meta, st = '', ''
      if at then meta, st = ARGV[at], ARGV[at + 1] end
      local new
      if meta == '' and st == '' then
        new = exp_s .. now_s .. string.sub(rec, 31)
      else
        -- The status mark (none for up) sits between the lease and the meta.
        local p = 46 + #lease
        local c = string.sub(rec, p, p)
        local old_st, m = 'u', p
        if c == 'd' or c == 'r' then old_st, m = c, p + 1 end
        local new_st = old_st
        if st ~= '' then new_st = st end
        local old_meta = string.sub(rec, m)
        if meta == '' then meta = old_meta end
        local mark = new_st
        if mark == 'u' then mark = '' end
        new = exp_s .. now_s .. string.sub(rec, 31, p - 1) .. mark .. meta
        if new_st ~= old_st then
          redis.call('HINCRBY', KEYS[7], old_st, -1)
          redis.call('HINCRBY', KEYS[7], new_st, 1)
        end
        if meta ~= old_meta then label(ids[i], ARGV[at + 2]) end
        if new_st ~= old_st or meta ~= old_meta then
          emit(now - tonumber(ARGV[#ARGV]), 'k', 'u', 'n', ids[i], 'r', new)
        end
      end
      w = w + 2
      hset[w - 1] = ids[i]
      hset[w] = new
      if string.sub(rec, 1, ",
        lua_index_digits!(),
        ") ~= bucket then
        z = z + 2
        zadd[z - 1] = exp_s
        zadd[z] = ids[i]
      end
      code = exp
    end
  end
  out[i] = code
end
if w > 0 then
  redis.call('HSET', KEYS[2], unpack(hset))
  if z > 0 then redis.call('ZADD', KEYS[1], unpack(zadd)) end
  keep(exp + grace)
end
return out
"
    ))
});

/// KEYS: see [`SCRIPT_KEYS`]. ARGV: node_id, lease header (see
/// [`lease_header`]), feed retention ms. Returns 0 not online, 1 removed, 2 lease
/// mismatch. An expired (or unreadable) record is removed whatever the lease.
/// Events: `leave`/`logout` (`k l`, `n` id, `w logout`) for a removed online node;
/// `leave`/`expired` for an expired one whose expiry was not reported yet; either
/// leaves the counters; the node loses its labels.
pub(super) static LOGOUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_valid!(),
        lua_count!(),
        lua_emit!(),
        lua_labels!(),
        "local minid = now - tonumber(ARGV[3])
local rec = redis.call('HGET', KEYS[2], ARGV[1])
local online = rec and string.sub(rec, 1, 15) > now_s and valid(rec)
if online and string.find(rec, ARGV[2], 46, true) ~= 46 then return 2 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
unlabel(ARGV[1])
if online then
  emit(minid, 'k', 'l', 'n', ARGV[1], 'w', 'logout')
  count(rec, -1)
  return 1
end
if rec and valid(rec) and unreported(rec) then
  emit(minid, 'k', 'l', 'n', ARGV[1], 'w', 'expired')
  count(rec, -1)
end
return 0
"
    ))
});

/// KEYS: outage marker. ARGV: outage_ms, grace_ms. Claims the job of giving an
/// outage back: `{1, now}` if this caller must do it, `{0, now}` if another server
/// already did (its recovery time is at or after this outage's start).
pub(super) static OUTAGE_CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        "local start = now - tonumber(ARGV[1])
local done = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if done >= start then return {0, now} end
redis.call('SET', KEYS[1], now, 'PX', ARGV[2])
return {1, now}
"
    ))
});

/// KEYS: `{prefix}:shards`, `{prefix}:records` (the records of a deployment of one
/// shard). ARGV: the shard count this server runs with. Returns the deployment's
/// shard count, recording ARGV\[1\] first if it has none: a deployment that has
/// records under `{prefix}` but no count was written by a server older than shards,
/// with one.
pub(super) static SHARD_COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = tonumber(redis.call('GET', KEYS[1]) or '')
if n then return n end
if ARGV[1] ~= '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
redis.call('SET', KEYS[1], ARGV[1])
return tonumber(ARGV[1])
",
    )
});

/// KEYS: see [`SCRIPT_KEYS`]. ARGV: lowest score (inclusive), highest score
/// (inclusive), outage_ms, grace_ms, page size, lowest and highest `expires_at` to
/// move (inclusive), members to skip, feed retention ms. A record moved whose
/// expiry had already been reported (by a server that did not see the outage) is
/// back: a `join` event, and counted again. Moves one page of the members in the score
/// range, highest score first: those whose record's `expires_at` is in the range
/// move by the outage (record and score); a member whose record is gone (or does
/// not parse) is garbage and removed; the others stay (a score lags its record's
/// expiry by up to [`INDEX_GRANULARITY`], so the score range is that much wider than
/// the expiry range). Returns `{handled, moved, lowest score handled, stayed}`,
/// `stayed` being how many members handled stayed at that lowest score: the next
/// page is the range up to that score, skipping them (every member moved has moved
/// above it).
pub(super) static OUTAGE_SHIFT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_keep!(),
        lua_valid!(),
        lua_count!(),
        lua_emit!(),
        lua_labels!(),
        "local d = tonumber(ARGV[3])
local swept = redis.call('GET', KEYS[5])
local grace = tonumber(ARGV[4])
local exp_low, exp_high = tonumber(ARGV[6]), tonumber(ARGV[7])
local page = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[1], 'BYSCORE', 'REV',
  'LIMIT', tonumber(ARGV[8]), tonumber(ARGV[5]), 'WITHSCORES')
local ids = {}
for i = 1, #page, 2 do ids[#ids + 1] = page[i] end
if #ids == 0 then return {0, 0, 0, 0} end
local recs = redis.call('HMGET', KEYS[2], unpack(ids))
local hset, zadd, gone = {}, {}, {}
local last, lowest, stayed = 0, 0, 0
for j = 1, #ids do
  local score = tonumber(page[2 * j])
  if score ~= lowest then stayed = 0 end
  lowest = score
  local rec = recs[j]
  if rec and valid(rec) then
    local e = tonumber(string.sub(rec, 1, 15))
    if e >= exp_low and e <= exp_high then
      local exp = e + d
      local moved = string.format('%015d', exp) .. string.sub(rec, 16)
      hset[#hset + 1] = ids[j]
      hset[#hset + 1] = moved
      if swept and string.sub(rec, 1, 15) <= swept then
        emit(now - tonumber(ARGV[9]), 'k', 'j', 'n', ids[j], 'r', moved)
        count(rec, 1)
      end
      zadd[#zadd + 1] = exp
      zadd[#zadd + 1] = ids[j]
      if exp > last then last = exp end
    else
      stayed = stayed + 1
    end
  else
    gone[#gone + 1] = ids[j]
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[6], unpack(gone))
  for j = 1, #gone do unlabel(gone[j]) end
end
if #hset > 0 then
  redis.call('HSET', KEYS[2], unpack(hset))
  redis.call('ZADD', KEYS[1], unpack(zadd))
  keep(last + grace)
end
return {#ids, #hset / 2, lowest, stayed}
"
    ))
});

/// Reports expiries: KEYS: see [`SCRIPT_KEYS`]. ARGV: page size, grace_ms, the
/// latest Redis time at which the call may still act (0: any), feed retention ms.
/// Returns `{reported, lag_ms, more, now}`.
///
/// A sweep that runs after its deadline does nothing: it was queued in a Redis that
/// was paused or unreachable, and runs before the server has seen the outage and
/// given it back to the leases, so every lease the outage ran down would be reported
/// as expired, then come back.
///
/// The watermark (KEYS[5], a 15-digit time) says up to when expiries have been
/// reported (the first sweep of a deployment starts `grace_ms` back). The script reads the members scored in `(watermark, now]` (a page at
/// most), reports each whose record expired by the new watermark as `leave`/`expired`
/// (`k l`, `n` id, `w expired`), and sets every member it read to its record's exact
/// expiry: so a node still online leaves the range until that expiry passes, and
/// every member scored at or below the watermark has expired by it and been
/// reported (which is what lets `login` and `logout` tell a reported expiry from one
/// still due). Each expiry falls in exactly one script's range, so it is reported
/// exactly once however many servers sweep. Records are not removed: they stay for
/// self-preservation, as always (see [`OUTAGE_SHIFT`]), but each reported one leaves
/// the counters. A member without a record is garbage and removed.
pub(super) static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_valid!(),
        lua_count!(),
        lua_emit!(),
        lua_labels!(),
        "local page = tonumber(ARGV[1])
local keep_ms = tonumber(ARGV[2]) + ",
        lua_key_slack_ms!(),
        "
local minid = now - tonumber(ARGV[4])
local deadline = tonumber(ARGV[3])
if deadline > 0 and now > deadline then return {0, 0, 0, now} end
local mark = redis.call('GET', KEYS[5])
if not mark then
  -- The first sweep of a deployment: expiries as old as the records kept.
  mark = string.format('%015d', now - tonumber(ARGV[2]))
end
local m = redis.call('ZRANGE', KEYS[1], '(' .. mark, now, 'BYSCORE', 'LIMIT', 0, page + 1, 'WITHSCORES')
if #m == 0 then return {0, 0, 0, now} end
local upto, n, more = now, #m / 2, 0
if n > page then
  more = 1
  local b = tonumber(m[2 * page + 2])
  if tonumber(m[2]) == b then
    m = redis.call('ZRANGE', KEYS[1], b, b, 'BYSCORE', 'WITHSCORES')
    n = #m / 2
    upto = b
  else
    n = 0
    while tonumber(m[2 * n + 2]) < b do n = n + 1 end
    upto = b - 1
  end
end
local upto_s = string.format('%015d', upto)
local ids = {}
for j = 1, n do ids[j] = m[2 * j - 1] end
local recs = redis.call('HMGET', KEYS[2], unpack(ids))
local zadd, gone = {}, {}
local reported, lag = 0, 0
for j = 1, n do
  local rec = recs[j]
  if rec and valid(rec) then
    local e = string.sub(rec, 1, 15)
    if e <= upto_s then
      emit(minid, 'k', 'l', 'n', ids[j], 'w', 'expired')
      count(rec, -1)
      reported = reported + 1
      local late = now - tonumber(e)
      if late > lag then lag = late end
    end
    zadd[#zadd + 1] = e
    zadd[#zadd + 1] = ids[j]
  else
    gone[#gone + 1] = ids[j]
  end
end
if #zadd > 0 then redis.call('ZADD', KEYS[1], unpack(zadd)) end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('ZREM', KEYS[6], unpack(gone))
  for j = 1, #gone do unlabel(gone[j]) end
end
redis.call('SET', KEYS[5], upto_s, 'PX', keep_ms)
return {reported, lag, more, now}
"
    ))
});

/// Reads a page: KEYS: see [`SCRIPT_KEYS`]. ARGV: the lex range of the id index
/// (start, end, as `ZRANGE ... BYLEX` takes them), how many matches to return at
/// most, how many ids to read at most, the statuses wanted as counter names (`ud`;
/// `""` any), the label to read (`<label>\0`: the range is then one of the label
/// index, whose members are the ids behind it; `""` reads the id index), then two
/// texts per meta pair of which a matching record contains one
/// (the filter's [`MetaNeedle`](crate::store::query::MetaNeedle)s: the string form,
/// then the literal form or `""`). Returns `{{id, record, ...}, next}`: the online records in the range
/// that pass (in id order; the caller confirms the meta match), and where to go on
/// (`(` and the last member read) or `""` when the range is done.
///
/// Cost is what the page reads: the ids of the range up to the page, and their
/// records, never the whole deployment (unless the filter is that unselective).
pub(super) static PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_count!(),
        "local start, stop = ARGV[1], ARGV[2]
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local statuses = ARGV[5]
local index, cut = KEYS[6], #ARGV[6]
if cut > 0 then index = KEYS[8] end
local out, read = {}, 0
while read < budget do
  local members = redis.call('ZRANGE', index, start, stop, 'BYLEX', 'LIMIT', 0,
    math.min(want + 16, budget - read))
  if #members == 0 then return {out, ''} end
  read = read + #members
  local ids = members
  if cut > 0 then
    ids = {}
    for j = 1, #members do ids[j] = string.sub(members[j], cut + 1) end
  end
  local recs = redis.call('HMGET', KEYS[2], unpack(ids))
  for j = 1, #ids do
    local rec = recs[j]
    if rec and string.sub(rec, 1, 15) > now_s then
      local ok = statuses == '' or string.find(statuses, mark_of(rec), 1, true) ~= nil
      for k = 7, #ARGV, 2 do
        if ok and not string.find(rec, ARGV[k], 51, true)
            and (ARGV[k + 1] == '' or not string.find(rec, ARGV[k + 1], 51, true)) then
          ok = false
        end
      end
      if ok then
        out[#out + 1] = ids[j]
        out[#out + 1] = rec
        if #out == 2 * want then return {out, '(' .. members[j]} end
      end
    end
  end
  start = '(' .. members[#members]
end
return {out, start}
"
    ))
});

/// Builds the id index, the counters and the label index of a deployment written
/// by a server older than them (KEYS: see [`SCRIPT_KEYS`]; ARGV: grace_ms): when the
/// records exist but the counters do not, adds every record's id to the index and
/// counts every record whose expiry is after the sweep's watermark (which it sets
/// to now if there is none: an older server had no feed, so its expired nodes have
/// nothing to report); when the counters do not say (field `l`) that the label
/// index is built, gives every record the labels of its meta. Returns how many
/// records it read (0 when there was nothing to do). Once per deployment: the
/// counters (and their `l`) exist from then on; on a deployment with no records yet
/// it only marks the label index as built, so the first server's logins are never
/// read again.
///
/// The labels of a stored meta are worked out here in Lua (`cjson`), by the rule
/// [`labels_of`](crate::store::query::labels_of) follows in Rust everywhere else:
/// every top-level string, and `true`/`false`, at most
/// [`MAX_LABEL`](crate::store::query::MAX_LABEL) bytes with the key, without a
/// `\0` or `\1`. A test compares the two.
pub(super) static INDEX_BUILD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        lua_now!(),
        lua_valid!(),
        lua_count!(),
        lua_labels!(),
        "local keep_ms = tonumber(ARGV[1]) + ",
        lua_key_slack_ms!(),
        "
if redis.call('HEXISTS', KEYS[7], 'l') == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[7], 'l', 1)
  if redis.call('PTTL', KEYS[7]) < 0 then redis.call('PEXPIRE', KEYS[7], keep_ms) end
  return 0
end
local function labels_of(rec)
  local p = 51 + (tonumber(string.sub(rec, 46, 50)) or 0)
  local c = string.sub(rec, p, p)
  if c == 'd' or c == 'r' then p = p + 1 end
  local ok, m = pcall(cjson.decode, string.sub(rec, p))
  if not ok or type(m) ~= 'table' then return '' end
  local out = {}
  for k, v in pairs(m) do
    if type(v) == 'boolean' then v = tostring(v) end
    if type(k) == 'string' and type(v) == 'string' and #k + 1 + #v <= ",
        lua_max_label!(),
        "
        and not string.find(k .. v, '[%z\\1]') then
      out[#out + 1] = k .. '\\0' .. v
    end
  end
  table.sort(out)
  return table.concat(out, '\\1')
end
local counted = redis.call('EXISTS', KEYS[7]) == 1
local swept = redis.call('GET', KEYS[5])
if not counted and not swept then
  swept = now_s
  redis.call('SET', KEYS[5], swept, 'PX', keep_ms)
end
local all = redis.call('HGETALL', KEYS[2])
if not counted then redis.call('HSET', KEYS[7], 'u', 0, 'd', 0, 'r', 0) end
for i = 1, #all, 2 do
  local rec = all[i + 1]
  if not counted then
    redis.call('ZADD', KEYS[6], 0, all[i])
    if valid(rec) and string.sub(rec, 1, 15) > swept then count(rec, 1) end
  end
  if valid(rec) then label(all[i], labels_of(rec)) end
end
redis.call('HSET', KEYS[7], 'l', 1)
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 then
  for _, k in ipairs({6, 7, 8, 9}) do redis.call('PEXPIRE', KEYS[k], ttl) end
end
return #all / 2
"
    ))
});

/// KEYS: feed epoch, feed stream. Returns `{epoch, last-generated-id,
/// max-deleted-entry-id, first entry id}`, each `""` when there is none (the last
/// two need Redis 7 and a non-empty stream respectively).
pub(super) static FEED_STATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local epoch = redis.call('GET', KEYS[1]) or ''
if redis.call('EXISTS', KEYS[2]) == 0 then return {epoch, '', '', ''} end
local info = redis.call('XINFO', 'STREAM', KEYS[2])
local last, deleted, first = '', '', ''
for i = 1, #info, 2 do
  local k, v = info[i], info[i + 1]
  if k == 'last-generated-id' then last = v
  elseif k == 'max-deleted-entry-id' then deleted = v
  elseif k == 'first-entry' and v then first = v[1] end
end
return {epoch, last, deleted, first}
",
    )
});

/// The mark a record carries after its lease for a status (`up` has none: its
/// records are byte for byte those of a server older than statuses).
pub(super) fn status_mark(status: Status) -> &'static str {
    match status {
        Status::Up => "",
        Status::Degraded => "d",
        Status::Draining => "r",
    }
}

/// A status as the heartbeat script takes it: `u`, `d` or `r` (`""` keeps the
/// stored one).
pub(super) fn status_arg(status: Status) -> &'static str {
    match status {
        Status::Up => "u",
        other => status_mark(other),
    }
}

/// Width of a time in a record, in digits (zero-padded; enough until the year
/// 33658).
pub(super) const TIME_DIGITS: usize = 15;

/// Width of the lease length in a record, in digits.
pub(super) const LEASE_LEN_DIGITS: usize = 5;

/// Longest lease a record can hold, in bytes. The server issues 32-character
/// leases; a longer one given to [`Store::login`](crate::store::Store::login) directly
/// is refused.
pub const MAX_LEASE_LEN: usize = 99_999;

/// Labels as the scripts take them (see [`lua_labels`]): joined by `\x01`, which no
/// label contains.
pub(super) fn labels_arg(meta: &crate::model::Meta) -> String {
    crate::store::query::labels_of(meta).join("\u{1}")
}

/// A lease as the scripts take it: its length in [`LEASE_LEN_DIGITS`] digits, then
/// the lease, exactly as the record holds it, so that the lease check is one plain
/// `find` at a fixed offset. A lease too long to be stored gets a header that
/// matches no record (its first byte is not a digit).
pub(super) fn lease_header(lease: &str) -> String {
    if lease.len() > MAX_LEASE_LEN {
        return "x".to_owned();
    }
    format!("{:0width$}{lease}", lease.len(), width = LEASE_LEN_DIGITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_headers() {
        assert_eq!(lease_header("ab"), "00002ab");
        assert_eq!(
            lease_header(&"l".repeat(MAX_LEASE_LEN)).len(),
            MAX_LEASE_LEN + 5
        );
        // Too long to be stored: matches nothing (records hold digits there).
        assert_eq!(lease_header(&"l".repeat(MAX_LEASE_LEN + 1)), "x");
    }

    #[test]
    fn the_scripts_spell_the_label_limit_as_rust_does() {
        assert_eq!(lua_max_label!(), crate::store::query::MAX_LABEL.to_string());
    }

    #[test]
    fn key_slack_matches_the_scripts() {
        assert_eq!(lua_key_slack_ms!(), KEY_SLACK.as_millis().to_string());
        // 15-digit times, cut to their first `lua_index_digits!()` digits, name slots
        // of INDEX_GRANULARITY.
        let cut: u32 = lua_index_digits!().parse().expect("a number");
        assert_eq!(10u128.pow(15 - cut), INDEX_GRANULARITY.as_millis());
        assert!(LOGIN.get_hash().len() == 40 && HEARTBEATS.get_hash() != LOGIN.get_hash());
    }
}
