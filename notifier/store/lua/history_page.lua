-- history_page: one snapshot of a page of a shipment's decisions. Positions count every
-- decision ever appended ('hn'), so a cursor stays valid while new decisions arrive and old
-- ones are trimmed. (Shipments recorded before 'hn' existed count from what is kept.)
--
-- KEYS[1]: the shipment's state hash
-- KEYS[2]: the shipment's history list
-- ARGV[1]: the first position wanted (below the oldest kept, e.g. -1: the oldest kept)
-- ARGV[2]: the most entries wanted
-- Returns {total, first, start, rows}: decisions ever recorded, the position of the oldest
--   kept, the position of the first row, and the rows.

local total = tonumber(redis.call('HGET', KEYS[1], 'hn') or '0')
local kept = redis.call('LLEN', KEYS[2])
if total < kept then total = kept end
local first = total - kept
local start = tonumber(ARGV[1])
if start < first then start = first end
local rows = redis.call('LRANGE', KEYS[2], start - first, start - first + tonumber(ARGV[2]) - 1)
return {total, first, start, rows}
