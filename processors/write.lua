-- One batch of the processors' output, atomic (a script runs alone): counts and
-- decisions into usage hashes, and the reservations of counted events released,
-- so a gateway sees a counted event either as a reservation or in the counts,
-- never in both and never in neither.
-- One call per org: every key it touches carries the org's hash tag, so the call
-- stays in one hash slot (one node of a Redis Cluster), which KEYS[1] (the org's
-- usage hash) declares. The org's writes come as one JSON argument (decoded here
-- in C): packing thousands of arguments costs the client more than the script.
-- KEYS: 1 the org's usage hash
-- ARGV: 1 usage ttl ms, 2 JSON [[usage key, reservations key, [field, value, ...], [event id, ...]], ...]
local ttl = ARGV[1]
local writes = cjson.decode(ARGV[2])
for _, w in ipairs(writes) do
  local fields, released = w[3], w[4]
  if #fields > 0 then
    redis.call('HSET', w[1], unpack(fields))
    redis.call('PEXPIRE', w[1], ttl)
  end
  -- in chunks: unpack() is bounded by Lua's C stack
  for c = 1, #released, 1000 do
    redis.call('ZREM', w[2], unpack(released, c, math.min(c + 999, #released)))
  end
end
return #writes
