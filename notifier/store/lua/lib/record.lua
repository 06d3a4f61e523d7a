-- Shipment records (notifier/store/record.py): a shipment's version, its count of decisions
-- ever recorded, its packed state, its history and its outcome list in one string key,
-- each part a frame '<length>:<bytes>'; the history and the outcome list are runs of such
-- frames, one per element (a decision or a record, or a chunk of them). A part never
-- recorded is empty.
-- Before records a shipment had three keys: a state hash ('v', 's', 'hn'), a history list and
-- an outcome list. record_load reads those as a record, and record_save writes the record
-- in their place.

-- where the frame at 'i' of a blob (n bytes) ends: its colon and length; a frame that does
-- not read (damaged data) raises an error, before the caller writes anything of it: a
-- negative length would loop forever, and a script that loops cannot even be killed
local function frame_at(blob, i, n)
  local colon = string.find(blob, ':', i, true)
  local length = colon and tonumber(string.sub(blob, i, colon - 1))
  if not length or length < 0 or length % 1 ~= 0 or colon + length > n then
    error('damaged record: a frame at byte ' .. i .. ' does not read')
  end
  return colon, length
end

-- the frames of a blob, in order (the first 'limit' only, when given)
local function frames(blob, limit)
  local out, i, n = {}, 1, #blob
  limit = limit or n
  while i <= n and #out < limit do
    local colon, length = frame_at(blob, i, n)
    out[#out + 1] = string.sub(blob, colon + 1, colon + length)
    i = colon + length + 1
  end
  return out
end

-- how many frames a blob holds, and where the one 'back' from the last starts (its first byte
-- after the length; nil when there are fewer), without copying any
local function frame_count(blob, back)
  local count, i, n, starts = 0, 1, #blob, {}
  while i <= n do
    local colon, length = frame_at(blob, i, n)
    count = count + 1
    if back then starts[count % back] = colon + 1 end
    i = colon + length + 1
  end
  if back and count >= back then return count, starts[(count + 1) % back] end
  return count, nil
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
-- counted), s = packed state ('' = none), raw = {h = the history's frames, o = the outcome
-- list's}, list = {h = .., o = ..} once parsed (record_list), legacy = true when it comes
-- from the keys before records, fresh = true when nothing is recorded at all}. The history
-- and the outcome list are parsed only when a script needs their elements: most writes
-- append to them, and a blob takes a frame at its end as it is.
local function record_load(skey, hkey, okey)
  local raw = redis.pcall('GET', skey)
  if type(raw) == 'string' then
    local p = frames(raw, 5)
    return {v = p[1], hn = p[2], s = p[3], raw = {h = p[4], o = p[5]}, list = {}}
  end
  local rec = {v = '', hn = '', s = '', raw = {}, legacy = true}
  if raw then  -- WRONGTYPE: a state hash from before records
    local f = redis.call('HMGET', skey, 'v', 's', 'hn')
    rec.v, rec.s, rec.hn = f[1] or '', f[2] or '', f[3] or ''
  end
  rec.list = {h = redis.call('LRANGE', hkey, 0, -1), o = redis.call('LRANGE', okey, 0, -1)}
  if not raw and #rec.list.h == 0 and #rec.list.o == 0 then
    rec.legacy, rec.fresh = false, true
  end
  return rec
end

-- the elements of a record's history ('h') or outcome list ('o'), oldest first; the caller
-- may change them, and the record is saved with them
local function record_list(rec, part)
  if not rec.list[part] then
    rec.list[part] = frames(rec.raw[part])
    rec.raw[part] = nil
  end
  return rec.list[part]
end

-- a part's bytes, as stored
local function record_part(rec, part)
  return rec.raw[part] or framed(rec.list[part])
end

-- the record as stored
local function record_blob(rec)
  local h, o = record_part(rec, 'h'), record_part(rec, 'o')
  return #rec.v .. ':' .. rec.v .. #rec.hn .. ':' .. rec.hn .. #rec.s .. ':' .. rec.s
    .. #h .. ':' .. h .. #o .. ':' .. o
end

-- write a record: its lifetime is kept; one read from the keys before records replaces them
-- and lives as long as the longest lived of them (without one when one of them had none;
-- a commit then sets the shipment's); a new one lives 'ttl' seconds (nil: no
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

-- append to a part of a record, keeping its latest 'cap' elements; a part not parsed takes
-- the new frame at its end while it has room
local function record_append(rec, part, value, cap)
  local blob = rec.raw[part]
  if blob and (#blob < 2 * cap or frame_count(blob) < cap) then  -- a frame takes 2 bytes or more
    rec.raw[part] = blob .. #value .. ':' .. value
    return
  end
  local elements = record_list(rec, part)
  elements[#elements + 1] = value
  local over = #elements - cap
  if over > 0 then
    for i = 1, #elements - over do elements[i] = elements[i + over] end
    for i = #elements, #elements - over + 1, -1 do elements[i] = nil end
  end
end

-- whether the last 'run' elements of a part are plain values, none a chunk (chunks start
-- with byte 3 and never follow a plain value)
local function record_plain_run(rec, part, run)
  local blob = rec.raw[part]
  if blob then
    local _, at = frame_count(blob, run)
    return at ~= nil and string.byte(blob, at) ~= 3
  end
  local elements = rec.list[part]
  local element = elements[#elements - run + 1]
  return element ~= nil and string.byte(element, 1) ~= 3
end
