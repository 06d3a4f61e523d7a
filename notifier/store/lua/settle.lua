-- settle: set fields on the ledger entries the caller still holds, and drop the fields a
-- settled entry no longer needs. An entry that expired is never re-created (it would lack
-- its payload and lifetime), and a worker whose claim ran out and was taken over must not
-- overwrite what the new holder recorded.
--
-- KEYS: the ledger hashes
-- ARGV[1]: the owner token the entries must carry ('' = no owner check)
-- ARGV[2]: n, the number of fields set per key
-- ARGV[3]: d, the number of fields to drop
-- ARGV[4 .. 3+d]: the names of the fields to drop (its claim; a payload is in pieces, 'p',
--   'p1'..., see lib/payload.lua, and is never dropped here)
-- then n field/value pairs per key, in KEYS order
-- Returns the positions (1-based) of the keys settled.

local owner = ARGV[1]
local n = tonumber(ARGV[2])
local d = tonumber(ARGV[3])
local a = 4 + d
local drop = {}
for f = 4, 3 + d do drop[ARGV[f]] = true end
local settled = {}
for i = 1, #KEYS do
  local mine = owner == '' or redis.call('HGET', KEYS[i], 'owner') == owner
  if redis.call('EXISTS', KEYS[i]) == 1 and mine then
    for f = 0, n - 1 do
      redis.call('HSET', KEYS[i], ARGV[a + 2 * f], ARGV[a + 2 * f + 1])
    end
    if d > 0 then
      -- Written anew without what it drops (and without empty fields), a settled entry
      -- is a compact listpack again when its values are short; Redis never converts a
      -- hash back by itself once the payload made it a hashtable (~2.5x the memory).
      local ttl = redis.call('PTTL', KEYS[i])
      local all = redis.call('HGETALL', KEYS[i])
      local kept = {}
      for f = 1, #all, 2 do
        if all[f + 1] ~= '' and not drop[all[f]] then
          table.insert(kept, all[f])
          table.insert(kept, all[f + 1])
        end
      end
      redis.call('DEL', KEYS[i])
      redis.call('HSET', KEYS[i], unpack(kept))
      if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
    table.insert(settled, i)
  end
  a = a + 2 * n
end
return settled
