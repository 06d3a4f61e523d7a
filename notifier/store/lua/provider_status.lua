-- provider_status: record a provider's delivery status unless a later one is already known
-- (a late "sent" never overwrites "delivered"): in the ledger hash while the notification
-- is there, else as a record on its shipment's outcome list (see fold.lua).
--
-- KEYS[1]: the ledger hash
-- KEYS[2]: the shipment's record (see lib/record.lua)
-- KEYS[3], KEYS[4]: its history and outcome lists from before records
-- ARGV[1]: the status
-- ARGV[2]: its rank (later statuses rank higher; 'prank')
-- ARGV[3]: the provider's error ('' = none)
-- ARGV[4]: the notification id
-- ARGV[5]: the most records an outcome list keeps
-- Returns 1 when recorded, 0 when the notification is unknown or a status of the same or a
--   higher rank is known.

local rank = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local current = tonumber(redis.call('HGET', KEYS[1], 'prank') or '-1')
  if rank <= current then return 0 end
  redis.call('HSET', KEYS[1], 'provider_status', ARGV[1], 'prank', ARGV[2])
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'provider_error', ARGV[3]) end
  return 1
end
local rec = record_load(KEYS[2], KEYS[3], KEYS[4])
local found, current = outcome_rank(record_list(rec, 'o'), ARGV[4])
if not found or rank <= current then return 0 end
local status = {provider_status = ARGV[1], prank = ARGV[2]}
if ARGV[3] ~= '' then status['provider_error'] = ARGV[3] end
record_append(rec, 'o', ARGV[4] .. '\t' .. cjson.encode(status) .. '\t', tonumber(ARGV[5]))
record_save(KEYS[2], KEYS[3], KEYS[4], rec, nil)
return 1
