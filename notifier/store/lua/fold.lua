-- fold: settle notifications for good (sent or cancelled). Each one the caller still holds
-- leaves the ledger: one short record goes to its shipment's outcome list (in its record, see
-- lib/record.lua; read back with the shipment's history) and its hash is deleted, so a
-- settled notification costs a few bytes of its shipment's record, not a key. An entry that expired is never re-created, and a worker whose claim ran
-- out and was taken over must not overwrite what the new holder recorded.
--
-- KEYS[1], KEYS[2]: the due index from before 0.6 and the due index's buckets (a
--   notification settled while it waits, ARGV[3], leaves them; see lib/due.lua)
-- then per notification: its ledger hash, its due bucket, then its shipment's record, and
--   the history and outcome lists from before records (see lib/record.lua)
-- ARGV[1]: the owner token the entries must carry ('' = no owner check)
-- ARGV[2]: the most records an outcome list keeps (the oldest go first, like the history's)
-- ARGV[3]: '' to settle whatever the owner check lets through; epoch ms to settle only
--   entries still waiting for a due time later than that (deferred, claimed by no one): a
--   newer decision overtook them before they came due
-- then per notification: its id, and what the worker records (packed JSON)
-- A record is '<id>\t<JSON of the ledger fields the worker does not know: attempts, due,
--   created, a provider status already reported>\t<what the worker records>'; the worker
--   later folds records into chunks (lua/lib/outcomes.lua says how the scripts read them).
-- Returns the positions (1-based) of the notifications settled.

local owner = ARGV[1]
local cap = tonumber(ARGV[2])
local waiting_after = tonumber(ARGV[3])
local kept = {'attempts', 'due', 'created', 'provider_status', 'prank', 'provider_error'}
local n = (#KEYS - 2) / 5

-- First which entries settle, and every record they go to is read, with its outcome list's
-- frames, before anything is written: Redis keeps what a script wrote before an error, so
-- a record that does not read must stop the script before any entry is settled (the caller
-- then settles them one at a time; an entry settled here before the error would be gone
-- without the caller knowing it settled: no provider id, no counts).
local settling, recs, seen = {}, {}, {}
for i = 1, n do
  local ledger, skey = KEYS[5 * i - 2], KEYS[5 * i]
  -- an id given twice settles once, as when each was deleted before the next was looked at
  local mine = not seen[ledger] and (owner == '' or redis.call('HGET', ledger, 'owner') == owner)
  if mine and waiting_after then
    local st, due = unpack(redis.call('HMGET', ledger, 'st', 'due'))
    mine = st == 'deferred' and (tonumber(due) or 0) > waiting_after
  end
  if mine and redis.call('EXISTS', ledger) == 1 then
    settling[i], seen[ledger] = true, true
    if not recs[skey] then
      local rec = record_load(skey, KEYS[5 * i + 1], KEYS[5 * i + 2])
      if rec.raw.o then frame_count(rec.raw.o) end
      recs[skey] = rec
    end
  end
end

local settled = {}
for i = 1, n do
  local ledger, bucket = KEYS[5 * i - 2], KEYS[5 * i - 1]
  local skey, hkey, okey = KEYS[5 * i], KEYS[5 * i + 1], KEYS[5 * i + 2]
  if settling[i] then
    local values = redis.call('HMGET', ledger, unpack(kept))
    local known = {}
    for f = 1, #kept do
      if values[f] and values[f] ~= '' then known[kept[f]] = values[f] end
    end
    local ttl = redis.call('PTTL', ledger)
    local rec = recs[skey]
    local record = ARGV[2 * i + 2] .. '\t' .. cjson.encode(known) .. '\t' .. ARGV[2 * i + 3]
    record_append(rec, 'o', record, cap)
    record_save(skey, hkey, okey, rec, nil)
    -- a record with a state lives as the state's commits say (an ended shipment: its
    -- retention, the recipient's details with it); one with no state, as long as the entry
    -- would have
    if rec.v == '' and ttl > redis.call('PTTL', skey) then redis.call('PEXPIRE', skey, ttl) end
    redis.call('DEL', ledger)
    -- one still waiting is on the due index; the others leave it through the due sweep
    if waiting_after then due_remove(KEYS[1], KEYS[2], bucket, ARGV[2 * i + 2]) end
    table.insert(settled, i)
  end
end
return settled
