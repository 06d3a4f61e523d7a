-- record_test: append an entry (a test send) to a shipment's history, kept like any history.
--
-- KEYS[1]: the shipment's history list
-- ARGV[1]: the packed entry
-- ARGV[2]: the history cap (entries kept)
-- ARGV[3]: the history's lifetime, seconds
-- Returns the history's length.

redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('LLEN', KEYS[1])
