-- Shipment records (notifier/store/record.py): a shipment's version, its count of decisions
-- ever recorded, its packed state, its history and its outcome list in one string key,
-- each part a frame '<length>:<bytes>'; the history and the outcome list are runs of such
-- frames, one per element (a decision or a record, or a chunk of them). A part never
-- recorded is empty.
-- Before records a shipment had three keys: a state hash ('v', 's', 'hn'), a history list and
-- an outcome list. record_load reads those as a record, and record_save writes the record
-- in their place.

-- the frames of a blob, in order
local function frames(blob)
  local out, i, n = {}, 1, #blob
  while i <= n do
    local colon = string.find(blob, ':', i, true)
    local length = tonumber(string.sub(blob, i, colon - 1))
    out[#out + 1] = string.sub(blob, colon + 1, colon + length)
    i = colon + length + 1
  end
  return out
end

-- the frames of a list of strings, as one blob
local function framed(list)
  local parts = {}
  for i, x in ipairs(list) do
    parts[2 * i - 1] = #x .. ':'
    parts[2 * i] = x
  end
  return table.concat(parts)
end

-- a shipment's record: {v = version ('' = none), hn = decisions ever recorded ('' = not
-- counted), s = packed state ('' = none), h = history elements, o = outcome elements,
-- legacy = true when it comes from the keys before records, fresh = true when nothing
-- is recorded at all}
local function record_load(skey, hkey, okey)
  local raw = redis.pcall('GET', skey)
  if type(raw) == 'string' then
    local p = frames(raw)
    return {v = p[1], hn = p[2], s = p[3], h = frames(p[4]), o = frames(p[5])}
  end
  local rec = {v = '', hn = '', s = '', legacy = true}
  if raw then  -- WRONGTYPE: a state hash from before records
    local f = redis.call('HMGET', skey, 'v', 's', 'hn')
    rec.v, rec.s, rec.hn = f[1] or '', f[2] or '', f[3] or ''
  end
  rec.h = redis.call('LRANGE', hkey, 0, -1)
  rec.o = redis.call('LRANGE', okey, 0, -1)
  if not raw and #rec.h == 0 and #rec.o == 0 then
    rec.legacy, rec.fresh = false, true
  end
  return rec
end

-- the record as stored
local function record_blob(rec)
  return framed({rec.v, rec.hn, rec.s, framed(rec.h), framed(rec.o)})
end

-- write a record: its lifetime is kept; one read from the keys before records replaces them
-- and lives as long as the longest lived of them; a new one lives 'ttl' seconds (nil: no
-- lifetime yet, the caller sets it)
local function record_save(skey, hkey, okey, rec, ttl)
  if rec.legacy then
    local longest = -2
    for _, key in ipairs({skey, hkey, okey}) do
      local left = redis.call('PTTL', key)
      if left == -1 or (longest ~= -1 and left > longest) then longest = left end
    end
    redis.call('DEL', skey, hkey, okey)
    redis.call('SET', skey, record_blob(rec))
    if longest > 0 then redis.call('PEXPIRE', skey, longest) end
    rec.legacy = false
  elseif rec.fresh and ttl then
    redis.call('SET', skey, record_blob(rec), 'EX', ttl)
    rec.fresh = false
  elseif rec.fresh then
    redis.call('SET', skey, record_blob(rec))
    rec.fresh = false
  else
    redis.call('SET', skey, record_blob(rec), 'KEEPTTL')
  end
end

-- how many values (decisions, records) a list's elements hold: chunks (first byte 3,
-- '\3<count>:...', see notifier/store/chunks.py) hold several
local function values_in(elements)
  local count = 0
  for _, element in ipairs(elements) do
    if string.byte(element, 1) == 3 then
      count = count + tonumber(string.sub(element, 2, string.find(element, ':', 1, true) - 1))
    else
      count = count + 1
    end
  end
  return count
end

-- append to a list of elements, keeping its latest 'cap' elements
local function append_capped(elements, value, cap)
  elements[#elements + 1] = value
  local over = #elements - cap
  if over > 0 then
    for i = 1, #elements - over do elements[i] = elements[i + over] end
    for i = #elements, #elements - over + 1, -1 do elements[i] = nil end
  end
end
