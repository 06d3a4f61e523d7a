-- unclaim: undo claims just made that must not be used (the replicas did not confirm them in
-- time): each notification is as it was before the claim (its status, holder and claim
-- time; one attempt less), for a later round to claim again. One taken over after an
-- expired lease gets its earlier holder back, who can then still record what it sent. A
-- claim that is no longer the owner's (or no longer a claim) is left as it is.
--
-- KEYS: the ledger hashes claimed
-- ARGV[1]: the owner token the claims were made with
-- ARGV[3i - 1], ARGV[3i], ARGV[3i + 1]: KEYS[i]'s status, owner and claimed fields before
--   the claim (claim.lua answers them), '' for a field it did not have
-- Returns how many were undone.

local undone = 0
for i = 1, #KEYS do
  local held = redis.call('HMGET', KEYS[i], 'st', 'owner')
  if held[1] == 'sending' and held[2] == ARGV[1] then
    redis.call('HSET', KEYS[i], 'st', ARGV[3 * i - 1])
    local fields = {'owner', 'claimed'}
    for f = 1, 2 do
      local value = ARGV[3 * i + f - 1]
      if value == '' then
        redis.call('HDEL', KEYS[i], fields[f])
      else
        redis.call('HSET', KEYS[i], fields[f], value)
      end
    end
    if redis.call('HINCRBY', KEYS[i], 'attempts', -1) <= 0 then
      redis.call('HDEL', KEYS[i], 'attempts')
    end
    undone = undone + 1
  end
end
return undone
