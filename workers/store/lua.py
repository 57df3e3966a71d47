"""The Lua scripts of the factor store: the hot-path batch write, seen-set writes and reads, popularity rescale,
publish, drop.

Kept apart from the Python so each reads on its own; only :mod:`workers.store.factor_store` registers and
calls them. All of them touch keys of one model only, which share the hash tag ``{<ns>}`` (one Redis Cluster
slot).
"""

from __future__ import annotations

# Shared helpers. Vectors are unpacked/packed in chunks of CHUNK=64 floats (struct.unpack returns one value
# per 'f' plus the next position, and Lua's C stack caps unpack sizes), so any width works. A float32 + float32
# sum in Lua's double is exact; struct.pack('f') then rounds it once to nearest: the same bits as numpy's
# float32 addition. Bulk HMGET/HSET are chunked by 256 fields for the same stack reason.
_LUA_LIB = r"""
local BIG = 3.4028235677973366e38  -- doubles at or beyond this round to float32 inf
local CHUNK = 64
local FMT = {}
local function fmt(m)
  local f = FMT[m]
  if not f then f = '<' .. string.rep('f', m); FMT[m] = f end
  return f
end
local function add_vec(old, delta, n)
  if not old then return delta end
  if #old ~= 4 * n then return nil, -3 end
  local parts, done = {}, 0
  while done < n do
    local m = math.min(CHUNK, n - done)
    local f, pos = fmt(m), done * 4 + 1
    local a = {struct.unpack(f, old, pos)}
    local d = {struct.unpack(f, delta, pos)}
    for j = 1, m do
      local s = a[j] + d[j]
      if s ~= s or s >= BIG or s <= -BIG then return nil, -2 end
      a[j] = s
    end
    parts[#parts + 1] = struct.pack(f, unpack(a, 1, m))
    done = done + m
  end
  return table.concat(parts)
end
-- rows of ids: current value (zeros when absent) plus delta
local function add_many(key, ids, deltas, n)
  local out = {}
  for c = 1, #ids, 256 do
    local e = math.min(c + 255, #ids)
    local cur = redis.call('HMGET', key, unpack(ids, c, e))
    for i = c, e do
      local v, err = add_vec(cur[i - c + 1], deltas[i], n)
      if not v then return nil, err, ids[i] end
      out[i] = v
    end
  end
  return out
end
local function hset_many(key, ids, vals)
  for c = 1, #ids, 256 do
    local args = {}
    for i = c, math.min(c + 255, #ids) do args[#args + 1] = ids[i]; args[#args + 1] = vals[i] end
    redis.call('HSET', key, unpack(args))
  end
end
local function take_ids_blob(pos, n, w)
  -- n ids, then ONE argument holding their n blobs of w bytes back to back (fewer, larger arguments:
  -- the client packs 2 instead of 2n values)
  local ids, vals = {}, {}
  for i = 1, n do ids[i] = ARGV[pos + i - 1] end
  local blob = ARGV[pos + n]
  if #blob ~= n * w then return nil, nil, pos end
  for i = 1, n do vals[i] = string.sub(blob, (i - 1) * w + 1, i * w) end
  return ids, vals, pos + n + 1
end
local function take_pairs(pos, n)
  local a, b = {}, {}
  for i = 1, n do a[i] = ARGV[pos]; b[i] = ARGV[pos + 1]; pos = pos + 2 end
  return a, b, pos
end
"""

# The one implementation of the per-user seen sets: n triples (KEYS index, ts_ms, item) from ARGV[pos]. ZADD GT
# keeps each item's newest ts (a replayed older click never demotes it); then every item clicked more than
# `retention` ms before the user's newest click is dropped, at most `cap` items are kept, and the key expires
# `ttl` seconds after the user's last click.
_SEEN_LIB = r"""
local function add_seen(pos, n, cap, ttl, retention)
  local touched = {}
  for i = 0, n - 1 do
    local p = pos + 3 * i
    local key = KEYS[tonumber(ARGV[p])]
    redis.call('ZADD', key, 'GT', ARGV[p + 1], ARGV[p + 2])
    touched[key] = true
  end
  for key, _ in pairs(touched) do
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.0f', tonumber(newest) - retention))
    if redis.call('ZCARD', key) > cap then redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1)) end
    redis.call('EXPIRE', key, ttl)
  end
end
"""

