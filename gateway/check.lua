-- One gateway check, atomic in Redis: may this API key make a request now?
-- Admits when, in every limited window of the key and of its org, the counts the
-- processors wrote plus the reservations of requests not yet counted stay under
-- the limit; then reserves one unit (the request's event_id) in both scopes.
--
-- KEYS: 1 key usage, 2 org usage, 3 key reservations, 4 org reservations,
--       5 org (tier), 6 key overrides: all of one org, in its hash slot. The
--       emergency switch (one key for all orgs) is read beside this call, in the
--       same pipeline, and applied by the gateway (gateway/limiter.py).
-- ARGV: 1 event_id, 2 reservation ttl ms, 3 default tier, 4 window count n,
--       then n x (label, length ms, bucket ms, sliding 0|1),
--       then tier count, then per tier: name and n limits (-1: unlimited)
-- Returns: {allowed, now_ms, tier, then per limited window:
--           scope, label, length s, limit, used (including this request if admitted), reset ms}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local event_id, ttl, default_tier = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local nw = tonumber(ARGV[4])
local windows, fields = {}, {}
local i = 5
for w = 1, nw do
  windows[w] = {label = ARGV[i], len = tonumber(ARGV[i + 1]), bucket = tonumber(ARGV[i + 2]), sliding = ARGV[i + 3] == '1'}
  fields[w] = 'w:' .. ARGV[i]
  i = i + 4
end
local tiers = {}
for _ = 1, tonumber(ARGV[i]) do
  local limits = {}
  for w = 1, nw do limits[w] = tonumber(ARGV[i + 1 + w]) end
  tiers[ARGV[i + 1]] = limits
  i = i + 1 + nw
end

local tier = redis.call('HGET', KEYS[5], 'tier')
if not tier or not tiers[tier] then tier = default_tier end
local org_limits = tiers[tier]
local key_limits = {}
local overrides = {}
local raw = redis.call('HGETALL', KEYS[6])
for j = 1, #raw, 2 do overrides[raw[j]] = tonumber(raw[j + 1]) end
for w = 1, nw do key_limits[w] = overrides[windows[w].label] or org_limits[w] end

-- Counts of a window from the processor's buckets: a fixed window its current
-- bucket; a sliding one every bucket overlapping (now - length, now].
local function durable(text, win)
  local total, oldest = 0, nil
  if text then
    local current = now - (now % win.len)
    for s, c in string.gmatch(text, '(%d+):(%d+)') do
      s, c = tonumber(s), tonumber(c)
      if win.sliding then
        if s + win.bucket > now - win.len and c > 0 then
          total = total + c
          if not oldest or s < oldest then oldest = s end
        end
      elseif s == current then
        total = total + c
      end
    end
  end
  return total, oldest
end

local allowed = 1
local result = {}
local function check_scope(scope, usage, resv, limits)
  redis.call('ZREMRANGEBYSCORE', resv, '-inf', now - ttl)
  local texts = redis.call('HMGET', usage, unpack(fields))
  for w = 1, nw do
    local limit = limits[w]
    if limit and limit >= 0 then
      local win = windows[w]
      local used, oldest = durable(texts[w], win)
      local reset
      if win.sliding then
        used = used + redis.call('ZCOUNT', resv, '(' .. (now - win.len), '+inf')
        -- frees a unit when the oldest counted unit leaves the window
        local first = redis.call('ZRANGEBYSCORE', resv, '(' .. (now - win.len), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        local from_counts = oldest and (oldest + win.bucket + win.len)
        local from_resv = first[2] and (tonumber(first[2]) + win.len + 1)
        if from_counts and from_resv then reset = math.min(from_counts, from_resv)
        else reset = from_counts or from_resv or (now + win.bucket) end
      else
        local start = now - (now % win.len)
        used = used + redis.call('ZCOUNT', resv, start, '+inf')
        reset = start + win.len
      end
      if used >= limit then allowed = 0 end
      table.insert(result, {scope, win.label, win.len / 1000, limit, used, reset})
    end
  end
end
check_scope('key', KEYS[1], KEYS[3], key_limits)
check_scope('org', KEYS[2], KEYS[4], org_limits)

if allowed == 1 then
  redis.call('ZADD', KEYS[3], now, event_id)
  redis.call('ZADD', KEYS[4], now, event_id)
  redis.call('PEXPIRE', KEYS[3], ttl)
  redis.call('PEXPIRE', KEYS[4], ttl)
end
local out = {allowed, now, tier}
for _, r in ipairs(result) do
  table.insert(out, r[1]); table.insert(out, r[2]); table.insert(out, r[3]); table.insert(out, r[4])
  table.insert(out, r[5] + allowed); table.insert(out, r[6])
end
return out
