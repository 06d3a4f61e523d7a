-- add_notification: create a notification outside a decision (a fallback), deferred until
-- its due time, with a history entry saying why; never twice.
--
-- KEYS[1]: the ledger hash
-- KEYS[2], KEYS[3]: the due index's buckets, and the notification's (see lib/due.lua)
-- KEYS[4]: the shipment's record (see lib/record.lua: its 'hn' counts every history entry
--   ever appended, its outcome list the notifications settled for good, see fold.lua)
-- KEYS[5], KEYS[6]: its history and outcome lists from before records
-- ARGV[1]: the notification id
-- ARGV[2]: its payload
-- ARGV[3]: due, epoch ms
-- ARGV[4]: the history entry
-- ARGV[5]: the lifetime of the ledger entry, seconds (and the least a record without a
--   state keeps)
-- ARGV[6]: the history cap (entries kept)
-- Returns 1 when created, 0 when the ledger entry exists or was settled already (nothing
--   written).

local rec = record_load(KEYS[4], KEYS[5], KEYS[6])
if settled_ids(record_list(rec, 'o'))[ARGV[1]] then return 0 end
if redis.call('HSETNX', KEYS[1], 'st', 'deferred') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'due', ARGV[3], unpack(payload_fields(ARGV[2])))
redis.call('EXPIRE', KEYS[1], ARGV[5])
due_add(KEYS[2], KEYS[3], ARGV[1], ARGV[3])
if rec.v ~= '' then
  -- a shipment with a state counts its entries (one without counts them once it has one)
  local counted = rec.hn == '' and values_in(record_list(rec, 'h')) or tonumber(rec.hn)
  rec.hn = tostring(counted + 1)
end
record_append(rec, 'h', ARGV[4], tonumber(ARGV[6]))
record_save(KEYS[4], KEYS[5], KEYS[6], rec, tonumber(ARGV[5]))
if rec.v == '' then
  -- no state: the record lives as long as the entry, never shorter; one with a state lives as
  -- its commits say (an ended shipment: its retention, the recipient's details with it)
  redis.call('EXPIRE', KEYS[4], ARGV[5], 'GT')
end
return 1
