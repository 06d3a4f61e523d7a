-- commit: per shipment, compare-and-set its state version. Where it still matches: the new
-- state, the decisions appended to the history (trimmed to the cap), the ledger entries of
-- new notifications, the stall and due indexes, and the tracking-number index (the shipments
-- that carried the number, in the week's bucket, see keys.py; kept at least as long as the
-- record). A shipment whose version moved (another worker got there first) is left
-- untouched, its new notifications too, and reported as a conflict for the caller to
-- re-decide. A ledger entry that exists already is kept as it is, and one settled for good
-- already (on the outcome list, see fold.lua) is never made again.
--
-- KEYS[1]: the stall index (zset of '<merchant>:<shipment>' by deadline ms)
-- KEYS[2]: the due index's buckets (see lib/due.lua)
-- KEYS[3], KEYS[4]: the merchant webhook events due, and the events (see hook_event.lua)
-- KEYS[5 .. 4 + nk]: the analytics days the batch counts in (hashes of counts, see below)
-- then per shipment: its record (see lib/record.lua), the history list and the outcome list
--   it had before records (read, then replaced by the record), its tracking number's bucket
--   of the week by Redis's clock as the caller reckons it (only when it has a tracking
--   number), and the ledger hash and due bucket of each new notification
-- ARGV[1]: the default lifetime of a record and new ledger entries, seconds
-- ARGV[2]: the history cap (entries kept)
-- ARGV[3]: the number of shipments
-- ARGV[4]: now, epoch microseconds (each new ledger entry's 'created'; ISO text before,
--   read either way by ledger.created_iso)
-- ARGV[5]: the ledger key prefix (the due index holds ids, not keys)
-- ARGV[6]: how many entries appended since the last chunk (see compact.lua) make a history
--   worth compacting (2 for a shipment given its own lifetime: it has ended)
-- ARGV[7]: now, epoch ms (when new webhook events are due)
-- ARGV[8]: the lifetime of an analytics day, seconds
-- ARGV[9]: nk, the number of analytics days; ARGV[10]: ns, the number of counts ("slots")
-- then per slot: the analytics day it is in (1 .. nk) and its field
-- then per shipment: the expected version, the new state, its stall member, its stall
--   deadline ms ('' takes it off the stall index), the number of history entries nh, its
--   lifetime in seconds ('' = ARGV[1]), its tracking number's hash, the start of its field
--   in the bucket ('' = no tracking number: no bucket among the keys), the nh entries, the
--   number of notifications nn, and per notification its ledger state, due ms ('' = not due-indexed) and payload, then the
--   number of merchant webhook events ne and the id and stored JSON of each (queued with the
--   decisions they are about, once each), then the number of its analytics counts nc and
--   each one's slot and amount. The counts of the shipments that commit are summed per slot
--   and added once each at the end.
-- Returns {conflicts, long}: the positions (1-based) of the shipments that conflicted, and of
--   those whose history is worth compacting.

local ttl = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local shipments = tonumber(ARGV[3])
local now = ARGV[4]
local stall, buckets = KEYS[1], KEYS[2]
local hookdue, hookevents = KEYS[3], KEYS[4]
local nk, ns = tonumber(ARGV[9]), tonumber(ARGV[10])
local slotday, slotfield, sums = {}, {}, {}
for i = 1, ns do
  slotday[i], slotfield[i], sums[i] = tonumber(ARGV[9 + 2 * i]), ARGV[10 + 2 * i], 0
end
local now_s = tonumber(redis.call('TIME')[1])
local a = 11 + 2 * ns
local k = 5 + nk
local conflicts, long = {}, {}

