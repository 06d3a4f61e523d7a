-- reschedule: give a claimed notification back after a temporary failure, deferred until
-- ARGV[2]; the ledger entry and the due index change together or not at all.
--
-- KEYS[1]: the ledger hash
-- KEYS[2]: the due index (zset of notification ids by due ms)
-- ARGV[1]: the notification id
-- ARGV[2]: due, epoch ms
-- ARGV[3]: the error that made it wait
-- ARGV[4]: the owner token the entry must carry ('' = no owner check)
-- Returns 1 when rescheduled, 0 when the entry is gone or another owner holds it.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'deferred', 'due', ARGV[2], 'error', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
