-- unschedule: take settled notifications off the due index, unless rescheduled past now.
--
-- KEYS[1]: the due index (zset of notification ids by due ms)
-- ARGV[1]: now, epoch ms
-- ARGV[2 ..]: the notification ids
-- Returns 1.

local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= now then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 1
