-- Outcome lists (see fold.lua; a part of a shipment's record, see record.lua), for the
-- scripts that read them: each element is a record,
-- '<id>\t<JSON of ledger fields>\t<packed JSON>', or a chunk of records (first byte 3, see
-- notifier/store/chunks.py): '\3<count>:<ids, space-separated>\t<JSON {id: the highest
-- provider status rank recorded}>\t<packed records>'.

-- a chunk's ids (space-separated), and where its JSON of ranks starts
local function chunk_ids(record)
  local from = string.find(record, ':', 1, true) + 1
  local upto = string.find(record, '\t', from, true)
  return string.sub(record, from, upto - 1), upto + 1
end

-- the ids on an outcome list (its elements): notifications settled for good
local function settled_ids(out)
  local ids = {}
  for _, record in ipairs(out) do
    if string.byte(record, 1) == 3 then
      for id in string.gmatch((chunk_ids(record)), '[^ ]+') do ids[id] = true end
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
      local held, ranked = chunk_ids(record)
      if string.find(' ' .. held .. ' ', ' ' .. id .. ' ', 1, true) then
        found = true
        local ranks = cjson.decode(string.sub(record, ranked, string.find(record, '\t', ranked, true) - 1))
        known = {prank = ranks[id]}
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

