-- Which events were already taken from another Kafka record?
-- A publisher that retries (or replays a spool) can put the same event_id on the
-- topic twice: two records, two offsets. Each event_id is remembered with the
-- place (partition:position) that first carried it; reading that same record again
-- (a redelivery, a replayed batch) is not a duplicate. See schemas/dedup.py.
-- Ids are kept in one hash per org and minute of event time, read and written a
-- thousand fields per command: a command per event cost Redis several times more.
-- KEYS: the hashes of the call, all of one org (one hash slot).
-- ARGV: 1 ttl ms, 2 JSON [[index in KEYS, "partition:", [event_id, ...], [position, ...]], ...]
-- (one argument: see processors/write.lua); positions are decimal strings.
-- Returns: 1 for each duplicate, 0 otherwise, in the order of the events.
local ttl = ARGV[1]
local out = {}
local placed = {}  -- hash -> id -> place, for ids this call stores (a copy may follow in the same call)
for _, g in ipairs(cjson.decode(ARGV[2])) do
  local key, partition, ids, positions = KEYS[g[1]], g[2], g[3], g[4]
  placed[key] = placed[key] or {}
  local mine = placed[key]
  -- in chunks: unpack() is bounded by Lua's C stack
  for c = 1, #ids, 1000 do
    local last = math.min(c + 999, #ids)
    local stored = redis.call('HMGET', key, unpack(ids, c, last))
    local new = {}
    for i = c, last do
      local place = partition .. positions[i]
      local first = stored[i - c + 1] or mine[ids[i]]
      if first then
        out[#out + 1] = (first ~= place) and 1 or 0
      else
        out[#out + 1] = 0
        mine[ids[i]] = place
        new[#new + 1] = ids[i]
        new[#new + 1] = place
      end
    end
    if #new > 0 then
      redis.call('HSET', key, unpack(new))
    end
  end
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ttl)
end
return out
