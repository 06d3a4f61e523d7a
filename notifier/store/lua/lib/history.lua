-- Histories (see notifier/store/chunks.py), for the scripts that count them: each element is
-- one decision, or a chunk of them (first byte 3): '\3<count>:<packed decisions>'.

-- how many decisions a history holds
local function decisions_in(history)
  local count = 0
  for _, element in ipairs(redis.call('LRANGE', history, 0, -1)) do
    if string.byte(element, 1) == 3 then
      count = count + tonumber(string.sub(element, 2, string.find(element, ':', 1, true) - 1))
    else
      count = count + 1
    end
  end
  return count
end

