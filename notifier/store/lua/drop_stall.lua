-- drop_stall: take a shipment off the stall index unless its deadline moved meanwhile.
--
-- KEYS[1]: the stall index (zset of '<merchant>:<shipment>' by deadline ms)
-- ARGV[1]: the shipment's member
-- ARGV[2]: the deadline ms it was found with
-- Returns 1 when removed, 0 when the deadline moved or it is gone.

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
