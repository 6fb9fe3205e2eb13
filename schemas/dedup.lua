-- Which events were already taken from another Kafka record?
-- A publisher that retries (or replays a spool) can put the same event_id on the
-- topic twice: two records, two offsets. Each event_id is remembered with the
-- place ("partition:position") that first carried it; reading that same record again
-- (a redelivery, a replayed batch) is not a duplicate. See schemas/dedup.py.
-- Ids are kept in one hash per org and minute of event time, read and written a
-- thousand fields per command: a command per event cost Redis several times more.
-- KEYS: the hashes of the call, all of one org (one hash slot).
-- ARGV: 1 ttl ms, 2 MessagePack [[index in KEYS, [event_id, place, event_id, place, ...]], ...]
-- (one argument: see processors/write.lua; MessagePack: its strings are read by length,
-- not scanned as JSON's are). Pairs in the order of the events: the usual chunk, all new,
-- goes to HSET as it came, with no Lua table built per event.
-- Returns: a string of one character per event, in their order: '1' a duplicate, '0' not.
local ttl = ARGV[1]
-- A hash is made a hash table at its first write: Redis keeps a hash below
-- hash-max-listpack-entries (512) as a listpack, which HMGET and HSET scan end to end for
-- every field; a minute of an org with a few hundred events then cost Redis 2-3 times
-- more per event than in a hash table. A field whose value is longer than
-- hash-max-listpack-value (64 by default) makes a new hash a table; it is deleted at the
-- end, and the hash stays a table (Redis does not turn a table back into a listpack).
local TABLE = 'a value this long makes the hash a hash table: fast lookups (schemas/dedup.lua)'
local fresh = {}
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, '', TABLE)  -- '': no event id (ids are never empty)
    fresh[#fresh + 1] = key
  end
end
local out = {}
for _, g in ipairs(cmsgpack.unpack(ARGV[2])) do
  local key, pairs = KEYS[g[1]], g[2]
  -- in chunks: unpack() is bounded by Lua's C stack
  for c = 1, #pairs, 2000 do
    local last = math.min(c + 1999, #pairs)
    -- the ids and the places: one argument list for both commands (the places' answers are not read)
    local stored = redis.call('HMGET', key, unpack(pairs, c, last))
    local hit = false
    for i = 1, #stored, 2 do
      if stored[i] then
        hit = true
        break
      end
    end
    local n = (last - c + 1) / 2
    -- none stored: all new, unless an id comes twice in the chunk (HSET then adds fewer
    -- fields, having kept the later place: the loop below writes the first one back)
    if hit or redis.call('HSET', key, unpack(pairs, c, last)) ~= n then
      local flags, mine, new = {}, {}, {}  -- mine: id -> place, for ids of this chunk stored now
      for i = c, last, 2 do
        local id, place = pairs[i], pairs[i + 1]
        local first = stored[i - c + 1] or mine[id]
        if first then
          flags[#flags + 1] = (first ~= place) and '1' or '0'
        else
          flags[#flags + 1] = '0'
          mine[id] = place
          new[#new + 1] = id
          new[#new + 1] = place
        end
      end
      if #new > 0 then
        redis.call('HSET', key, unpack(new))
      end
      out[#out + 1] = table.concat(flags)
    else
      out[#out + 1] = string.rep('0', n)
    end
  end
end
for _, key in ipairs(fresh) do
  redis.call('HDEL', key, '')
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ttl)
end
return table.concat(out)