-- First every record is read, and whatever of it can fail to read on damaged data (the
-- frames of its history, its count of decisions, its outcome list), before anything is
-- written: Redis keeps what a script wrote before an error, so a record that does not read
-- must stop the script before any shipment of the batch is written (a state saved without
-- its new ledger entries would lose their messages; the batch's counts would be lost too).
local recs = {}
do
  local ai, ki = a, k
  for s = 1, shipments do
    local expected, nh, tracked = ARGV[ai], tonumber(ARGV[ai + 4]), ARGV[ai + 6]
    local rec = record_load(KEYS[ki], KEYS[ki + 1], KEYS[ki + 2])
    ki = ki + 3 + (tracked ~= '' and 1 or 0)
    ai = ai + 7 + nh
    local nn = tonumber(ARGV[ai])
    if (rec.v == '' and '0' or rec.v) == expected then
      if nh > 0 then
        if rec.raw and rec.raw.h then frame_count(rec.raw.h) end
        rec.counted = rec.hn == '' and values_in(record_list(rec, 'h')) or tonumber(rec.hn)
        if not rec.counted then error('damaged record: its count of decisions does not read') end
      end
      if nn > 0 then rec.done = settled_ids(record_list(rec, 'o')) end
    end
    ai = ai + 1 + 3 * nn
    ai = ai + 1 + 2 * tonumber(ARGV[ai])  -- the merchant webhook events
    ai = ai + 1 + 2 * tonumber(ARGV[ai])  -- the analytics counts
    ki = ki + 2 * nn
    recs[s] = rec
  end
end

for s = 1, shipments do
  local skey, hkey, okey = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  local expected, newstate, member, deadline, nh, sttl, tracked =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4]), ARGV[a + 5],
    ARGV[a + 6]
  local run = tonumber(ARGV[6])
  if sttl ~= '' then sttl, run = tonumber(sttl), 2 else sttl = ttl end
  a = a + 7
  local tkey = nil
  if tracked ~= '' then
    tkey = KEYS[k]
    k = k + 1
  end
  local rec = recs[s]
  local current = rec.v == '' and '0' or rec.v
  local ok = (current == expected)
  local done = rec.done
  if ok then
    rec.v, rec.s = tostring(tonumber(current) + 1), newstate
    if deadline == '' then
      redis.call('ZREM', stall, member)
    else
      redis.call('ZADD', stall, deadline, member)
    end
    if tkey then
      -- a field '<number hash><shipment id>' (a lookup scans for the hash): short values
      -- keep the bucket a small hash; it lives at least as long as this record
      local id = string.sub(member, string.find(member, ':', 1, true) + 1)
      redis.call('HSET', tkey, tracked .. id, '')
      if redis.call('EXPIRETIME', tkey) < now_s + sttl then
        redis.call('EXPIREAT', tkey, now_s + sttl)
      end
    end
    if nh > 0 then
      -- every entry ever appended, for the history API's positions; a shipment from before
      -- the counter starts from what its history holds
      rec.hn = tostring(rec.counted + nh)
      for i = 0, nh - 1 do
        record_append(rec, 'h', ARGV[a + i], cap)
      end
      if record_plain_run(rec, 'h', run) then table.insert(long, s) end
    end
    record_save(skey, hkey, okey, rec, sttl)
    redis.call('EXPIRE', skey, sttl)
  else
    table.insert(conflicts, s)
  end
  a = a + nh
  local nn = tonumber(ARGV[a])
  a = a + 1
  for i = 0, nn - 1 do
    local st, due, payload = ARGV[a + 3 * i], ARGV[a + 3 * i + 1], ARGV[a + 3 * i + 2]
    local ledger, bucket = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]
    local nid = string.sub(ledger, string.len(ARGV[5]) + 1)
    if ok and not done[nid] and redis.call('HSETNX', ledger, 'st', st) == 1 then
      -- no 'attempts' until the first claim counts one: none reads as 0 (ledger.py)
      redis.call('HSET', ledger, 'created', now, 'due', due, unpack(payload_fields(payload)))
      redis.call('EXPIRE', ledger, sttl)
      if due ~= '' then due_add(buckets, bucket, nid, due) end
    end
  end
  k = k + 2 * nn
  a = a + 3 * nn
  local ne = tonumber(ARGV[a])
  a = a + 1
  for i = 0, ne - 1 do
    if ok and redis.call('HSETNX', hookevents, ARGV[a + 2 * i], ARGV[a + 2 * i + 1]) == 1 then
      redis.call('ZADD', hookdue, ARGV[7], ARGV[a + 2 * i])
    end
  end
  a = a + 2 * ne
  local nc = tonumber(ARGV[a])
  a = a + 1
  if ok then
    for i = 0, nc - 1 do
      local slot = tonumber(ARGV[a + 2 * i])
      sums[slot] = sums[slot] + tonumber(ARGV[a + 2 * i + 1])
    end
  end
  a = a + 2 * nc
end
local counted = {}
for i = 1, ns do
  if sums[i] ~= 0 then
    redis.call('HINCRBY', KEYS[4 + slotday[i]], slotfield[i], sums[i])
    counted[slotday[i]] = true
  end
end
for day in pairs(counted) do
  redis.call('EXPIRE', KEYS[4 + day], ARGV[8])
end
return {conflicts, long}
