-- unlock: let go of a partition's drain lock, only if it is still ours.
--
-- KEYS[1]: the lock key ('<inbox>:lock')
-- ARGV[1]: the drain's token
-- Returns 1 when released, 0 when another token holds it (or nobody).

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
