-- ingest: per event, look its event id up among the ids seen lately and, only if new,
-- record it and XADD the event to its partition's inbox stream; then set the wake flag of
-- each stream that got an event. An event is either persisted and acknowledged, or not
-- acknowledged at all.
--
-- Event ids live in hash buckets, one set of buckets per generation of ARGV[2] seconds.
-- The caller passes each bucket in three generations around ARGV[3], Redis's generation as
-- the caller reckons it (its clock plus the offset it measured to Redis's); the one written
-- is the generation of Redis's own clock (TIME / ARGV[2]), so API processes whose clocks
-- disagree still agree on it. An id is looked up in all three, which covers Redis's current
-- and previous generation; a bucket expires when the generation after its own ends.
--
-- Before binary fields (below), an id's field was the first ARGV[5] (12) characters of the
-- 16 the caller passes, and before that the whole 16: KEYS[1] holds the first generation with
-- short fields only, and in an older generation an id is looked up by its long field too.
-- The first call that finds it unset sets it to the generation after Redis's: the current
-- one may hold long fields the version before wrote, until just now. A body digest recorded
-- with a long field is 12 characters, with a short one 8 or 6; the one passed now is their
-- first 6 (compared on the shorter length).
--
-- Fields are binary now: the first ARGV[7] (8) bytes of the long field's hash, recorded with
-- the first ARGV[8] (4) bytes of the body digest, both passed in ARGV[6]. KEYS[2] holds the
-- first generation with binary fields only, set like KEYS[1]; in an older generation an id is
-- looked up by its base64 fields too (and a digest found with one compared as above), and
-- a binary field, whose length no base64 field has, is found first in every generation.
--
-- KEYS: the generation since which fields are short; the generation since which they are
--   binary; per inbox stream that gets events: the
--   stream, then its wake flag; then per bucket its keys in generations ARGV[3] - 1,
--   ARGV[3] and ARGV[3] + 1; then the pre-0.5 event keys (one Redis only: a Cluster never
--   held them)
-- ARGV[1]: JSON array with one [position in KEYS of the event's bucket (its first
--   generation), long field, position of its pre-0.5 event key (0: none), position of its
--   inbox stream, payload, body digest, request id] per event: one argument for the whole group,
--   since redis-py packs every argument in Python and seven per event cost the API more
--   than the script
-- ARGV[2]: how long an event id is remembered at least, seconds (a generation)
-- ARGV[3]: the generation by the caller's clock
-- ARGV[4]: how long a wake flag lasts, ms
-- ARGV[5]: the characters of a short field (notifier/store/keys.py, EVENT_FIELD_CHARS)
-- ARGV[6]: per event, in order, its binary field then its binary digest (keys.event_binary)
-- ARGV[7], ARGV[8]: the bytes of a binary field and of a binary digest (EVENT_FIELD_BYTES,
--   EVENT_DIGEST_BYTES)
-- ARGV[9]: binary digests (ARGV[8] bytes each) that versions before 12-06 recorded for some
--   events' bodies (their digest of the body as posted, not of its canonical form): such an
--   event carries two more members, the 1-based place of its digest here and the same in
--   base64, and a known id whose digest is either one is a duplicate
-- Returns {admissions, woken}: per event 1 (accepted: recorded and appended), 0 (a
--   duplicate: the id is known with the same digest, or from before digests were recorded)
--   or 2 (a conflict: the id is known with another digest; nothing written); and the
--   positions in KEYS of the inbox streams whose wake flag this call set (a flag already
--   set is left to expire). An error when the caller's clock is a generation or more off.

local events = cjson.decode(ARGV[1])
local ttl = tonumber(ARGV[2])
local generation = math.floor(tonumber(redis.call('TIME')[1]) / ttl)
local write = generation - tonumber(ARGV[3]) + 1
if write < 0 or write > 2 then
  return redis.error_reply('ERR the API clock is a generation or more away from Redis')
end
local binaries, field_bytes = ARGV[6], tonumber(ARGV[7])
local width = field_bytes + tonumber(ARGV[8])
if #binaries ~= #events * width then  -- before anything is written
  return redis.error_reply('ERR ingest: ARGV[6] holds ' .. #binaries .. ' bytes for ' ..
    #events .. ' events of ' .. width)
end
-- a bucket lives through its generation and the next, when it is still looked at
local expire_at = (generation + 2) * ttl
local short = tonumber(ARGV[5])
local earliers, digest_bytes = ARGV[9] or '', tonumber(ARGV[8])
-- two base64 digests of one body: prefixes of each other (compared on the shorter length)
local function agrees(a, b)
  local n = math.min(#a, #b)
  return string.sub(a, 1, n) == string.sub(b, 1, n)
end
-- the first generation with fields of a kind only: until now when unset, as the version
-- before may have written the current one until just now
local function since(marker)
  local found = tonumber(redis.call('GET', marker))
  if not found then
    found = generation + 1
    redis.call('SET', marker, found)
  end
  return found
end
local short_since = since(KEYS[1])
local binary_since = since(KEYS[2])
-- the first generation of KEYS[b] (then b + 1, b + 2)
local first = tonumber(ARGV[3]) - 1
local accepted = {}
local touched = {}
for i, e in ipairs(events) do
  local b, long, legacy, inbox, digest = e[1], e[2], e[3], e[4], e[6]
  local at = (i - 1) * width
  local binary = string.sub(binaries, at + 1, at + field_bytes)
  local bits = string.sub(binaries, at + field_bytes + 1, at + width)
  -- the body digest recorded with the id: '' for ids recorded before 0.6 (and 0.4's keys)
  local seen, found_binary = nil, false
  for g = 0, 2 do
    local key = KEYS[b + g]
    if first + g >= binary_since then
      seen = redis.call('HGET', key, binary)
      found_binary = seen and true or false
    else  -- one call for every kind of field the generation may hold
      local got
      if first + g < short_since then
        got = redis.call('HMGET', key, binary, string.sub(long, 1, short), long)
      else
        got = redis.call('HMGET', key, binary, string.sub(long, 1, short))
      end
      found_binary = got[1] and true or false
      seen = got[1] or got[2] or got[3]
    end
    if seen then break end
  end
  if not seen and legacy > 0 and redis.call('EXISTS', KEYS[legacy]) == 1 then seen = '' end
  if seen then
    -- 0: the same event again (a duplicate); 2: another body under a known id (a conflict).
    -- Digests of one body in base64 are prefixes of each other whatever their length (a
    -- version that passes 8 characters beside one that recorded 6): compared on the shorter
    -- one's length; a binary one is compared with the binary digest passed
    local same
    local k, earlier = e[8], e[9]
    if found_binary then
      same = seen == bits or (k ~= nil and
        seen == string.sub(earliers, (k - 1) * digest_bytes + 1, k * digest_bytes))
    else
      same = seen == '' or agrees(seen, digest) or (earlier ~= nil and agrees(seen, earlier))
    end
    accepted[i] = same and 0 or 2
  else
    redis.call('HSET', KEYS[b + write], binary, bits)
    redis.call('EXPIREAT', KEYS[b + write], expire_at)
    redis.call('XADD', KEYS[inbox], '*', 't', e[5], 'r', e[7] or '')
    accepted[i] = 1
    touched[inbox] = true
  end
end
local woken = {}
for inbox, _ in pairs(touched) do
  if redis.call('SET', KEYS[inbox + 1], '1', 'NX', 'PX', ARGV[4]) then
    table.insert(woken, inbox)
  end
end
return {accepted, woken}
