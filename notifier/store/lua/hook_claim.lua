-- hook_claim: take the webhook events that are due for a while (a lease): each moves to the
-- lease's end in the due index, so no other worker sends it meanwhile, and comes back to
-- the one that dies while sending it once the lease is over.
--
-- KEYS[1]: the webhook events due (zset of event ids by due ms)
-- KEYS[2]: the webhook events (hash: event id -> stored JSON)
-- KEYS[3]: their progress (hash: event id -> JSON of attempts per endpoint)
-- ARGV[1]: now, epoch ms
-- ARGV[2]: the lease's end, epoch ms
-- ARGV[3]: the most events to take
-- Returns {id, stored JSON, progress ('' before the first attempt), ...}.

local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  local body = redis.call('HGET', KEYS[2], id)
  if body then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, id)
    table.insert(out, body)
    table.insert(out, redis.call('HGET', KEYS[3], id) or '')
  else
    redis.call('ZREM', KEYS[1], id)  -- its event is gone: nothing to send
  end
end
return out
