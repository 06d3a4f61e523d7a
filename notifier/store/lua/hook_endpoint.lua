-- hook_endpoint: write a merchant's webhook endpoint, atomically with its check: a new one only
-- while the merchant has fewer than the limit (two creates at once cannot pass it together); a
-- change only of the endpoint as it was read (a change racing a delete cannot bring it back,
-- and of two changes at once, a patch and a secret rotation, neither undoes the other).
--
-- KEYS[1]: the merchant's endpoints (hash: endpoint id -> JSON)
-- ARGV[1]: the endpoint id
-- ARGV[2]: its JSON
-- ARGV[3]: 'new' or 'change'
-- ARGV[4]: 'new': the most endpoints a merchant may have; 'change': the JSON it was read as
-- Returns 1 when written; 0 when the limit is reached ('new') or the endpoint is gone
-- ('change'); -1 when it changed since it was read ('change').

local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[3] == 'new' then
  if current or redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
    return 0
  end
elseif not current then
  return 0
elseif current ~= ARGV[4] then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
