-- read_records: shipments' records (see lib/record.lua) as stored since records, also for
-- shipments still in the layout before (read as they are, not rewritten).
--
-- KEYS: per shipment: its record, and its history and outcome lists from before records
-- ARGV[1]: 'state' (the history and the outcome list left out) or 'all'
-- Returns per shipment its record's bytes ('' when nothing is recorded).

local whole = ARGV[1] == 'all'
local out = {}
for i = 1, #KEYS / 3 do
  local skey = KEYS[3 * i - 2]
  local raw = redis.pcall('GET', skey)
  if type(raw) == 'string' then
    if whole then
      out[i] = raw
    else
      local p = frames(raw, 3)
      out[i] = framed({p[1], p[2], p[3], '', ''})
    end
  else
    local rec = record_load(skey, KEYS[3 * i - 1], KEYS[3 * i])
    if rec.fresh then
      out[i] = ''
    else
      if not whole then rec.raw, rec.list = {h = '', o = ''}, {} end
      out[i] = record_blob(rec)
    end
  end
end
return out
