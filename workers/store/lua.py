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
local function hset_many(key, ids, vals, n)
  n = n or #ids  -- the first n ids
  for c = 1, n, 256 do
    local args = {}
    for i = c, math.min(c + 255, n) do args[#args + 1] = ids[i]; args[#args + 1] = vals[i] end
    redis.call('HSET', key, unpack(args))
  end
end
local function row(blob, i, w) return string.sub(blob, (i - 1) * w + 1, i * w) end
local function split(blob, n, w)
  -- ONE argument holding n blobs of w bytes back to back (fewer, larger arguments: the client packs 1 instead
  -- of n values); nil when its size is not n * w
  if #blob ~= n * w then return nil end
  local vals = {}
  for i = 1, n do vals[i] = row(blob, i, w) end
  return vals
end
local function take_ids(pos, n)
  local ids = {}
  for i = 1, n do ids[i] = ARGV[pos + i - 1] end
  return ids, pos + n
end
-- Item rows (and their accumulators, the first n_acc of ids) as the batch writes them, with each row's next
-- version. A row whose stored version (absent = 0) equals the one the worker sent is SET to the worker's
-- absolute value (that worker computed stored + delta itself: the bits the add below would give); every
-- other row is stored + delta, added here. Either way the row's version goes up by one. Deltas, absolute rows
-- and accumulators come as joined blobs (rows of w and 8 bytes), sliced only where used.
local function item_sums(ikey, akey, vkey, ids, deltas, n_acc, adeltas, vers, abs, aabs, w)
  local rows, accs, newv, slow, sdel, sacc, sadel = {}, {}, {}, {}, {}, {}, {}
  for c = 1, #ids, 256 do
    local e = math.min(c + 255, #ids)
    local cur = redis.call('HMGET', vkey, unpack(ids, c, e))
    for i = c, e do
      local v = cur[i - c + 1] or '0'
      newv[i] = string.format('%d', tonumber(v) + 1)
      if vers[i] == v then
        rows[i] = row(abs, i, w)
        if i <= n_acc then accs[i] = row(aabs, i, 8) end
      else
        slow[#slow + 1] = i
        sdel[#slow] = row(deltas, i, w)
        if i <= n_acc then sacc[#sacc + 1] = i; sadel[#sacc] = row(adeltas, i, 8) end
      end
    end
  end
  local function ids_of(idx)
    local out = {}
    for j = 1, #idx do out[j] = ids[idx[j]] end
    return out
  end
  local got, err, bad = add_many(ikey, ids_of(slow), sdel, w / 4)
  if not got then return nil, nil, nil, err, bad end
  for j = 1, #slow do rows[slow[j]] = got[j] end
  got, err, bad = add_many(akey, ids_of(sacc), sadel, 2)
  if not got then
    if err == -3 then err = -7 end
    return nil, nil, nil, err, bad
  end
  for j = 1, #sacc do accs[sacc[j]] = got[j] end
  return rows, accs, newv, #slow
end
-- score += inc per member (ZMSCORE, then one ZADD per 256): the doubles ZINCRBY would store (scores come back
-- as %.17g and go in as %.17g, both exact)
local function zincr_many(key, ids, incs)
  for c = 1, #ids, 256 do
    local e = math.min(c + 255, #ids)
    local cur = redis.call('ZMSCORE', key, unpack(ids, c, e))
    local args = {}
    for i = c, e do
      args[#args + 1] = string.format('%.17g', (tonumber(cur[i - c + 1]) or 0) + tonumber(incs[i]))
      args[#args + 1] = ids[i]
    end
    redis.call('ZADD', key, unpack(args))
  end
end
-- field += inc (integers) per field: HMGET, then one HSET per 256
local function hincr_many(key, ids, incs)
  for c = 1, #ids, 256 do
    local e = math.min(c + 255, #ids)
    local cur = redis.call('HMGET', key, unpack(ids, c, e))
    local args = {}
    for i = c, e do
      args[#args + 1] = ids[i]
      args[#args + 1] = string.format('%d', (tonumber(cur[i - c + 1]) or 0) + tonumber(incs[i]))
    end
    redis.call('HSET', key, unpack(args))
  end
end
local function take_pairs(pos, n)
  local a, b = {}, {}
  for i = 1, n do a[i] = ARGV[pos]; b[i] = ARGV[pos + 1]; pos = pos + 2 end
  return a, b, pos
end
"""

# The one implementation of the per-user seen sets (the batch script and SEEN_ADD_LUA), grouped per user:
# from ARGV[pos], `slots` arguments of groups (KEYS index, flags, m, then m pairs (ts_ms, item)). One ZADD GT
# per user (an item's newest ts is kept: a replayed older click never demotes it), then the cap (ZCARD); flag 1
# (SEEN_PRUNE) also drops items clicked more than `retention` ms before the user's newest click, flag 2
# (SEEN_EXPIRE) sets the TTL. The LMF worker raises each flag on its first write of a user and then at most
# every 1 % of the retention / TTL, so most users cost two commands instead of four plus one per click.
_SEEN_GROUPS_LIB = r"""
local function add_seen_groups(pos, slots, cap, ttl, retention)
  local stop = pos + slots
  while pos < stop do
    local key, flags, m = KEYS[tonumber(ARGV[pos])], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    local zargs = {}
    for j = 1, 2 * m do zargs[j] = ARGV[pos + 2 + j] end
    redis.call('ZADD', key, 'GT', unpack(zargs))
    if flags % 2 == 1 then
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]
      redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. string.format('%.0f', tonumber(newest) - retention))
    end
    if redis.call('ZCARD', key) > cap then redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1)) end
    if flags >= 2 then redis.call('EXPIRE', key, ttl) end
    pos = pos + 3 + 2 * m
  end
end
"""

# User erasure (stream.erasure), in the batch script after its checks and before its writes. The section
# starts at ARGV[at] (absent: nothing to erase): n, KEYS index of the tombstone zset, tombstone retention (ms),
# n_gen and the KEYS index of the first of the other generations' (user, user_acc, nupd) keys, then per user
# (user id, digest, erased_at_ms, KEYS index of its seen set). Each user's row, accumulators and counter leave
# this generation (KEYS[4], [6], [9]) and the others, the seen set is unlinked, the tombstone keeps the newest
# time (ZADD GT), and tombstones older than the retention before the newest erasure are dropped.
_ERASE_LIB = r"""
local function erase_users(at)
  local n = tonumber(ARGV[at] or '0')
  if n == 0 then return end
  local tomb, retention = KEYS[tonumber(ARGV[at + 1])], tonumber(ARGV[at + 2])
  local n_gen, first = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local newest = 0
  for i = 0, n - 1 do
    local q = at + 5 + 4 * i
    local user = ARGV[q]
    redis.call('HDEL', KEYS[4], user)
    redis.call('HDEL', KEYS[6], user)
    redis.call('HDEL', KEYS[9], user)
    for j = first, first + 3 * n_gen - 1 do redis.call('HDEL', KEYS[j], user) end
    redis.call('UNLINK', KEYS[tonumber(ARGV[q + 3])])
    redis.call('ZADD', tomb, 'GT', ARGV[q + 2], ARGV[q + 1])
    newest = math.max(newest, tonumber(ARGV[q + 2]))
  end
  redis.call('ZREMRANGEBYSCORE', tomb, '-inf', '(' .. string.format('%.0f', newest - retention))
end
"""

# KEYS: meta offsets wm user item user_acc item_acc counts nupd gen_meta pop iver seen... [erase keys...]
# ARGV: g part expected new_offset wm_json row_bytes cap ttl retention_ms pop_ref
#       n_users n_items n_counts n_pop n_incr n_seen n_uacc n_iacc n_abs n_more, (part expected new wm_json) *
#       n_more (more partitions fenced and advanced by the same batch), then the sections in that order
#       (see FactorStore.apply_batch), then the optional erase section (_ERASE_LIB).
APPLY_BATCH_LUA = (
    _LUA_LIB
    + _SEEN_GROUPS_LIB
    + _ERASE_LIB
    + r"""
local g, part, expected = ARGV[1], ARGV[2], ARGV[3]
local live = redis.call('HGET', KEYS[1], 'live_gen')
if live ~= g then return {-1, live or ''} end
local stored = redis.call('HGET', KEYS[2], part)
if (expected == '' and stored) or (expected ~= '' and stored ~= expected) then return {0, stored or ''} end
local n_more = tonumber(ARGV[20])  -- more partitions in this batch: (part, expected, new, wm_json) each
for f = 21, 20 + 4 * n_more, 4 do
  local got, want = redis.call('HGET', KEYS[2], ARGV[f]), ARGV[f + 1]
  if (want == '' and got) or (want ~= '' and got ~= want) then return {0, ARGV[f] .. ':' .. (got or '')} end
end
local w, cap, ttl, retention = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local pop_ref = ARGV[10]
local n_pop = tonumber(ARGV[14])
local set_ref = false  -- written with the batch, only once every check below has passed
if n_pop > 0 then  -- the decayed popularity must be relative to the generation's reference time
  local ref = redis.call('HGET', KEYS[10], 'pop_ref_ms')
  if not ref or ref == '0' then set_ref = true
  elseif ref ~= pop_ref then return {-6, ref} end
end
local pos = 21 + 4 * n_more
local n_users, n_items, n_uacc, n_iacc = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[17]), tonumber(ARGV[18])
local uids, iids, ublobs, uacc
uids, pos = take_ids(pos, n_users)
ublobs = split(ARGV[pos], n_users, w)
if not ublobs then return {-5, 'user'} end
iids, pos = take_ids(pos + 1, n_items)
local ideltas = ARGV[pos]
if #ideltas ~= n_items * w then return {-5, 'item'} end
pos = pos + 1
local cids, cinc, pids, pinc, xids, xinc
cids, cinc, pos = take_pairs(pos, tonumber(ARGV[13]))
pids, pinc, pos = take_pairs(pos, n_pop)
xids, xinc, pos = take_pairs(pos, tonumber(ARGV[15]))
local seen_pos, nseen = pos, tonumber(ARGV[16])  -- nseen: argument slots of the seen groups
pos = pos + nseen
-- accumulators of the first n_uacc users and n_iacc items, one blob each
uacc = split(ARGV[pos], math.min(n_uacc, n_users), 8)
if not uacc or n_uacc > n_users then return {-5, 'user_acc'} end
local bdeltas = ARGV[pos + 1]
if n_iacc > n_items or #bdeltas ~= n_iacc * 8 then return {-5, 'item_acc'} end
pos = pos + 2
local n_abs, vers, iabs, babs = tonumber(ARGV[19]), {}, '', ''
if n_abs > 0 then  -- the worker's absolute rows: versions (one comma-joined string), rows, accumulators
  if n_abs ~= n_items then return {-5, 'item_rows'} end
  for v in string.gmatch(ARGV[pos], '[^,]+') do vers[#vers + 1] = v end
  iabs, babs = ARGV[pos + 1], ARGV[pos + 2]
  if #vers ~= n_abs or #iabs ~= n_abs * w then return {-5, 'item_rows'} end
  if #babs ~= n_iacc * 8 then return {-5, 'item_acc_rows'} end
end
local items, iacc, iver, err, bad = item_sums(KEYS[5], KEYS[7], KEYS[12], iids, ideltas, n_iacc, bdeltas, vers,
                                             iabs, babs, w)
if not items then return {err, bad} end
erase_users(pos + (n_abs > 0 and 3 or 0))  -- first: later events of an erased user create it afresh
if set_ref then redis.call('HSET', KEYS[10], 'pop_ref_ms', pop_ref) end
hset_many(KEYS[4], uids, ublobs)
hset_many(KEYS[5], iids, items)
hset_many(KEYS[12], iids, iver)
hset_many(KEYS[6], uids, uacc, n_uacc)
hset_many(KEYS[7], iids, iacc, n_iacc)
zincr_many(KEYS[8], cids, cinc)
zincr_many(KEYS[11], pids, pinc)
hincr_many(KEYS[9], xids, xinc)
add_seen_groups(seen_pos, nseen, cap, ttl, retention)
redis.call('HSET', KEYS[2], part, ARGV[4])
redis.call('HSET', KEYS[3], part, ARGV[5])
for f = 21, 20 + 4 * n_more, 4 do
  redis.call('HSET', KEYS[2], ARGV[f], ARGV[f + 2])
  redis.call('HSET', KEYS[3], ARGV[f], ARGV[f + 3])
end
return {1, ARGV[4], err}  -- err: here the number of item rows added (not SET)
"""
)

# KEYS: seen keys...   ARGV: cap ttl retention_ms, then the groups of _SEEN_GROUPS_LIB (every flag raised):
# the batch write's seen-set code on its own (no floats: fakeredis+lupa runs it)
SEEN_ADD_LUA = (
    _SEEN_GROUPS_LIB
    + r"""
add_seen_groups(4, #ARGV - 3, tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
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
