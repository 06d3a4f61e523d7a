-- record_test: append an entry (a test send) to a shipment's history, kept like any history.
--
-- KEYS[1]: the shipment's record (see lib/record.lua)
-- KEYS[2], KEYS[3]: its history and outcome lists from before records
-- ARGV[1]: the packed entry
-- ARGV[2]: the history cap (entries kept)
-- ARGV[3]: the record's lifetime, seconds
-- Returns the history's length (elements).

local rec = record_load(KEYS[1], KEYS[2], KEYS[3])
record_append(rec, 'h', ARGV[1], tonumber(ARGV[2]))
record_save(KEYS[1], KEYS[2], KEYS[3], rec, nil)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return #record_list(rec, 'h')
