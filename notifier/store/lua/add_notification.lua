-- add_notification: create a notification outside a decision (a fallback), deferred until
-- its due time, with a history entry saying why; never twice.
--
-- KEYS[1]: the ledger hash
-- KEYS[2]: the due index (zset of notification ids by due ms)
-- KEYS[3]: the shipment's history list
-- KEYS[4]: the shipment's state hash (its 'hn' counts every history entry ever appended)
-- KEYS[5]: the shipment's outcome list (notifications settled for good, see fold.lua)
-- ARGV[1]: the notification id
-- ARGV[2]: its payload
-- ARGV[3]: due, epoch ms
-- ARGV[4]: the history entry
-- ARGV[5]: the lifetime of the ledger entry and the history, seconds
-- ARGV[6]: the history cap (entries kept)
-- Returns 1 when created, 0 when the ledger entry exists or was settled already (nothing
--   written).

if settled_ids(KEYS[5])[ARGV[1]] then return 0 end
if redis.call('HSETNX', KEYS[1], 'st', 'deferred') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'due', ARGV[3], 'attempts', '0')
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  if redis.call('HEXISTS', KEYS[4], 'hn') == 0 then
    redis.call('HSET', KEYS[4], 'hn', decisions_in(KEYS[3]))
  end
  redis.call('HINCRBY', KEYS[4], 'hn', 1)
end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
