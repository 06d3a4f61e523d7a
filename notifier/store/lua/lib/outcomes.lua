-- Outcome lists (see fold.lua; a part of a shipment's record, see record.lua), for the
-- scripts that read them: each element is a record,
-- '<id>\t<JSON of ledger fields>\t<packed JSON>', or a chunk of records (first byte 3, see
-- notifier/store/chunks.py and merge_outcomes in notifier/store/ledger.py), either
-- '\3<count>:<ids, space-separated>\t<JSON {id: the highest provider status rank
-- recorded}>\t<packed records>', or, when every id is one notifier makes ('n_' and 32 hex
-- digits), '\3<count>:\0<ids>:<each id's 32 digits as 16 bytes><JSON {position of an id,
-- from 1: its highest rank}>\t<packed records>'.

-- a chunk's ids, in order, where its JSON of ranks starts, and whether that JSON names an
-- id by its position (the chunk's ids are packed) rather than in full
local function chunk_ids(record)
  local from = string.find(record, ':', 1, true) + 1
  local ids = {}
  if string.byte(record, from) == 0 then
    local colon = string.find(record, ':', from + 1, true)
    local at = colon + 1
    for i = 1, tonumber(string.sub(record, from + 1, colon - 1)) do
      ids[i] = 'n_' .. string.format(string.rep('%02x', 16), string.byte(record, at, at + 15))
      at = at + 16
    end
    return ids, at, true
  end
  local upto = string.find(record, '\t', from, true)
  for id in string.gmatch(string.sub(record, from, upto - 1), '[^ ]+') do ids[#ids + 1] = id end
  return ids, upto + 1, false
end

-- the ids on an outcome list (its elements): notifications settled for good
local function settled_ids(out)
  local ids = {}
  for _, record in ipairs(out) do
    if string.byte(record, 1) == 3 then
      for _, id in ipairs((chunk_ids(record))) do ids[id] = true end
    else
      ids[string.sub(record, 1, string.find(record, '\t', 1, true) - 1)] = true
    end
  end
  return ids
end

-- whether a notification is on an outcome list (its elements), and the highest provider
-- status rank recorded for it (-1: none)
local function outcome_rank(out, id)
  local found, rank = false, -1
  local prefix = id .. '\t'
  for _, record in ipairs(out) do
    local known = nil
    if string.byte(record, 1) == 3 then
      local held, ranked, positional = chunk_ids(record)
      for i, each in ipairs(held) do
        if each == id then
          found = true
          local ranks = cjson.decode(string.sub(record, ranked, string.find(record, '\t', ranked, true) - 1))
          known = {prank = ranks[positional and tostring(i) or id]}
          break
        end
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
