-- history_page: one snapshot of a shipment's history, for a page of its decisions. Positions
-- count every decision ever appended ('hn'), so a cursor stays valid while new decisions
-- arrive and old ones are trimmed; the caller counts what the elements hold (a chunk holds
-- several, see compact.lua) and cuts the page.
--
-- KEYS[1]: the shipment's state hash
-- KEYS[2]: the shipment's history list
-- Returns {hn, elements}: decisions ever recorded (0 for a shipment recorded before the
--   counter), and every element of the history, oldest first.

return {tonumber(redis.call('HGET', KEYS[1], 'hn') or '0'), redis.call('LRANGE', KEYS[2], 0, -1)}
