-- bury: move inbox entries that keep failing to the dead-letter stream (kept, never
-- dropped), acknowledged and deleted from their inbox in the same step.
--
-- KEYS[1]: the partition's inbox stream
-- KEYS[2]: the dead-letter stream
-- ARGV[1]: the consumer group
-- ARGV[2]: why they failed
-- then per entry: its id, its payload, the request id that brought it
-- Returns how many were moved.

local ids = {}
for a = 3, #ARGV, 3 do
  redis.call('XADD', KEYS[2], '*', 't', ARGV[a + 1], 'from', ARGV[a], 'why', ARGV[2],
    'r', ARGV[a + 2])
  table.insert(ids, ARGV[a])
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
redis.call('XDEL', KEYS[1], unpack(ids))
return #ids
