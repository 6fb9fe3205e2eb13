-- One batch of the processors' output, atomic (a script runs alone): counts and
-- decisions into usage hashes, and the reservations of counted events released,
-- so a gateway sees a counted event either as a reservation or in the counts,
-- never in both and never in neither.
-- One call per org: every key it touches carries the org's hash tag, so the call
-- stays in one hash slot (one node of a Redis Cluster), which KEYS[1] (the org's
-- usage hash) declares. The org's writes come as one JSON argument (decoded here
-- in C): packing thousands of arguments costs the client more than the script.
--
-- Counts are written whole (each window's buckets), with the place of the last event
-- they include ('applied': "partition:position", zero-padded, so places of one partition
-- compare as strings). Counts of a place before the stored one, on the same partition,
-- are older and are not written: a processor that took a partition over recounts from
-- the changelog's state, behind counts its previous owner wrote before it died, and an
-- owner that stalled past its session writes a batch its successor already counted
-- further. Either would move the counts back, and with the reservations of the events
-- since released, let gateways admit them a second time. Their releases are still done:
-- the newer counts include those events.
-- KEYS: 1 the org's usage hash
-- ARGV: 1 usage ttl ms, 2 JSON [[usage key, reservations key, [field, value, ...], [event id, ...],
--       applied place or ''], ...]
local ttl = ARGV[1]
local writes = cjson.decode(ARGV[2])
local fenced = 0
for _, w in ipairs(writes) do
  local fields, released, applied = w[3], w[4], w[5]
  local write = #fields > 0
  if write and applied ~= '' then
    local stored = redis.call('HGET', w[1], 'applied')
    if stored then
      local sp, so = string.match(stored, '^(%d+):(%d+)$')
      local np, no = string.match(applied, '^(%d+):(%d+)$')
      if sp == np and #so == #no and so > no then
        write = false
        fenced = fenced + 1
      end
    end
    if write then
      fields[#fields + 1] = 'applied'
      fields[#fields + 1] = applied
    end
  end
  if write then
    redis.call('HSET', w[1], unpack(fields))
    redis.call('PEXPIRE', w[1], ttl)
  end
  -- in chunks: unpack() is bounded by Lua's C stack
  for c = 1, #released, 1000 do
    redis.call('ZREM', w[2], unpack(released, c, math.min(c + 999, #released)))
  end
end
return fenced
