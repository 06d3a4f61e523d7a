-- compact: rewrite a shipment's list (its history, or its outcome records) with its latest
-- run of values as one chunk (one better-compressed element holding several, see
-- notifier/store/chunks.py), and without the oldest elements past the cap. A list is
-- rewritten only while the elements the worker read are still its first ones, byte for
-- byte: values appended since stay after the chunk, and a list trimmed or compacted
-- meanwhile is left for another time.
--
-- KEYS: per list, its key
-- ARGV: per list: the number of elements read n, the number of elements dropped from the
--   head d, the position (0-based) r from which the rest of what was read becomes the chunk,
--   the chunk, then the n elements as read
-- Returns the positions (1-based) of the lists rewritten.

local done = {}
local a = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local n, dropped, from, chunk =
    tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), ARGV[a + 3]
  local read = redis.call('LRANGE', key, 0, n - 1)
  local same = #read == n
  for j = 1, n do
    if not same then break end
    same = read[j] == ARGV[a + 3 + j]
  end
  a = a + 4 + n
  if same then
    local ttl = redis.call('PTTL', key)
    local kept = {}
    for j = dropped + 1, from do table.insert(kept, read[j]) end
    table.insert(kept, chunk)
    for _, element in ipairs(redis.call('LRANGE', key, n, -1)) do table.insert(kept, element) end
    redis.call('DEL', key)
    redis.call('RPUSH', key, unpack(kept))
    if ttl >= 0 then redis.call('PEXPIRE', key, ttl) end  -- 0: it was going anyway
    table.insert(done, i)
  end
end
return done
