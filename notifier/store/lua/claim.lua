-- claim: take notifications for sending, so two workers never send the same one. A pending
-- one, a deferred one whose due time has come (only when ARGV[3] is 'due'), and a sending
-- one whose lease ran out become 'sending': claimed now, by ARGV[4], one more attempt.
--
-- KEYS: the ledger hashes to claim
-- ARGV[1]: now, epoch ms
-- ARGV[2]: the lease, ms
-- ARGV[3]: 'due' to claim deferred ones that are due; anything else leaves them deferred
-- ARGV[4]: the owner token recorded with the claim
-- Returns per key {code, value}: {1, payload, created, before} claimed fresh; {2, payload,
--   created, before} reclaimed after an expired lease (it may have been sent already), with
--   the entry's 'created' ('' when it has none: a waiting payload leaves it out when the
--   entry has it, models.waiting_payload) and, in before, its status, owner and claimed
--   fields before the claim ('' for one it had not), what unclaim.lua puts back;
--   {3, claimed ms} busy (a live claim,
--   made or last renewed then);
--   {4, due ms} deferred; {0, ''} nothing to do (settled, unknown, or without a payload).

local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local due_ok = ARGV[3] == 'due'
local out = {}
for i = 1, #KEYS do
  local st = redis.call('HGET', KEYS[i], 'st')
  local code = 0
  if st == 'pending' then
    code = 1
  elseif st == 'deferred' then
    local due = redis.call('HGET', KEYS[i], 'due') or ''
    if due_ok and tonumber(due) <= now then code = 1 end
  elseif st == 'sending' then
    local claimed = tonumber(redis.call('HGET', KEYS[i], 'claimed') or '0')
    if claimed + lease < now then code = 2 end
  end
  if code > 0 then
    local payload = payload_of(KEYS[i])
    if payload then
      local before = redis.call('HMGET', KEYS[i], 'owner', 'claimed')
      before = {st, before[1] or '', before[2] or ''}
      redis.call('HSET', KEYS[i], 'st', 'sending', 'claimed', tostring(now), 'owner', ARGV[4])
      redis.call('HINCRBY', KEYS[i], 'attempts', 1)
      out[i] = {code, payload, redis.call('HGET', KEYS[i], 'created') or '', before}
    else
      out[i] = {0, ''}
    end
  elseif st == 'sending' then
    out[i] = {3, redis.call('HGET', KEYS[i], 'claimed') or '0'}
  elseif st == 'deferred' then
    out[i] = {4, redis.call('HGET', KEYS[i], 'due') or '0'}
  else
    out[i] = {0, ''}
  end
end
return out
