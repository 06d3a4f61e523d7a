-- hook_event: queue merchant webhook events, each once (an id queued already, or being sent,
-- is left as it is).
--
-- KEYS[1]: the webhook events due (zset of event ids by due ms)
-- KEYS[2]: the webhook events (hash: event id -> stored JSON)
-- ARGV[1]: when they are due, epoch ms
-- then per event: its id and its stored JSON
-- Returns how many were new.

local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i])
    added = added + 1
  end
end
return added
