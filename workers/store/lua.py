"""The Lua scripts of the factor store: the hot-path batch write, seen-set writes and reads, publish, drop.

Kept apart from the Python so each reads on its own; only :mod:`workers.store.factor_store` registers
and calls them.
All of them touch keys of one model only, which share the hash tag ``{<ns>}`` (one Redis Cluster slot).
"""

from __future__ import annotations

# Shared helpers. Vectors are unpacked/packed in chunks of CHUNK=64 floats (struct.unpack returns one value
# per 'f' plus the next position, and Lua's C stack caps unpack sizes), so any k works. A float32 + float32
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
local function add_vec(old, delta, k)
  if not old then return delta end
  if #old ~= 4 * k then return nil, -3 end
  local parts, done = {}, 0
  while done < k do
    local m = math.min(CHUNK, k - done)
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
local function add_many(key, ids, deltas, k)
  local out = {}
  for c = 1, #ids, 256 do
    local e = math.min(c + 255, #ids)
    local cur = redis.call('HMGET', key, unpack(ids, c, e))
    for i = c, e do
      local v, err = add_vec(cur[i - c + 1], deltas[i], k)
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


# The one implementation of the per-user recent-click sets: n triples (KEYS index, ts_ms, item) from ARGV[pos];
# ZADD GT keeps each item's newest ts (a replayed older click never demotes it), then cap and expire.
_SEEN_LIB = r"""
local function add_seen(pos, n, cap, ttl)
  local touched = {}
  for i = 0, n - 1 do
    local p = pos + 3 * i
    local key = KEYS[tonumber(ARGV[p])]
    redis.call('ZADD', key, 'GT', ARGV[p + 1], ARGV[p + 2])
    touched[key] = true
  end
  for key, _ in pairs(touched) do
    redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1))
    redis.call('EXPIRE', key, ttl)
  end
end
"""

# KEYS: meta offsets wm user item user_acc item_acc counts nupd seen...   ARGV: see apply_batch.
APPLY_BATCH_LUA = (
    _LUA_LIB
    + _SEEN_LIB
    + r"""
local g, part, expected = ARGV[1], ARGV[2], ARGV[3]
local live = redis.call('HGET', KEYS[1], 'live_gen')
if live ~= g then return {-1, live or ''} end
local stored = redis.call('HGET', KEYS[2], part)
if (expected == '' and stored) or (expected ~= '' and stored ~= expected) then return {0, stored or ''} end
local k, cap, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local pos, w = 16, 4 * k
local uids, ublobs, iids, ideltas, cids, cinc, nids, ninc, aids, ablobs, bids, bdeltas
uids, ublobs, pos = take_ids_blob(pos, tonumber(ARGV[9]), w)
if not uids then return {-5, 'user'} end
iids, ideltas, pos = take_ids_blob(pos, tonumber(ARGV[10]), w)
if not iids then return {-5, 'item'} end
cids, cinc, pos = take_pairs(pos, tonumber(ARGV[11]))
nids, ninc, pos = take_pairs(pos, tonumber(ARGV[12]))
local seen_pos, nseen = pos, tonumber(ARGV[13])
pos = pos + 3 * nseen
aids, ablobs, pos = take_ids_blob(pos, tonumber(ARGV[14]), w)
if not aids then return {-5, 'user_acc'} end
bids, bdeltas, pos = take_ids_blob(pos, tonumber(ARGV[15]), w)
if not bids then return {-5, 'item_acc'} end
local items, err, bad = add_many(KEYS[5], iids, ideltas, k)
if not items then return {err, bad} end
local iacc
iacc, err, bad = add_many(KEYS[7], bids, bdeltas, k)
if not iacc then return {err, bad} end
hset_many(KEYS[4], uids, ublobs)
hset_many(KEYS[5], iids, items)
hset_many(KEYS[6], aids, ablobs)
hset_many(KEYS[7], bids, iacc)
for i = 1, #cids do redis.call('ZINCRBY', KEYS[8], cinc[i], cids[i]) end
for i = 1, #nids do redis.call('HINCRBY', KEYS[9], nids[i], ninc[i]) end
add_seen(seen_pos, nseen, cap, ttl)
redis.call('HSET', KEYS[2], part, ARGV[4])
redis.call('HSET', KEYS[3], part, ARGV[5])
return {1, ARGV[4]}
"""
)

# KEYS: seen keys...   ARGV: cap ttl (key index, ts_ms, item)*   (no floats: runs on fakeredis with lupa too)
SEEN_ADD_LUA = (
    _SEEN_LIB
    + r"""
add_seen(3, (#ARGV - 2) / 3, tonumber(ARGV[1]), tonumber(ARGV[2]))
return 1
"""
)

# KEYS: meta gen_meta(g) user(g) item(g) offsets(g) wm(g) gen_meta(prev)
# ARGV: g prev n_users n_items bias offsets_json wm_json now (partition, offset|'', wm_json|'')*
PUBLISH_LUA = r"""
local live = redis.call('HGET', KEYS[1], 'live_gen')
if live ~= ARGV[2] then return {-1, live or ''} end
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= 'building' then return {-2, state or 'missing'} end
local nu, ni = redis.call('HLEN', KEYS[3]), redis.call('HLEN', KEYS[4])
if nu ~= tonumber(ARGV[3]) then return {-3, nu} end
if ni ~= tonumber(ARGV[4]) then return {-4, ni} end
local now = ARGV[8]
redis.call('HSET', KEYS[2], 'state', 'complete', 'published_at', now, 'bias', ARGV[5], 'n_users', ARGV[3],
           'n_items', ARGV[4], 'offsets', ARGV[6], 'watermarks', ARGV[7])
for p = 9, #ARGV, 3 do
  if ARGV[p + 1] ~= '' then redis.call('HSET', KEYS[5], ARGV[p], ARGV[p + 1]) end
  if ARGV[p + 2] ~= '' then redis.call('HSET', KEYS[6], ARGV[p], ARGV[p + 2]) end
end
redis.call('HSET', KEYS[1], 'live_gen', ARGV[1], 'updated_at', now)
if ARGV[2] ~= ARGV[1] then redis.call('HSET', KEYS[7], 'state', 'retired', 'retired_at', now) end
return {1, live}
"""

# KEYS: seen keys...   ARGV: last index (limit - 1, or -1 for all).  Read-only: the recent clicks of many users
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
