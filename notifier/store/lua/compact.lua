-- compact: rewrite a part of a shipment's record (its history, or its outcome records; see
-- lib/record.lua) with its latest run of values as one chunk (one better-compressed element
-- holding several, see notifier/store/chunks.py), and without the oldest elements past the
-- cap. A part is rewritten only while the elements the worker read are still its first ones,
-- byte for byte: values appended since stay after the chunk, and a part trimmed or compacted
-- meanwhile is left for another time.
--
-- KEYS: per part: the shipment's record, and its history and outcome lists of the layout
--   before records
-- ARGV: per part: which one ('h': the history, 'o': the outcome records), the number of
--   elements read n, the number of elements dropped from the head d, the position (0-based)
--   r from which the rest of what was read becomes the chunk, the chunk, then the n elements
--   as read
-- Returns the positions (1-based) of the parts rewritten.

local done = {}
local a = 1
for i = 1, #KEYS / 3 do
  local skey, hkey, okey = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local part, n, dropped, from, chunk =
    ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4]
  local rec = record_load(skey, hkey, okey)
  local read = record_list(rec, part)
  local same = #read >= n
  for j = 1, n do
    if not same then break end
    same = read[j] == ARGV[a + 4 + j]
  end
  a = a + 5 + n
  if same and not rec.fresh then
    local kept = {}
    for j = dropped + 1, from do kept[#kept + 1] = read[j] end
    kept[#kept + 1] = chunk
    for j = n + 1, #read do kept[#kept + 1] = read[j] end
    rec.list[part] = kept
    record_save(skey, hkey, okey, rec, nil)
    table.insert(done, i)
  end
end
return done
