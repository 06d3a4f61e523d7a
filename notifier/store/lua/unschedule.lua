-- unschedule: take settled notifications off the due index, unless rescheduled past now.
--
-- KEYS[1]: the due index from before 0.6 (zset of notification ids by due ms)
-- KEYS[2]: the due index's buckets (see lib/due.lua)
-- KEYS[3 ..]: each notification's due bucket, in ARGV's order
-- ARGV[1]: now, epoch ms
-- ARGV[2 ..]: the notification ids
-- Returns 1.

local now = tonumber(ARGV[1])
for i = 2, #ARGV do
  local id, bucket = ARGV[i], KEYS[i + 1]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= now then redis.call('ZREM', KEYS[1], id) end
  score = redis.call('ZSCORE', bucket, due_member(id))
  if score and tonumber(score) <= now then due_take(KEYS[2], bucket, id) end
end
return 1
