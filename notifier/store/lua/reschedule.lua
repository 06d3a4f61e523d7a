-- reschedule: give a claimed notification back after a temporary failure, deferred until
-- ARGV[2]; the ledger entry and the due index change together or not at all.
--
-- KEYS[1]: the ledger hash
-- KEYS[2]: the due index from before 0.6 (an id there leaves it)
-- KEYS[3], KEYS[4]: the due index's buckets, and the notification's (see lib/due.lua)
-- ARGV[1]: the notification id
-- ARGV[2]: due, epoch ms
-- ARGV[3]: the error that made it wait
-- ARGV[4]: the owner token the entry must carry ('' = no owner check)
-- Returns 1 when rescheduled, 0 when the entry is gone or another owner holds it.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'deferred', 'due', ARGV[2], 'error', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
due_add(KEYS[3], KEYS[4], ARGV[1], ARGV[2])
return 1
