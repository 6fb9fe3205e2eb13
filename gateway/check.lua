-- One gateway check, atomic in Redis: may this request go on now?
--
-- The gateway sends this file after a prelude it writes from its policy (gateway/limiter.py
-- policy_script), which defines POLICY: the reservation ttl (ms), the default tier, the
-- windows (label, len, bucket ms, sliding) and the limits per tier (-1: unlimited); and
-- ORG_KEYS(org_id, key_id), the names of an org's six keys (the layout of
-- schemas/redis_keys.py, written out as one concatenation per name). A policy is thus one
-- script, cached by Redis under its SHA: nothing of it is sent or parsed per call, and a
-- changed policy is another SHA.
--
-- Two modes, named by ARGV[2]:
--   'key': the caller presented an API key. Its record is looked up by the key's HMAC (one
--          candidate per configured hash secret, KEYS), then its state, its expiry (by this
--          Redis's clock) and the required scope are checked; a key that passes is rate-limited
--          as the key id and org its record names. The org's keys are named here from the
--          record's ids (ORG_KEYS, the layout of schemas/redis_keys.py): they
--          share the record's hash slot, so the whole call stays in one slot, as Redis
--          Cluster requires. That a record's org is of its slot hint's slot is checked once,
--          where records are made and written (schemas/key_records.problem_of), not here on
--          every call; a Redis Cluster refuses a call that would leave the slot anyway.
--   'ids': the caller names the key id and the org (trusted mode: an auth layer in front
--          verified the caller); KEYS are that org's six keys.
-- Then: admits when, in every limited window of the key and of its org, the counts the
-- processors wrote plus the reservations of requests not yet counted stay under the limit,
-- and reserves one unit (the request's event_id) in both scopes.
--
-- KEYS 'key': the candidate records (redis_keys.api_key_record, one per secret), all in one slot
--      'ids': 1 key usage, 2 org usage, 3 key reservations, 4 org reservations, 5 org (tier),
--             6 key overrides: all of one org, in its hash slot.
--      The emergency switch (one key for all orgs) is read beside this call, in the same
--      pipeline, and applied by the gateway (gateway/limiter.py).
-- ARGV: 1 event_id, 2 the mode: 'ids'; or 'key', then 3 the required scope ('' for none)
-- Returns: {outcome, now_ms, tier, key id, org id, then per limited window:
--           scope, label, length s, limit, used (including this request if admitted), reset ms}
--   outcome 'allowed' or 'rate_limited'; or, with nothing after the ids, 'unknown_key',
--   'revoked_key', 'expired_key', 'insufficient_scope', 'bad_record' (a record naming an id
--   that breaks the id rule: refused, never used to build a key name)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local event_id = ARGV[1]
local ttl, default_tier, windows, tiers = POLICY.ttl, POLICY.default_tier, POLICY.windows, POLICY.tiers
local nw = #windows
local fields = POLICY.fields

-- The id rule of schemas/ids.py: what may go between the braces of a hash tag (1 to 64 characters).
local ID = '^[A-Za-z0-9][A-Za-z0-9_.:%-]*$'

local K = KEYS
local key_id, org_id = '', ''
local record_limits  -- the key's own limits (its record), when it has any
if ARGV[2] == 'key' then
  local rec
  for k = 1, #KEYS do
    local r = redis.call('HMGET', KEYS[k], 'key_id', 'org_id', 'state', 'expires_ms', 'scopes', 'limits')
    if r[1] then rec = r; break end
  end
  if not rec then return {'unknown_key', now, '', '', ''} end
  key_id, org_id = rec[1], rec[2]  -- key_id a string (found), org_id false when missing
  if not (org_id and #key_id <= 64 and #org_id <= 64 and string.find(key_id, ID) and string.find(org_id, ID)) then
    return {'bad_record', now, '', '', ''}
  end
  -- any state but active refuses: 'expired' as expired, anything else as revoked
  if rec[3] ~= 'active' then
    return {rec[3] == 'expired' and 'expired_key' or 'revoked_key', now, '', key_id, org_id}
  end
  local expires = rec[4]
  if expires and expires ~= '' then
    expires = tonumber(expires)
    -- expired from expires_ms on (KeyRecord.state_at), by this server's clock: every gateway alike
    if not expires or now >= expires then return {'expired_key', now, '', key_id, org_id} end
  end
  local scope = ARGV[3]
  if scope ~= '' then
    local has = false
    for s in string.gmatch(rec[5] or '', '%S+') do
      if s == scope then has = true; break end
    end
    if not has then return {'insufficient_scope', now, '', key_id, org_id} end
  end
  local limits = rec[6]
  if limits and limits ~= '' then  -- most keys have none: no table, no pattern
    record_limits = {}
    for label, limit in string.gmatch(limits, '([^,=]+)=(%d+)') do record_limits[label] = tonumber(limit) end
  end
  K = ORG_KEYS(org_id, key_id)
end

local tier = redis.call('HGET', K[5], 'tier')
if not tier or not tiers[tier] then tier = default_tier end
local org_limits = tiers[tier]
local key_limits = {}
local overrides = {}
local raw = redis.call('HGETALL', K[6])
for j = 1, #raw, 2 do overrides[raw[j]] = tonumber(raw[j + 1]) end
for w = 1, nw do
  local limit = overrides[windows[w].label] or org_limits[w]
  -- a key's own limit (its record) only ever lowers what it would have
  local own = record_limits and record_limits[windows[w].label]
  if own and (limit < 0 or own < limit) then limit = own end
  key_limits[w] = limit
end

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

-- Reservations of requests not yet counted: only those of the last ttl count (an older one's
-- event never came). They are trimmed when one is added, not on every check: the trim changes
-- no count (each count below starts after now - ttl), it only bounds the set, which only an
-- admission grows. A count is monotone in where it starts: once a range holds none, no range
-- inside it is asked (windows are counted longest first, then reported in their order); the
-- processors release reservations as they count their events, so most sets hold none or few.
local live_from = now - ttl  -- exclusive

local allowed = 1
local out = {'', now, tier, key_id, org_id}
local used_at = {}  -- where out holds each window's used: this request is added once admitted
local function check_scope(scope, usage, resv, limits)
  local live_count  -- every live reservation: windows reaching past the ttl share it
  local empty_from, empty_excl  -- a range (from, +inf) or [from, +inf) known to hold none
  local function count_since(from, exclusive)
    if from <= live_from then from, exclusive = live_from, true end
    if empty_from and (from > empty_from or (from == empty_from and (exclusive or not empty_excl))) then
      return 0
    end
    local n
    if from == live_from then
      live_count = live_count or redis.call('ZCOUNT', resv, '(' .. live_from, '+inf')
      n = live_count
    else
      n = redis.call('ZCOUNT', resv, (exclusive and '(' or '') .. from, '+inf')
    end
    if n == 0 and (not empty_from or from < empty_from) then empty_from, empty_excl = from, exclusive end
    return n
  end
  local function first_after(from)  -- the oldest live reservation's score after from (when any)
    if from < live_from then from = live_from end
    local first = redis.call('ZRANGEBYSCORE', resv, '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    return first[2] and tonumber(first[2])
  end
  local resv_n, resv_first = {}, {}
  for w = nw, 1, -1 do
    local limit = limits[w]
    if limit and limit >= 0 then
      local win = windows[w]
      if win.sliding then
        resv_n[w] = count_since(now - win.len, true)
        -- frees a unit when the oldest counted unit leaves the window
        if resv_n[w] > 0 then resv_first[w] = first_after(now - win.len) end
      else
        resv_n[w] = count_since(now - (now % win.len), false)
      end
    end
  end
  local texts = redis.call('HMGET', usage, unpack(fields))
  for w = 1, nw do
    local limit = limits[w]
    if limit and limit >= 0 then
      local win = windows[w]
      local used, oldest = durable(texts[w], win)
      used = used + resv_n[w]
      local reset
      if win.sliding then
        local from_counts = oldest and (oldest + win.bucket + win.len)
        local from_resv = resv_first[w] and (resv_first[w] + win.len + 1)
        if from_counts and from_resv then reset = math.min(from_counts, from_resv)
        else reset = from_counts or from_resv or (now + win.bucket) end
      else
        reset = now - (now % win.len) + win.len
      end
      if used >= limit then allowed = 0 end
      local n = #out
      out[n + 1], out[n + 2], out[n + 3], out[n + 4], out[n + 5], out[n + 6] =
        scope, win.label, win.len / 1000, limit, used, reset
      used_at[#used_at + 1] = n + 5
    end
  end
end
check_scope('key', K[1], K[3], key_limits)
check_scope('org', K[2], K[4], org_limits)

if allowed == 1 then
  redis.call('ZREMRANGEBYSCORE', K[3], '-inf', live_from)
  redis.call('ZREMRANGEBYSCORE', K[4], '-inf', live_from)
  redis.call('ZADD', K[3], now, event_id)
  redis.call('ZADD', K[4], now, event_id)
  redis.call('PEXPIRE', K[3], ttl)
  redis.call('PEXPIRE', K[4], ttl)
  for _, i in ipairs(used_at) do out[i] = out[i] + 1 end
  out[1] = 'allowed'
else
  out[1] = 'rate_limited'
end
return out
