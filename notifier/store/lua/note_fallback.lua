-- note_fallback: note on a failed SMS's ledger entry the email that carried its update
-- instead (the SMS-to-email fallback), for the dead letters to say so.
--
-- KEYS[1]: the SMS's ledger hash
-- ARGV[1]: the email's notification id
-- Returns 1 when noted, 0 when the entry is gone (nothing is created: a hash made here
-- would have no expiry).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'fallback', ARGV[1])
return 1
