-- fold: settle notifications for good (sent or cancelled). Each one the caller still holds
-- leaves the ledger: one short record goes to its shipment's outcome list (in its record, see
-- lib/record.lua; read back with the shipment's history) and its hash is deleted, so a
-- settled notification costs a few bytes of its shipment's record, not a key. An entry that expired is never re-created, and a worker whose claim ran
-- out and was taken over must not overwrite what the new holder recorded.
--
-- KEYS: per notification: its ledger hash, then its shipment's record, and the history and
--   outcome lists from before records (see lib/record.lua)
-- ARGV[1]: the owner token the entries must carry ('' = no owner check)
-- ARGV[2]: the most records an outcome list keeps (the oldest go first, like the history's)
-- then per notification: its id, and what the worker records (packed JSON)
-- A record is '<id>\t<JSON of the ledger fields the worker does not know: attempts, due,
--   created, a provider status already reported>\t<what the worker records>'; the worker
--   later folds records into chunks (lua/lib/outcomes.lua says how the scripts read them).
-- Returns the positions (1-based) of the notifications settled.

local owner = ARGV[1]
local cap = tonumber(ARGV[2])
local kept = {'attempts', 'due', 'created', 'provider_status', 'prank', 'provider_error'}
local settled = {}
for i = 1, #KEYS / 4 do
  local ledger, skey, hkey, okey = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i]
  local mine = owner == '' or redis.call('HGET', ledger, 'owner') == owner
  if redis.call('EXISTS', ledger) == 1 and mine then
    local values = redis.call('HMGET', ledger, unpack(kept))
    local known = {}
    for f = 1, #kept do
      if values[f] and values[f] ~= '' then known[kept[f]] = values[f] end
    end
    local ttl = redis.call('PTTL', ledger)
    local rec = record_load(skey, hkey, okey)
    local record = ARGV[2 * i + 1] .. '\t' .. cjson.encode(known) .. '\t' .. ARGV[2 * i + 2]
    record_append(rec, 'o', record, cap)
    record_save(skey, hkey, okey, rec, nil)
    -- a record with a state lives as the state's commits say (an ended shipment: its
    -- retention, the recipient's details with it); one with no state, as long as the entry
    -- would have
    if rec.v == '' and ttl > redis.call('PTTL', skey) then redis.call('PEXPIRE', skey, ttl) end
    redis.call('DEL', ledger)
    table.insert(settled, i)
  end
end
return settled
