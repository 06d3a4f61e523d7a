-- hook_endpoint: write a merchant's webhook endpoint, atomically with its check: a new one only
-- while the merchant has fewer than the limit (two creates at once cannot pass it together), a
-- change only of one that still exists (a change racing a delete cannot bring it back).
--
-- KEYS[1]: the merchant's endpoints (hash: endpoint id -> JSON)
-- ARGV[1]: the endpoint id
-- ARGV[2]: its JSON
-- ARGV[3]: 'new' (with ARGV[4], the most endpoints a merchant may have) or 'change'
-- ARGV[4]: the limit
-- Returns 1 when written; 0 when the limit is reached ('new') or the endpoint is gone ('change').

local exists = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if ARGV[3] == 'new' then
  if exists or redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
    return 0
  end
elseif not exists then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
