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

local allowed = 1
local result = {}
local function check_scope(scope, usage, resv, limits)
  redis.call('ZREMRANGEBYSCORE', resv, '-inf', now - ttl)
  -- Every reservation left is newer than now - ttl: a window reaching that far back holds
  -- them all (one ZCARD, one ZRANGE for the oldest, shared by such windows); only a shorter
  -- one counts its own range.
  local card, oldest_all
  local function count_since(from, exclusive)
    if from <= now - ttl then
      card = card or redis.call('ZCARD', resv)
      return card
    end
    return redis.call('ZCOUNT', resv, (exclusive and '(' or '') .. from, '+inf')
  end
  local function first_since(from)
    if from <= now - ttl then
      oldest_all = oldest_all or redis.call('ZRANGE', resv, 0, 0, 'WITHSCORES')
      return oldest_all
    end
    return redis.call('ZRANGEBYSCORE', resv, '(' .. from, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  end
  local texts = redis.call('HMGET', usage, unpack(fields))
  for w = 1, nw do
    local limit = limits[w]
    if limit and limit >= 0 then
      local win = windows[w]
      local used, oldest = durable(texts[w], win)
      local reset
      if win.sliding then
        used = used + count_since(now - win.len, true)
        -- frees a unit when the oldest counted unit leaves the window
        local first = first_since(now - win.len)
        local from_counts = oldest and (oldest + win.bucket + win.len)
        local from_resv = first[2] and (tonumber(first[2]) + win.len + 1)
        if from_counts and from_resv then reset = math.min(from_counts, from_resv)
        else reset = from_counts or from_resv or (now + win.bucket) end
      else
        local start = now - (now % win.len)
        used = used + count_since(start, false)
        reset = start + win.len
      end
      if used >= limit then allowed = 0 end
      table.insert(result, {scope, win.label, win.len / 1000, limit, used, reset})
    end
  end
end
check_scope('key', K[1], K[3], key_limits)
check_scope('org', K[2], K[4], org_limits)

if allowed == 1 then
  redis.call('ZADD', K[3], now, event_id)
  redis.call('ZADD', K[4], now, event_id)
  redis.call('PEXPIRE', K[3], ttl)
  redis.call('PEXPIRE', K[4], ttl)
end
local out = {allowed == 1 and 'allowed' or 'rate_limited', now, tier, key_id, org_id}
for _, r in ipairs(result) do
  table.insert(out, r[1]); table.insert(out, r[2]); table.insert(out, r[3]); table.insert(out, r[4])
  table.insert(out, r[5] + allowed); table.insert(out, r[6])
end
return out