# KEYS: meta offsets wm user item user_acc item_acc counts nupd gen_meta pop seen...
# ARGV: g part expected new_offset wm_json row_bytes cap ttl retention_ms pop_ref
#       n_users n_items n_counts n_pop n_incr n_seen n_uacc n_iacc, then the sections in that order
#       (see FactorStore.apply_batch).
APPLY_BATCH_LUA = (
    _LUA_LIB
    + _SEEN_LIB
    + r"""
local g, part, expected = ARGV[1], ARGV[2], ARGV[3]
local live = redis.call('HGET', KEYS[1], 'live_gen')
if live ~= g then return {-1, live or ''} end
local stored = redis.call('HGET', KEYS[2], part)
if (expected == '' and stored) or (expected ~= '' and stored ~= expected) then return {0, stored or ''} end
local w, cap, ttl, retention = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local pop_ref = ARGV[10]
local n_pop = tonumber(ARGV[14])
local set_ref = false  -- written with the batch, only once every check below has passed
if n_pop > 0 then  -- the decayed popularity must be relative to the generation's reference time
  local ref = redis.call('HGET', KEYS[10], 'pop_ref_ms')
  if not ref or ref == '0' then set_ref = true
  elseif ref ~= pop_ref then return {-6, ref} end
end
local pos = 19
local uids, ublobs, iids, ideltas, aids, ablobs, bids, bdeltas
uids, ublobs, pos = take_ids_blob(pos, tonumber(ARGV[11]), w)
if not uids then return {-5, 'user'} end
iids, ideltas, pos = take_ids_blob(pos, tonumber(ARGV[12]), w)
if not iids then return {-5, 'item'} end
local cids, cinc, pids, pinc, xids, xinc
cids, cinc, pos = take_pairs(pos, tonumber(ARGV[13]))
pids, pinc, pos = take_pairs(pos, n_pop)
xids, xinc, pos = take_pairs(pos, tonumber(ARGV[15]))
local seen_pos, nseen = pos, tonumber(ARGV[16])
pos = pos + 3 * nseen
aids, ablobs, pos = take_ids_blob(pos, tonumber(ARGV[17]), 8)
if not aids then return {-5, 'user_acc'} end
bids, bdeltas, pos = take_ids_blob(pos, tonumber(ARGV[18]), 8)
if not bids then return {-5, 'item_acc'} end
local items, err, bad = add_many(KEYS[5], iids, ideltas, w / 4)
if not items then return {err, bad} end
local iacc
iacc, err, bad = add_many(KEYS[7], bids, bdeltas, 2)
if not iacc then
  if err == -3 then err = -7 end
  return {err, bad}
end
if set_ref then redis.call('HSET', KEYS[10], 'pop_ref_ms', pop_ref) end
hset_many(KEYS[4], uids, ublobs)
hset_many(KEYS[5], iids, items)
hset_many(KEYS[6], aids, ablobs)
hset_many(KEYS[7], bids, iacc)
for i = 1, #cids do redis.call('ZINCRBY', KEYS[8], cinc[i], cids[i]) end
for i = 1, #pids do redis.call('ZINCRBY', KEYS[11], pinc[i], pids[i]) end
for i = 1, #xids do redis.call('HINCRBY', KEYS[9], xids[i], xinc[i]) end
add_seen(seen_pos, nseen, cap, ttl, retention)
redis.call('HSET', KEYS[2], part, ARGV[4])
redis.call('HSET', KEYS[3], part, ARGV[5])
return {1, ARGV[4]}
"""
)

# KEYS: seen keys...   ARGV: cap ttl retention_ms (key index, ts_ms, item)*   (no floats: fakeredis+lupa runs it)
SEEN_ADD_LUA = (
    _SEEN_LIB
    + r"""
add_seen(4, (#ARGV - 3) / 3, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
"""
)

# KEYS: gen_meta pop   ARGV: old_ref new_ref factor. Rescales the decayed popularity to a later reference time,
# atomically with the reference, unless another writer did it first (then returns {0, stored ref}).
RESCALE_POP_LUA = r"""
local ref = redis.call('HGET', KEYS[1], 'pop_ref_ms')
if ref ~= ARGV[1] then return {0, ref or ''} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZUNIONSTORE', KEYS[2], 1, KEYS[2], 'WEIGHTS', ARGV[3])
end
redis.call('HSET', KEYS[1], 'pop_ref_ms', ARGV[2])
return {1, ARGV[2]}
"""

# KEYS: meta gen_meta(g) user(g) item(g) offsets(g) wm(g) gen_meta(prev)
# ARGV: g prev n_users n_items bias offsets_json wm_json now scale global_row_blob (partition, offset|'', wm|'')*
PUBLISH_LUA = r"""
local live = redis.call('HGET', KEYS[1], 'live_gen')
if live ~= ARGV[2] then return {-1, live or ''} end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'building' then return {-2, state or 'missing'} end
local nu = redis.call('HLEN', KEYS[3])
local ni = redis.call('HLEN', KEYS[4]) - redis.call('HEXISTS', KEYS[4], '')
if nu ~= tonumber(ARGV[3]) then return {-3, nu} end
if ni ~= tonumber(ARGV[4]) then return {-4, ni} end
redis.call('HSET', KEYS[4], '', ARGV[10])
local now = ARGV[8]
redis.call('HSET', KEYS[2], 'state', 'complete', 'published_at', now, 'bias', ARGV[5], 'n_users', ARGV[3],
           'n_items', ARGV[4], 'offsets', ARGV[6], 'watermarks', ARGV[7], 'scale', ARGV[9])
for p = 11, #ARGV, 3 do
  if ARGV[p + 1] ~= '' then redis.call('HSET', KEYS[5], ARGV[p], ARGV[p + 1]) end
  if ARGV[p + 2] ~= '' then redis.call('HSET', KEYS[6], ARGV[p], ARGV[p + 2]) end
end
redis.call('HSET', KEYS[1], 'live_gen', ARGV[1], 'updated_at', now)
if ARGV[2] ~= ARGV[1] then redis.call('HSET', KEYS[7], 'state', 'retired', 'retired_at', now) end
return {1, live}
"""

# KEYS: seen keys...   ARGV: last index (limit - 1, or -1 for all).  Read-only: the seen items of many users
# in one command (a pipeline of ZREVRANGEs costs ~30 us of client time per user).
SEEN_MANY_LUA = r"""
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('ZREVRANGE', key, 0, tonumber(ARGV[1])) end
return out
"""

# KEYS: meta gens generation-keys...   ARGV: g
DROP_LUA = r"""
if redis.call('HGET', KEYS[1], 'live_gen') == ARGV[1] then return 0 end
redis.call('UNLINK', unpack(KEYS, 3))
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
