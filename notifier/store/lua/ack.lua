-- ack: acknowledge processed inbox entries and delete them from the stream, together (a
-- Redis Cluster pipeline has no MULTI).
--
-- KEYS[1]: the partition's inbox stream
-- ARGV[1]: the consumer group
-- ARGV[2..]: the entry ids
-- Returns how many were deleted.

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
