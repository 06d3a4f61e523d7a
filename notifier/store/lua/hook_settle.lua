-- hook_settle: after an event's sends, by the worker whose lease it still is: forget it (every
-- endpoint took it or was given up on), or keep its progress and when to try again.
--
-- KEYS[1]: the webhook events due (zset of event ids by due ms)
-- KEYS[2]: the webhook events (hash: event id -> stored JSON)
-- KEYS[3]: their progress (hash: event id -> JSON of attempts per endpoint)
-- ARGV[1]: the event id
-- ARGV[2]: the lease's end the worker claimed it with (hook_claim), epoch ms
-- ARGV[3]: its progress ('' = done: forget it)
-- ARGV[4]: when to try again, epoch ms (when not done)
-- Returns 1, or 0 when the lease had ended and another worker holds the event (left as it is).

local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
end
return 1
