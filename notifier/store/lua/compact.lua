-- compact: rewrite a shipment's history list with its latest run of entries as one chunk
-- (one better-compressed element holding several decisions, see shipments.py), and without
-- the oldest elements past the cap. A list is rewritten only while the elements the worker
-- read are still its first ones (a digest of them): entries appended since stay after the
-- chunk, and a list trimmed meanwhile is left for another time.
--
-- KEYS: per shipment, its history list
-- ARGV: per shipment: the number of elements read n, their digest (sha1 hex of each
--   element's length, ':' and bytes, in order), the number of elements dropped from the head
--   d, the position (0-based) r from which the rest of what was read becomes the chunk, and
--   the chunk
-- Returns the positions (1-based) of the lists rewritten.

local done = {}
for i = 1, #KEYS do
  local key, a = KEYS[i], 5 * (i - 1)
  local n, digest = tonumber(ARGV[a + 1]), ARGV[a + 2]
  local dropped, from, chunk = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), ARGV[a + 5]
  local read = redis.call('LRANGE', key, 0, n - 1)
  local parts = {}
  for j, element in ipairs(read) do parts[j] = #element .. ':' .. element end
  if #read == n and redis.sha1hex(table.concat(parts)) == digest then
    local ttl = redis.call('PTTL', key)
    local kept = {}
    for j = dropped + 1, from do table.insert(kept, read[j]) end
    table.insert(kept, chunk)
    for _, element in ipairs(redis.call('LRANGE', key, n, -1)) do table.insert(kept, element) end
    redis.call('DEL', key)
    redis.call('RPUSH', key, unpack(kept))
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
    table.insert(done, i)
  end
end
return done
