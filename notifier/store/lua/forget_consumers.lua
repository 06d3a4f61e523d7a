-- forget_consumers: remove a partition group's consumers that hold nothing and have been
-- idle a long time (a worker that stopped or died; each worker start reads under a new
-- name, so without this they pile up, one per start and partition, for good).
--
-- KEYS[1]: the partition's inbox stream
-- ARGV[1]: the consumer group
-- ARGV[2]: how long a consumer must have been idle (ms)
-- ARGV[3]: the caller's own consumer name (never removed)
-- Returns how many consumers were removed.
--
-- One script, so no entry can be handed to a consumer between the look at its pending
-- count and its removal (XGROUP DELCONSUMER drops a consumer's pending entries: they would
-- never be handed out again). A live worker removed while idle is made again by its next
-- read, as any new consumer is.

local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  return 0  -- no stream or no group yet: nothing to forget
end
local idle_ms = tonumber(ARGV[2])
local removed = 0
for _, consumer in ipairs(consumers) do
  local field = {}
  for i = 1, #consumer, 2 do
    field[consumer[i]] = consumer[i + 1]
  end
  local name = field['name']
  if name ~= ARGV[3] and tonumber(field['pending']) == 0 and tonumber(field['idle']) >= idle_ms then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
    removed = removed + 1
  end
end
return removed
