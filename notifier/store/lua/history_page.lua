-- history_page: one snapshot of a shipment's history, for a page of its decisions. Positions
-- count every decision ever appended ('hn'), so a cursor stays valid while new decisions
-- arrive and old ones are trimmed; the caller counts what the elements hold (a chunk holds
-- several, see compact.lua) and cuts the page.
--
-- KEYS[1]: the shipment's record (see lib/record.lua)
-- KEYS[2], KEYS[3]: its history and outcome lists from before records
-- Returns {hn, elements}: decisions ever recorded (0 for a shipment recorded before the
--   counter), and every element of the history, oldest first.

local rec = record_load(KEYS[1], KEYS[2], KEYS[3])
return {tonumber(rec.hn ~= '' and rec.hn or '0'), record_list(rec, 'h')}
