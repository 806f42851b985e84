-- Per-entity rolling windows: store one event and/or return the window aggregates, atomically.
-- offline.py implements the same semantics in Python; change both together.
--
-- The store prepends the spec's constants (store.py, script_source): LATE_TOLERANCE, MAX_EVENTS, TTL_MS,
-- N_DISTINCT, ASCENDING = window lengths, shortest first, SLOT = config position of each of them,
-- AMOUNT_STD (the amount has std), N_ATTR (windowed numeric attributes), ATTR_STD[b] (attribute b has std).
--
-- KEYS[1]  sorted set  member "event_id,ts,amount,token_1,...,token_n,value_1,...,value_m", score = ts:
--          a digest per distinct attribute, then each windowed attribute's number as exact text, "-" when
--          it has none. Ids hold no comma and ',' sorts below every id character, so equal times are
--          ordered by event_id bytes.
-- KEYS[2]  hash        event_id -> "" (the dedupe index), plus "#max" -> latest event time stored
-- ARGV[1]  update: the event's member (above); read: a time (no comma)
-- Returns  one string "flag,seconds_since_last,count_1,sum_1,max_1,...,distinct_a_i,...,m2_i,...,
--          count_b_i,sum_b_i,max_b_i[,m2_b_i],...": flag 0 stored (or read), 1 duplicate, 2 too late; then
--          (count, sum, max) of the amount per window, the distinct count of each attribute a over each
--          window i, with AMOUNT_STD the amount's sum of squared deviations (M2) per window, then per
--          windowed attribute b and window i its (count, sum, max[, M2]) over the events that have it
--          (FeatureSpec.raw_layout). Numbers go back as exact text ("%.17g", or a value's own text): Redis
--          would truncate Lua floats to integers, and one bulk string parses far faster than an array.
--
-- M2 uses Welford's update, newest event first: d = x - mean; mean = mean + d / n; m2 = m2 + d * (x - mean).
-- offline.py does the same operations in the same order, so both give the same bits; FeatureSpec.assemble
-- turns M2 into sqrt(M2 / n).
--
-- Cost: O(events in the entity's largest window), at most MAX_EVENTS; every event is re-aggregated (exact,
-- no float drift from subtracting). In Redis' Lua, number <-> text conversions dominate, hence the reuse.

local zkey, hkey = KEYS[1], KEYS[2]
local EXTRA = AMOUNT_STD or N_ATTR > 0
local nw = #ASCENDING
local largest = ASCENDING[nw]
local format, find, sub = string.format, string.find, string.sub
local arg = ARGV[1]
local c1 = find(arg, ',', 1, true)
local t_text = c1 and sub(arg, c1 + 1, find(arg, ',', c1 + 1, true) - 1) or arg
local t = tonumber(t_text)

local function fmt(x)
  if x == 0 then return '0' end
  return format('%.17g', x)
end

local function fmt_int(x)
  if x == 0 then return '0' end
  return format('%d', x)
end

local function event_id(member)
  return sub(member, 1, find(member, ',', 1, true) - 1)
end

local function event_time(member)
  local a = find(member, ',', 1, true)
  return tonumber(sub(member, a + 1, find(member, ',', a + 1, true) - 1))
end

-- Remove the n oldest events from both keys; HDEL in chunks, as unpack() is limited by Lua's C stack.
local function drop_oldest(members, n)
  redis.call('ZREMRANGEBYRANK', zkey, 0, n - 1)
  local ids = {}
  for k = 1, n do ids[k] = event_id(members[k]) end
  for from = 1, n, 1000 do
    redis.call('HDEL', hkey, unpack(ids, from, math.min(from + 999, n)))
  end
end

-- Aggregates at time t over stored events with t - w < ts <= t. members: stored events in ascending order,
-- none after t (default: those of the largest window); self_id is skipped for seconds_since_last.
local function features(flag, self_id, members, first)
  if not members then
    members = redis.call('ZRANGEBYSCORE', zkey, '(' .. fmt(t - largest), fmt(t))
    first = 1
  end
  -- Output text per config slot. Formatting dominates the cost, so equal values reuse their text and the
  -- max (and a one-event sum) reuse the value's own text from the member, which is exact.
  local count, total, maxv, dcount = {}, {}, {}, {}
  local spread = AMOUNT_STD and {}
  for a = 1, N_DISTINCT do dcount[a] = {} end
  local since = nil

  -- Newest first, with running totals: windows are nested, so when an event falls out of the smallest
  -- open window that window's totals are final. The first occurrence of a value is its newest, which lies
  -- in a window exactly when any occurrence does. The first other event gives seconds_since_last.
  local n, sum, top, top_text, first_text, mean, m2 = 0, 0, 0, '0', '0', 0, 0
  local seen, distinct = {}, {}
  for a = 1, N_DISTINCT do seen[a], distinct[a] = {}, 0 end
  -- Per windowed attribute: count, sum, max (and its text), the first value's text, Welford mean and M2,
  -- output text per slot. Allocated only when there are some: tables cost on every call.
  local an, asum, atop, atop_text, afirst, amean, am2, snap_an, snap_atext, aout
  if N_ATTR > 0 then
    an, asum, atop, atop_text, afirst, amean, am2, snap_an, snap_atext, aout = {}, {}, {}, {}, {}, {}, {}, {}, {}, {}
    for b = 1, N_ATTR do
      an[b], asum[b], amean[b], am2[b], aout[b] = 0, 0, 0, 0, {}
    end
  end
  local snap_n, snap_count, snap_sum, snap_m2_n, snap_m2 = -1, nil, nil, -1, nil
  local snap_d, snap_dtext = {}, {}

  -- Std and attribute windows at a window's end; a closure of its own, made only when the spec has them,
  -- so the default spec's snapshot (closed over on every call) stays as small as it was.
  local snapshot_extra = EXTRA and function(slot)
    if AMOUNT_STD then
      if n ~= snap_m2_n then snap_m2_n, snap_m2 = n, fmt(m2) end
      spread[slot] = snap_m2
    end
    for b = 1, N_ATTR do
      local k = an[b]
      if k ~= snap_an[b] then
        local text
        if k == 0 then
          text = ATTR_STD[b] and '0,0,0,0' or '0,0,0'
        else
          text = fmt_int(k) .. ',' .. ((k == 1) and afirst[b] or fmt(asum[b])) .. ',' .. atop_text[b]
          if ATTR_STD[b] then text = text .. ',' .. fmt(am2[b]) end
        end
        snap_an[b], snap_atext[b] = k, text
      end
      aout[b][slot] = snap_atext[b]
    end
  end

  local function snapshot(w)
    if n ~= snap_n then
      snap_n, snap_count = n, fmt_int(n)
      snap_sum = (n == 1) and first_text or fmt(sum)
    end
    local slot = SLOT[w]
    count[slot], total[slot], maxv[slot] = snap_count, snap_sum, top_text
    for a = 1, N_DISTINCT do
      if distinct[a] ~= snap_d[a] then snap_d[a], snap_dtext[a] = distinct[a], fmt_int(distinct[a]) end
      dcount[a][slot] = snap_dtext[a]
    end
    if EXTRA then snapshot_extra(slot) end
  end

  local w, cut = 1, t - ASCENDING[1]
  for k = #members, first, -1 do
    local m = members[k]
    local c1 = find(m, ',', 1, true)
    local c2 = find(m, ',', c1 + 1, true)
    local ts = tonumber(sub(m, c1 + 1, c2 - 1))
    while ts <= cut and w <= nw do
      snapshot(w)
      w = w + 1
      cut = (w <= nw) and t - ASCENDING[w] or cut
    end
    if w > nw then break end
    if not since and sub(m, 1, c1 - 1) ~= self_id then since = fmt(t - ts) end
    local c3 = find(m, ',', c2 + 1, true)
    local amount_text = sub(m, c2 + 1, (c3 or 0) - 1)
    local amount = tonumber(amount_text)
    n = n + 1
    sum = sum + amount
    if n == 1 then first_text = amount_text end
    if amount > top then top, top_text = amount, amount_text end
    for a = 1, N_DISTINCT do
      local c4 = find(m, ',', c3 + 1, true)
      local v = sub(m, c3 + 1, (c4 or 0) - 1)
      c3 = c4
      if v ~= '-' and not seen[a][v] then
        seen[a][v] = true
        distinct[a] = distinct[a] + 1
      end
    end
    if EXTRA then  -- one test per event when the spec has neither std nor attribute windows
      if AMOUNT_STD then
        local d = amount - mean
        mean = mean + d / n
        m2 = m2 + d * (amount - mean)
      end
      for b = 1, N_ATTR do
        if not c3 then break end  -- stored under a spec without these values: they contribute nothing
        local c4 = find(m, ',', c3 + 1, true)
        local v = sub(m, c3 + 1, (c4 or 0) - 1)
        c3 = c4
        if v ~= '-' then
          local x = tonumber(v)
          local j = an[b] + 1
          an[b], asum[b] = j, asum[b] + x
          if j == 1 then
            afirst[b], atop[b], atop_text[b] = v, x, v
          elseif x > atop[b] then
            atop[b], atop_text[b] = x, v
          end
          if ATTR_STD[b] then
            local d = x - amean[b]
            local mu = amean[b] + d / j
            amean[b], am2[b] = mu, am2[b] + d * (x - mu)
          end
        end
      end
    end
  end
  for v = w, nw do snapshot(v) end

  local out = {flag, since or fmt(largest)}
  for i = 1, nw do
    out[#out + 1] = count[i]
    out[#out + 1] = total[i]
    out[#out + 1] = maxv[i]
  end
  for a = 1, N_DISTINCT do
    for i = 1, nw do out[#out + 1] = dcount[a][i] end
  end
  if AMOUNT_STD then
    for i = 1, nw do out[#out + 1] = spread[i] end
  end
  for b = 1, N_ATTR do
    for i = 1, nw do out[#out + 1] = aout[b][i] end
  end
  return table.concat(out, ',')
end

if not c1 then
  return features(0, '')
end

local member, eid = arg, sub(arg, 1, c1 - 1)
local known = redis.call('HMGET', hkey, eid, '#max')
-- At-least-once delivery: an event already stored is not counted again.
if known[1] then
  return features(1, eid)
end
-- Too late: older than the tolerance behind the latest event time stored (the newest is never trimmed).
local latest = known[2] and tonumber(known[2])
if latest and t < latest - LATE_TOLERANCE then
  return features(2, '')
end

redis.call('ZADD', zkey, t_text, member)
if not latest or t > latest then
  -- The new latest event (the usual case): every stored event is at or before t, so one read serves the
  -- trims and the aggregates. Drop what fell out of its largest window, then the oldest beyond the cap.
  redis.call('HSET', hkey, eid, '', '#max', t_text)
  local all = redis.call('ZRANGE', zkey, 0, -1)
  local bound, drop = t - largest, 0
  while drop < #all and event_time(all[drop + 1]) < bound do drop = drop + 1 end
  if #all - drop > MAX_EVENTS then drop = #all - MAX_EVENTS end
  if drop > 0 then drop_oldest(all, drop) end
  redis.call('PEXPIRE', zkey, TTL_MS)
  redis.call('PEXPIRE', hkey, TTL_MS)
  return features(0, eid, all, drop + 1)
end

-- Out of order but in time: nothing leaves the largest window. Beyond the cap the oldest go; if that is
-- this event (older than everything a full entity keeps) it is too late as well, which also keeps a
-- replay of an evicted event from coming back.
local excess = redis.call('ZRANGE', zkey, 0, -(MAX_EVENTS + 1))
for k = 1, #excess do
  if excess[k] == member then
    redis.call('ZREM', zkey, member)
    return features(2, '')
  end
end
redis.call('HSET', hkey, eid, '')
if #excess > 0 then drop_oldest(excess, #excess) end
redis.call('PEXPIRE', zkey, TTL_MS)
redis.call('PEXPIRE', hkey, TTL_MS)
return features(0, eid)
