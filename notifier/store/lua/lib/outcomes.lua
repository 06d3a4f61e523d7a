-- Outcome lists (see fold.lua; a part of a shipment's record, see record.lua), for the
-- scripts that read them: each element is a record,
-- '<id>\t<JSON of ledger fields>\t<packed JSON>', or a chunk of records (first byte 3, see
-- notifier/store/chunks.py and merge_outcomes in notifier/store/ledger.py), either
-- '\3<count>:<ids, space-separated>\t<JSON {id: the highest provider status rank
-- recorded}>\t<packed records>', or, when every id is one notifier makes ('n_' and 32 hex
-- digits), '\3<count>:\0<number of ids>:<each id's 32 digits as 16 bytes><JSON {position of
-- an id, from 1: its highest rank}>\t<packed records>'. Ids are read by their place, never
-- by searching for a separator: their bytes may be any.

-- how a chunk keeps its ids: packed (true), where the first id's 16 bytes start and how many
-- ids there are; or in full (false), where its space-separated ids start and the tab after
local function chunk_head(record)
  local from = string.find(record, ':', 1, true) + 1
  if string.byte(record, from) == 0 then
    local colon = string.find(record, ':', from + 1, true)
    return true, colon + 1, tonumber(string.sub(record, from + 1, colon - 1))
  end
  return false, from, string.find(record, '\t', from, true)
end

-- a chunk's ids, in order
local function chunk_ids(record)
  local packed, at, n = chunk_head(record)
  local ids = {}
  if packed then
    for i = 1, n do
      ids[i] = 'n_' .. string.format(string.rep('%02x', 16), string.byte(record, at, at + 15))
      at = at + 16
    end
  else
    for id in string.gmatch(string.sub(record, at, n - 1), '[^ ]+') do ids[#ids + 1] = id end
  end
  return ids
end

-- the ids on an outcome list (its elements): notifications settled for good
local function settled_ids(out)
  local ids = {}
  for _, record in ipairs(out) do
    if string.byte(record, 1) == 3 then
      for _, id in ipairs(chunk_ids(record)) do ids[id] = true end
    else
      ids[string.sub(record, 1, string.find(record, '\t', 1, true) - 1)] = true
    end
  end
  return ids
end

-- the 16 bytes a packed chunk keeps of an id ('n_' and 32 hex digits), nil for any other id
local function packed_id(id)
  if #id ~= 34 or string.sub(id, 1, 2) ~= 'n_' or string.find(id, '[^0-9a-f]', 3) then
    return nil
  end
  return (string.gsub(string.sub(id, 3), '..', function(h) return string.char(tonumber(h, 16)) end))
end

-- where an id is in a chunk: its position (from 1) and where the chunk's JSON of ranks
-- starts, and whether that JSON names ids by position; nil when it is not there. A packed
-- chunk is searched by the id's 16 bytes (nil: the id cannot be in one)
local function chunk_position(record, id, bytes)
  local packed, at, n = chunk_head(record)
  if not packed then
    if string.find(' ' .. string.sub(record, at, n - 1) .. ' ', ' ' .. id .. ' ', 1, true) then
      return 0, n + 1, false
    end
    return nil
  end
  for i = 1, bytes and n or 0 do
    if string.sub(record, at + 16 * (i - 1), at + 16 * i - 1) == bytes then
      return i, at + 16 * n, true
    end
  end
  return nil
end

-- whether a notification is on an outcome list (its elements), and the highest provider
-- status rank recorded for it (-1: none)
local function outcome_rank(out, id)
  local found, rank = false, -1
  local prefix = id .. '\t'
  local bytes = packed_id(id)
  for _, record in ipairs(out) do
    local known = nil
    if string.byte(record, 1) == 3 then
      local position, ranked, positional = chunk_position(record, id, bytes)
      if position then
        found = true
        local ranks = cjson.decode(string.sub(record, ranked, string.find(record, '\t', ranked, true) - 1))
        known = {prank = ranks[positional and tostring(position) or id]}
      end
    elseif string.sub(record, 1, #prefix) == prefix then
      found = true
      known = cjson.decode(string.sub(record, #prefix + 1, string.find(record, '\t', #prefix + 1, true) - 1))
    end
    if known and known['prank'] and tonumber(known['prank']) > rank then
      rank = tonumber(known['prank'])
    end
  end
  return found, rank
end
