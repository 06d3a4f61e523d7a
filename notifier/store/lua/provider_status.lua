-- provider_status: record a provider's delivery status unless a later one is already known
-- (a late "sent" never overwrites "delivered").
--
-- KEYS[1]: the ledger hash
-- ARGV[1]: the status
-- ARGV[2]: its rank (later statuses rank higher; the entry's 'prank')
-- ARGV[3]: the provider's error ('' = none)
-- Returns 1 when recorded, 0 when the entry is unknown or a status of the same or a higher
--   rank is known.

if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'prank') or '-1')
if tonumber(ARGV[2]) <= current then return 0 end
redis.call('HSET', KEYS[1], 'provider_status', ARGV[1], 'prank', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'provider_error', ARGV[3]) end
return 1
