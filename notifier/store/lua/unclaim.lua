-- unclaim: undo claims just made that must not be used (the replicas did not confirm them in
-- time): each notification is as it was before the claim, for a later round to claim again.
-- A claim that is no longer the owner's (or no longer a claim) is left as it is.
--
-- KEYS: the ledger hashes claimed
-- ARGV[1]: the owner token the claims were made with
-- ARGV[1 + i]: the status KEYS[i] had before the claim: 'pending' or 'deferred' (claimed
--   fresh), or 'sending' (taken over after an expired lease: left takeable at once, as
--   possibly sent by its earlier holder)
-- Returns how many were undone.

local undone = 0
for i = 1, #KEYS do
  local held = redis.call('HMGET', KEYS[i], 'st', 'owner')
  if held[1] == 'sending' and held[2] == ARGV[1] then
    local before = ARGV[1 + i]
    redis.call('HSET', KEYS[i], 'st', before)
    if before == 'sending' then
      redis.call('HSET', KEYS[i], 'claimed', '0')
    else
      redis.call('HDEL', KEYS[i], 'claimed', 'owner')
    end
    if redis.call('HINCRBY', KEYS[i], 'attempts', -1) <= 0 then
      redis.call('HDEL', KEYS[i], 'attempts')
    end
    undone = undone + 1
  end
end
return undone
