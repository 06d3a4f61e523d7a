-- ingest: per event, look its event id up among the ids seen lately and, only if new,
-- record it and XADD the event to its partition's inbox stream; then set the wake flag of
-- each stream that got an event. An event is either persisted and acknowledged, or not
-- acknowledged at all.
--
-- Event ids live in hash buckets <ARGV[4]><generation>:<bucket>, the generation counted by
-- Redis's clock (TIME / ARGV[2]), so API processes whose clocks disagree still agree on it.
-- An id is looked up in the current and the previous generation; a bucket expires when the
-- generation after its own ends.
--
-- KEYS: none. The script names its keys itself (buckets, pre-0.5 event keys, inbox streams
--   and their '<inbox>:wake' flags), so it needs a single Redis, not a Cluster.
-- ARGV[1]: JSON array with one [bucket, field, pre-0.5 event key, inbox stream, payload,
--   body digest, request id] per event: one argument for the whole group, since redis-py
--   packs every argument in Python and seven per event cost the API more than the script
-- ARGV[2]: how long an event id is remembered at least, seconds (a generation)
-- ARGV[3]: how long a wake flag lasts, ms
-- ARGV[4]: the bucket key prefix
-- Returns {admissions, woken}: per event 1 (accepted: recorded and appended), 0 (a
--   duplicate: the id is known with the same digest, or from before digests were recorded)
--   or 2 (a conflict: the id is known with another digest; nothing written); and the inbox
--   keys whose wake flag this call set (a flag already set is left to expire).

local events = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local generation = math.floor(tonumber(redis.call('TIME')[1]) / ttl)
local current = ARGV[4] .. generation .. ':'
local previous = ARGV[4] .. (generation - 1) .. ':'
-- a bucket lives through its generation and the next, when it is still looked at
local expire_at = (generation + 2) * ttl
local accepted = {}
local touched = {}
for i, e in ipairs(events) do
  local cur, field, inbox, digest = current .. e[1], e[2], e[4], e[6]
  -- the body digest recorded with the id: '' for ids recorded before 0.6 (and 0.4's keys)
  local seen = redis.call('HGET', cur, field) or redis.call('HGET', previous .. e[1], field)
  if not seen and redis.call('EXISTS', e[3]) == 1 then seen = '' end
  if seen then
    -- 0: the same event again (a duplicate); 2: another body under a known id (a conflict)
    if seen == '' or seen == digest then accepted[i] = 0 else accepted[i] = 2 end
  else
    redis.call('HSET', cur, field, digest)
    redis.call('EXPIREAT', cur, expire_at)
    redis.call('XADD', inbox, '*', 't', e[5], 'r', e[7] or '')
    accepted[i] = 1
    touched[inbox] = true
  end
end
local woken = {}
for inbox, _ in pairs(touched) do
  if redis.call('SET', inbox .. ':wake', '1', 'NX', 'PX', ARGV[3]) then
    table.insert(woken, inbox)
  end
end
return {accepted, woken}
