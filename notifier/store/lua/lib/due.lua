-- The due index: notification ids by the epoch ms they are due, in buckets (sorted sets of
-- up to about 128 ids, which Redis keeps compact), and the buckets by the earliest due ms in
-- each (see keys.py: due_bucket_key, due_buckets_key). The caller passes a notification's
-- bucket among the KEYS; its name is its member in the buckets' index. An id as the service
-- makes them, 'n_' and 32 lowercase hex digits, is a bucket's member as byte 255 and the 16
-- bytes the digits spell (17 bytes, not 34: a smaller listpack); any other id is its member
-- as it is (text never holds byte 255). keys.py: due_member, due_id.

-- a notification id's member in its bucket
local function due_member(id)
  if #id == 34 and string.find(id, '^n_[0-9a-f]+$') then
    return '\255' .. string.gsub(string.sub(id, 3), '..', function(hex)
      return string.char(tonumber(hex, 16))
    end)
  end
  return id
end

-- the bucket's earliest due ms, in the buckets' index (an empty bucket leaves it)
local function due_sync(buckets, bucket)
  local first = redis.call('ZRANGE', bucket, 0, 0, 'WITHSCORES')
  if first[1] then
    redis.call('ZADD', buckets, first[2], bucket)
  else
    redis.call('ZREM', buckets, bucket)
  end
end

-- a notification due at ms (again, if it was due before)
local function due_add(buckets, bucket, id, ms)
  redis.call('ZADD', bucket, ms, due_member(id))
  due_sync(buckets, bucket)
end

-- a notification out of its bucket
local function due_take(buckets, bucket, id)
  if redis.call('ZREM', bucket, due_member(id)) == 1 then due_sync(buckets, bucket) end
end

-- a notification off the due index: its bucket, and the index from before 0.6 ('legacy')
local function due_remove(legacy, buckets, bucket, id)
  redis.call('ZREM', legacy, id)
  due_take(buckets, bucket, id)
end
