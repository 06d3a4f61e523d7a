-- shorten: let keys expire within a lifetime, never later than they would (an ended
-- shipment's notifications and its record follow its retention). One call, not one
-- EXPIRE each: a batch's ended shipments named thousands of keys, most of them settled and
-- gone already.
--
-- KEYS: the keys (ledger hashes, shipments' records and the lists from before records)
-- ARGV[1]: the lifetime, seconds
-- Returns how many keys had their lifetime shortened.

local n = 0
for _, key in ipairs(KEYS) do
  n = n + redis.call('EXPIRE', key, ARGV[1], 'LT')
end
return n
