-- lock: take or renew a partition's drain lock, only if it is free or already ours.
--
-- KEYS[1]: the lock key ('<inbox>:lock')
-- ARGV[1]: the drain's token
-- ARGV[2]: the lease, ms
-- Returns 1 when taken or renewed, 0 while another token holds it.

local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
