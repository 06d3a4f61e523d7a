-- The due index: notification ids by the epoch ms they are due, in buckets (sorted sets of
-- up to about 128 ids, which Redis keeps compact), and the buckets by the earliest due ms in
-- each (see keys.py: due_bucket_key, due_buckets_key). The caller passes a notification's
-- bucket among the KEYS; its name is its member in the buckets' index.

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
  redis.call('ZADD', bucket, ms, id)
  due_sync(buckets, bucket)
end

-- a notification off the due index: its bucket, and the index from before 0.6 ('legacy')
local function due_remove(legacy, buckets, bucket, id)
  redis.call('ZREM', legacy, id)
  if redis.call('ZREM', bucket, id) == 1 then due_sync(buckets, bucket) end
end

-- when a notification is due (epoch ms, a number), from either index; nil: not on them
local function due_score(legacy, bucket, id)
  local score = redis.call('ZSCORE', bucket, id) or redis.call('ZSCORE', legacy, id)
  return score and tonumber(score)
end
