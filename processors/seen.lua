-- Which events of a batch were already counted from another Kafka record?
-- A publisher that retries (or replays a spool) can put the same event_id on the
-- topic twice: two records, two offsets. Each event_id is remembered with the
-- place (partition:position) that first carried it; a redelivery of that same
-- record is not a duplicate (the position check of window_counts handles it).
-- ARGV: 1 ttl ms, 2 JSON [[seen key prefix of an org, [event_id, ...], "partition:", [position, ...]], ...]
-- (one argument: see write.lua); positions are decimal strings, the place is "partition:position".
-- Returns: 1 for each duplicate, 0 otherwise, in the order of the events.
local ttl = ARGV[1]
local out = {}
for _, g in ipairs(cjson.decode(ARGV[2])) do
  local prefix, partition, positions = g[1], g[3], g[4]
  for i, id in ipairs(g[2]) do
    local place = partition .. positions[i]
    local first = redis.call('SET', prefix .. id, place, 'NX', 'GET', 'PX', ttl)
    out[#out + 1] = (first and first ~= place) and 1 or 0
  end
end
return out
