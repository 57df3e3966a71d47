"""The Redis factor store: reads and writes of one model's factors, generations, offsets, counts, seen sets.

Keys come from :mod:`workers.store.keys` (callers never format keys; tools and benchmarks read
``store.keys``), values from :mod:`workers.store.codec`, scripts from :mod:`workers.store.lua`, records
from :mod:`workers.store.records`. A factor row is ``k`` latent values followed by the row's bias
(``width = k + 1``); the model's global bias is the bias of the item row :data:`GLOBAL_ROW`.

The hot-path batch write (:meth:`FactorStore.apply_batch`) and generation publish/drop run as Lua scripts
(EVALSHA; redis-py reloads them on NOSCRIPT). They need a real Redis >= 6.2 (``struct`` library,
``ZADD GT``). fakeredis (with ``lupa``) runs the scripts that do not pack floats, so everything but
``apply_batch`` and ``publish_generation`` also works on it.

>>> import fakeredis, numpy as np
>>> store = FactorStore(fakeredis.FakeRedis(), namespace="demo")
>>> store.ensure_model(4)
1
>>> store.keys.vectors(1, "user")
'zcf:v2:{demo}:g:1:user'
>>> store.write_vectors(1, "user", ["u1"], np.ones((1, 5), dtype=np.float32))
>>> rows, found = store.get_vectors(1, "user", ["u1", "nobody"])
>>> rows.dtype, rows.shape, found.tolist()
(dtype('float32'), (2, 5), [True, False])
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import redis

from stream.config import redact_url
from stream.erasure import RETENTION_MS, erased_digest
from stream.errors import ConfigError, ServiceUnavailable
from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store.codec import DTYPE, decode, encode, encode_joined
from workers.store.connect import Client, client_from_url, connection_kwargs, is_cluster, where
from workers.store.keys import GLOBAL_ROW, SCHEMA_VERSION, TABLES, Keys, Table
from workers.store.lua import (
    APPLY_BATCH_LUA,
    DROP_LUA,
    PUBLISH_LUA,
    RESCALE_POP_LUA,
    SEEN_ADD_LUA,
    SEEN_MANY_LUA,
)
from workers.store.records import (
    SEEN_EXPIRE,
    SEEN_PRUNE,
    ApplyStatus,
    BatchState,
    BatchWrite,
    GenerationMeta,
    ModelMeta,
)

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]

_CHUNK = 1000
DAY_MS = 86_400_000
ACC_WIDTH = 2  # AdaGrad accumulators per row: the latent vector's (one per row) and the bias's
LEASE_S = 60.0  # a building generation whose builder renewed nothing for this long is abandoned

__all__ = ["LEASE_S", "FactorStore", "ModelLost"]


class ModelLost(StoreSchemaError):
    """The model this process (or its checkpoint, or its consumer group) worked on is gone from Redis, or
    was replaced by another one: Redis lost its data. Nothing is rebuilt without an explicit ``--rebuild``."""


class FactorStore:
    """Read and write one model's factors, generations, offsets, counts and seen sets in Redis.

    Parameters
    ----------
    client : redis.Redis or redis.cluster.RedisCluster
        A client with ``decode_responses=False`` (blobs are bytes).
    namespace : str
        The topic prefix; every key carries the hash tag ``{namespace}``.
    seen_cap, seen_ttl : int
        A user's seen set keeps every item clicked within ``seen_ttl`` seconds (event time) of the user's
        newest click, at most ``seen_cap`` of them, and expires ``seen_ttl`` seconds after the last click.
    clock : callable
        Returns epoch seconds (tests inject a fixed clock).
    """

    def __init__(
        self,
        client: Client,
        namespace: str = "zerocf",
        *,
        seen_cap: int = 10_000,
        seen_ttl: int = 365 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if connection_kwargs(client).get("decode_responses"):
            raise ConfigError(
                "the Redis client decodes responses; FactorStore needs bytes: create it with decode_responses=False"
            )
        if seen_cap < 1 or seen_ttl < 1:
            raise ConfigError(f"seen_cap={seen_cap} and seen_ttl={seen_ttl} must be >= 1")
        # redis-py types replies as bytes | str (its decode mode is a runtime setting); this client is always
        # bytes (checked above), so the store reads it untyped and decodes explicitly.
        self.r: Any = client
        self.keys = Keys(namespace)
        self.seen_cap, self.seen_ttl, self._clock = int(seen_cap), int(seen_ttl), clock
        self._k: int | None = None
        self._model_id: str | None = None  # the model this store object has seen (a change = a lost store)
        self.where = where(client)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"  # written into the leases this process takes
        self.rows_added = 0  # item rows apply_batch added in Redis (versions moved or unknown) instead of SET
        self._apply = client.register_script(APPLY_BATCH_LUA)
        self._publish = client.register_script(PUBLISH_LUA)
        self._drop = client.register_script(DROP_LUA)
        self._seen_many = client.register_script(SEEN_MANY_LUA)
        self._seen_add = client.register_script(SEEN_ADD_LUA)
        self._rescale = client.register_script(RESCALE_POP_LUA)

    @classmethod
    def from_url(cls, url: str, namespace: str = "zerocf", **kw: Any) -> FactorStore:
        """Connect with a ``redis://`` / ``rediss://`` (TLS) URL, or ``redis+cluster://host:port[,host:port...]``
        for a Redis Cluster (:mod:`workers.store.connect`); a password may be in the URL.

        ``kw`` goes to :class:`FactorStore` (``seen_cap``, ``seen_ttl``, ``clock``) or else to the client
        (e.g. ``ssl_ca_certs``, ``socket_timeout``).
        """
        own = {n: kw.pop(n) for n in ("seen_cap", "seen_ttl", "clock") if n in kw}
        log.info("connecting factor store %s namespace=%s", redact_url(url), namespace)
        client = client_from_url(url, **kw)
        store = cls(client, namespace, **own)
        store.where = redact_url(url)
        return store

    @classmethod
    def connect(cls, url: str, namespace: str = "zerocf", **kw: Any) -> FactorStore:
        """:meth:`from_url` plus a PING, turning connection and credential failures into clear errors.

        Workers call this at start-up so a wrong URL or password fails fast with a message that says what
        to fix, instead of a traceback from the first batch. Sockets time out (15 s) so a hung Redis is
        detected rather than waited on forever.
        """
        kw.setdefault("socket_timeout", 15)
        kw.setdefault("socket_connect_timeout", 5)
        kw.setdefault("health_check_interval", 30)
        where = redact_url(url)
        try:
            store = cls.from_url(url, namespace, **kw)  # a cluster client connects here (it reads the slot map)
            store.r.ping()
        except redis.AuthenticationError as exc:
            raise ConfigError(
                f"Redis at {where} rejected the credentials ({exc}); fix the password in "
                "ZEROCF_REDIS_URL (redis://:PASSWORD@host:port/db)"
            ) from None
        except redis.ResponseError as exc:
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigError(
                    f"Redis at {where} needs a password ({exc}); put it in ZEROCF_REDIS_URL "
                    "(redis://:PASSWORD@host:port/db)"
                ) from None
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable(
                f"cannot reach Redis at {where} ({exc}); start it (`zerocf stack up` "
                "for the local stack) or fix ZEROCF_REDIS_URL"
            ) from None
        return store

    # ------------------------------------------------------------------ model meta
    @property
    def k(self) -> int:
        """The model's latent dimension (read once from Redis, immutable for a model)."""
        if self._k is None:
            self._k = self.meta().k
        return self._k

    @property
    def width(self) -> int:
        """Floats per factor row: ``k`` latent values and the bias."""
        return self.k + 1

    def ensure_model(self, k: int, pop_half_life_ms: int = DAY_MS, *, replace_legacy: bool = False) -> int:
        """Create the model (meta + generation 1, complete, source online) if absent; return ``live_gen``.

        Raises :class:`StoreSchemaError` when the stored model has another k or dtype, or when Redis holds
        only an older schema's model under this namespace (unless ``replace_legacy``: the rebuild path).
        """
        if int(k) < 1:
            raise StoreSchemaError(f"k={k} must be >= 1; pass --factors with a positive value")
        km, now = self.keys, _num(self._clock())
        if not replace_legacy and not self.r.exists(km.meta):
            self._refuse_legacy()

        def create(pipe: Any) -> None:
            if pipe.exists(km.meta):
                return
            pipe.multi()
            meta: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "k": int(k), "dtype": DTYPE, "live_gen": 1}
            meta |= {"next_gen": 1, "model_id": uuid.uuid4().hex}
            pipe.hset(km.meta, mapping={**meta, "created_at": now, "updated_at": now})
            pipe.hset(km.gen_meta(1), mapping=_new_generation("online", now, pop_half_life_ms, complete=True))
            pipe.zadd(km.gens, {"1": 1})

        self.r.transaction(create, km.meta)
        if self.r.hsetnx(km.meta, "model_id", uuid.uuid4().hex):  # a model created before ids existed
            log.info("model %s had no model_id; gave it one", km.ns)
        m = self.meta()
        ns = self.keys.ns
        if m.schema_version != SCHEMA_VERSION or m.dtype != DTYPE:
            raise StoreSchemaError(
                f"redis model {ns} has schema_version={m.schema_version} dtype={m.dtype}, this zerocf reads "
                f"schema_version={SCHEMA_VERSION} dtype={DTYPE}; upgrade zerocf or use another ZEROCF_TOPIC_PREFIX"
            )
        if m.k != int(k):
            raise StoreSchemaError(
                f"redis model {ns} has k={m.k}, worker configured k={k}; rerun with "
                f"--factors {m.k} (ZEROCF_FACTORS={m.k}), or start a new model under another ZEROCF_TOPIC_PREFIX "
                "(a model's k is fixed; see docs/production.md, upgrading)"
            )
        self._k = m.k
        return m.live_gen

    def has_model(self) -> bool:
        """True when Redis holds this namespace's (current-schema) model meta."""
        return bool(self.r.exists(self.keys.meta))

    @property
    def model_id(self) -> str:
        """The id of the model in Redis (see :class:`~workers.store.records.ModelMeta`)."""
        return self.meta().model_id

    def refuse_legacy(self) -> None:
        """Raise :class:`StoreSchemaError` naming the rebuild when only an older schema's model is stored."""
        self._refuse_legacy()

    def _refuse_legacy(self) -> None:
        for version in range(1, SCHEMA_VERSION):
            if self.r.exists(self.keys.legacy_meta(version)):
                ns = self.keys.ns
                raise StoreSchemaError(
                    f"Redis holds a schema-{version} zerocf model under namespace {ns!r} (factor rows without "
                    f"biases); this zerocf reads schema {SCHEMA_VERSION}. Rebuild it from the events topic with "
                    f"`zerocf als --once --rebuild` (then restart `zerocf lmf`), or use another "
                    f"ZEROCF_TOPIC_PREFIX; the old keys (zcf:v{version}:{{{ns}}}:*) can then be deleted"
                )

    def meta(self) -> ModelMeta:
        """Read the model meta hash; :class:`StoreSchemaError` if there is no model."""
        raw = {_s(a): b for a, b in self.r.hgetall(self.keys.meta).items()}
        if not raw:
            self._refuse_legacy()
            self._check_model(None)
            raise StoreSchemaError(
                f"no zerocf model in Redis under namespace {self.keys.ns!r}; start "
                "`zerocf lmf` or run `zerocf als --once` first, or check ZEROCF_TOPIC_PREFIX"
            )
        self._check_model(raw.get("model_id"))
        return ModelMeta(
            int(raw["schema_version"]),
            int(raw["k"]),
            raw["dtype"].decode(),
            int(raw["live_gen"]),
            int(raw["next_gen"]),
            float(raw["created_at"]),
            float(raw["updated_at"]),
            (_s(raw.get("model_id")) or ""),
        )

    def _check_model(self, stored: bytes | None) -> None:
        """Remember the first model id seen; raise :class:`ModelLost` when it is gone or another one."""
        now = _s(stored)
        if self._model_id is None:
            self._model_id = now
            return
        if now == self._model_id:
            return
        ns, was = self.keys.ns, self._model_id
        if now is None:
            raise ModelLost(
                f"the store at {self.where} lost zerocf model {was} (namespace {ns!r}) while this process was "
                "using it: Redis was flushed or restarted without its data. Nothing was rebuilt; restore Redis "
                "or rebuild explicitly with `zerocf als --once --rebuild`, then restart `zerocf lmf`"
            )
        raise ModelLost(
            f"the store at {self.where} now holds zerocf model {now} under namespace {ns!r}, not model {was} "
            "that this process was using: Redis lost its data and another process created a new model; "
            "restart this process"
        )

    def live_generation(self) -> int:
        """The live generation number (one round trip; also notices a lost or replaced model)."""
        v, mid = self.r.hmget(self.keys.meta, ["live_gen", "model_id"])
        if v is None:
            self.meta()  # raises the instructive error
        self._check_model(mid)
        return int(v)

    def generation_meta(self, g: int) -> GenerationMeta:
        """Read generation ``g``'s meta; :class:`GenerationError` if it does not exist."""
        raw = {_s(a): b for a, b in self.r.hgetall(self.keys.gen_meta(g)).items()}
        if not raw:
            raise GenerationError(
                f"generation {g} of model {self.keys.ns!r} does not exist (dropped or "
                "never begun); read live_generation() for the current one"
            )
        return GenerationMeta(
            g=int(g),
            state=raw["state"].decode(),
            source=raw.get("source", b"").decode(),
            created_at=float(raw["created_at"]),
            n_users=int(raw.get("n_users", 0)),
            n_items=int(raw.get("n_items", 0)),
            bias=float(raw.get("bias", 0.0)),
            offsets={int(p): int(o) for p, o in json.loads(raw.get("offsets", b"{}")).items()},
            watermarks={int(p): w for p, w in json.loads(raw.get("watermarks", b"{}")).items()},
            published_at=_f(raw.get("published_at")),
            retired_at=_f(raw.get("retired_at")),
            scale=float(raw.get("scale", 1.0)),
            pop_ref_ms=int(raw.get("pop_ref_ms", 0)),
            pop_half_life_ms=int(raw.get("pop_half_life_ms", DAY_MS)),
        )

    def generations(self) -> list[int]:
        """Every generation with a meta hash (building, complete or retired), ascending."""
        return [int(g) for g in self.r.zrange(self.keys.gens, 0, -1)]

    # ------------------------------------------------------------------ reads
    def _width(self, table: str) -> int:
        return ACC_WIDTH if table.endswith("_acc") else self.width

    def get_vectors(
        self, g: int, table: Table, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Rows for ``ids`` with one HMGET: ``(n, k + 1)`` float32 (``(n, 2)`` for ``*_acc``; zeros where
        absent) and the found mask."""
        w = self._width(table)
        if not ids:
            return np.zeros((0, w), dtype=np.float32), np.zeros(0, dtype=np.bool_)
        return decode(self.r.hmget(self.keys.vectors(g, table), list(ids)), w, ids)

    def get_all_accumulators(self, g: int, chunk: int = _CHUNK) -> tuple[list[str], npt.NDArray[np.float32]]:
        """Every item's AdaGrad accumulators in generation ``g`` via HSCAN: ids and ``(n, 2)`` float32."""
        rows = dict(self.r.hscan_iter(self.keys.vectors(g, "item_acc"), count=chunk))
        rows.pop(GLOBAL_ROW.encode(), None)
        ids = [i.decode() for i in rows]
        return ids, decode(list(rows.values()), ACC_WIDTH, ids)[0]

    def get_all_items(self, g: int, chunk: int = _CHUNK) -> tuple[list[str], npt.NDArray[np.float32], float]:
        """Every item row of generation ``g`` via HSCAN (order unspecified) and the global bias."""
        rows = dict(self.r.hscan_iter(self.keys.vectors(g, "item"), count=chunk))
        glob = rows.pop(GLOBAL_ROW.encode(), None)
        ids = [i.decode() for i in rows]
        bias = float(decode([glob], self.width)[0][0, -1]) if glob is not None else self.generation_meta(g).bias
        return ids, decode(list(rows.values()), self.width, ids)[0], bias

    def global_bias(self, g: int) -> float:
        """The model's global bias in generation ``g`` (the bias of :data:`GLOBAL_ROW`)."""
        blob = self.r.hget(self.keys.vectors(g, "item"), GLOBAL_ROW)
        return float(decode([blob], self.width)[0][0, -1]) if blob is not None else self.generation_meta(g).bias

    def item_count(self, g: int) -> int:
        """Number of item rows in generation ``g`` (HLEN, the global row not counted)."""
        p = self.r.pipeline(transaction=False)
        p.hlen(self.keys.vectors(g, "item"))
        p.hexists(self.keys.vectors(g, "item"), GLOBAL_ROW)
        n, has_global = p.execute()
        return int(n) - int(bool(has_global))

    def read_batch_state(
        self,
        g: int,
        partitions: Sequence[int],
        users: Sequence[str],
        items: Sequence[str],
        *,
        accumulators: bool = False,
        seen_users: Sequence[str] = (),
    ) -> BatchState:
        """One pipelined round trip: live_gen, user/item rows, applied offsets + watermarks (+ the AdaGrad
        accumulators, + the seen items of ``seen_users``, read by one Lua call)."""
        km = self.keys
        p = self.r.pipeline(transaction=False)
        p.hmget(km.meta, ["live_gen", "model_id"])
        parts = [str(int(x)) for x in partitions]
        tables: list[Table] = ["user", "item", "user_acc", "item_acc"] if accumulators else ["user", "item"]
        idlists = [list(users), list(items)] * (2 if accumulators else 1)
        items = list(items)
        if items:  # before the rows: a version read with a row is never newer than the row (see item_versions)
            p.hmget(km.item_versions(g), items)
        for table, ids in zip(tables, idlists):
            if ids:
                p.hmget(km.vectors(g, table), ids)
        if parts:
            p.hmget(km.offsets(g), parts)
            p.hmget(km.watermarks(g), parts)
        seen_users = [str(u) for u in seen_users]
        apart = bool(seen_users) and is_cluster(self.r)  # a cluster pipeline refuses EVALSHA: its own round trip
        if seen_users and not apart:
            self._seen_many(keys=[km.seen(u) for u in seen_users], args=[-1], client=p)
        res = iter(p.execute())
        live, mid = next(res)
        if live is None:
            self.meta()
        self._check_model(mid)
        vers = _versions(next(res)) if items else np.zeros(0, np.int64)
        mats = {t: decode(next(res) if ids else [], self._width(t), ids) for t, ids in zip(tables, idlists)}
        offs = next(res) if parts else []
        wms = next(res) if parts else []
        if apart:
            res = iter([self._seen_many(keys=[km.seen(u) for u in seen_users], args=[-1])])
        seen = {u: [i.decode() for i in rows] for u, rows in zip(seen_users, next(res))} if seen_users else None
        return BatchState(
            live_gen=int(live),
            user_rows=mats["user"][0],
            user_found=mats["user"][1],
            item_rows=mats["item"][0],
            item_found=mats["item"][1],
            offsets={int(pp): (None if o is None else int(o)) for pp, o in zip(parts, offs)},
            watermarks={int(pp): json.loads(w) for pp, w in zip(parts, wms) if w is not None},
            user_acc=mats["user_acc"][0] if accumulators else None,
            item_acc=mats["item_acc"][0] if accumulators else None,
            seen=seen,
            item_versions=vers,
        )

    def item_versions(self, g: int) -> dict[str, int]:
        """Every item row's version in generation ``g`` (absent rows are version 0).

        Read it **before** the rows it goes with (:meth:`get_all_items`, :meth:`get_all_accumulators`): a row
        read later is at least that new, so a worker that sends a version with ``stored row + delta`` can only
        be wrong in the safe direction (the row is then added in Redis, see :meth:`apply_batch`)."""
        return {i.decode(): int(v) for i, v in self.r.hscan_iter(self.keys.item_versions(g), count=_CHUNK)}

    # ------------------------------------------------------------------ hot-path write (Lua)
    def apply_batch(self, g: int, b: BatchWrite) -> ApplyStatus:
        """Atomically apply one LMF batch (:class:`~workers.store.records.BatchWrite`) to generation ``g``.

        One EVALSHA. Item rows whose ``b.item_versions`` entry is the stored version are SET to ``b.item_rows``
        (``item_acc``); the others get ``item_deltas`` added in Redis; every written row's version goes up
        by one. Writes happen only if ``live_gen == g`` (else ``NEW_GENERATION``), the partition's
        stored applied offset equals ``b.expected_offset`` (absent when None; else ``STALE``) and, when the
        batch carries popularity, the generation's popularity reference is ``b.pop_ref_ms`` or not set yet
        (else ``POPULARITY_MOVED``). Raises :class:`ModelDiverged` for NaN/inf input or a float32 overflow
        (nothing written). ``b.erase`` users are deleted (and tombstoned) before the batch's own writes
        (:meth:`_erase_args`, docs/redis-schema.md *User erasure*).
        """
        w, km = self.width, self.keys
        uids, iids = [str(u) for u in b.user_ids], [str(i) for i in b.item_ids]
        empty = np.zeros((0, w), np.float32)
        ublob = encode_joined(empty if b.user_rows is None else b.user_rows, w, uids)
        iblob = encode_joined(empty if b.item_deltas is None else b.item_deltas, w, iids)
        _same_len("user_ids", uids, range(len(ublob) // (4 * w)), "user_rows")
        _same_len("item_ids", iids, range(len(iblob) // (4 * w)), "item_deltas")
        uacc = _acc_blob(b.user_acc, uids, "user_acc")
        iacc = _acc_blob(b.item_acc_deltas, iids, "item_acc_deltas")
        absolute = self._absolute(b, iids, w, len(iacc) // (4 * ACC_WIDTH))
        for name, values in (("count", b.counts), ("popularity", b.popularity)):
            if not all(math.isfinite(c) for c in values.values()):
                raise ModelDiverged(f"batch for partition {b.partition} has a non-finite item {name}; refused")
        seen_keys, seen_args = self._seen_groups(b.seen, b.seen_upkeep, first_key=13)
        keys = [km.meta, km.offsets(g), km.watermarks(g), *(km.vectors(g, t) for t in TABLES), km.counts(g)]
        keys += [km.updates(g), km.gen_meta(g), km.popularity(g), km.item_versions(g), *seen_keys]
        n_uacc, n_iacc = len(uacc) // (4 * ACC_WIDTH), len(iacc) // (4 * ACC_WIDTH)
        head: list[Any] = [g, b.partition, "" if b.expected_offset is None else b.expected_offset, b.new_offset]
        head += [json.dumps(dict(b.watermarks), sort_keys=True), 4 * w, self.seen_cap, self.seen_ttl]
        head += [self.seen_ttl * 1000, int(b.pop_ref_ms), len(uids), len(iids), len(b.counts)]
        head += [len(b.popularity), len(b.user_increments), len(seen_args), n_uacc, n_iacc]
        head += [len(absolute) and len(iids), len(b.more)]
        for f in b.more:
            head += [f.partition, "" if f.expected_offset is None else f.expected_offset, f.new_offset]
            head += [json.dumps(dict(f.watermarks), sort_keys=True)]
        args = [*head, *uids, ublob, *iids, iblob]
        args += _pairs(list(b.counts), [_num(c) for c in b.counts.values()])
        args += _pairs(list(b.popularity), [_num(c) for c in b.popularity.values()])
        args += _pairs(list(b.user_increments), [int(n) for n in b.user_increments.values()]) + seen_args
        args += [uacc, iacc, *absolute]
        if b.erase:  # appended: the script finds the section after the ones above
            erase_keys, erase_args = self._erase_args(g, b.erase, first_key=len(keys) + 1)
            keys, args = keys + erase_keys, args + erase_args
        code, detail, *added = self._apply(keys=keys, args=args)
        if added:
            self.rows_added += int(added[0])
        return self._status(int(code), detail, g, b)

    def _erase_args(self, g: int, erase: Mapping[str, int], first_key: int) -> tuple[list[str], list[Any]]:
        """Keys and arguments of the batch script's erase section (``lua._ERASE_LIB``): the tombstone zset, the
        users' seen sets, then (user, user_acc, nupd) of every retired generation still kept. A building
        generation is left alone (its builder checks its row count at publish); if it holds the user, the LMF
        worker replays the erase event into it once it is live (its snapshot offsets precede the event)."""
        km = self.keys
        others = [x for x in self.generations() if x != g]
        if others:
            p = self.r.pipeline(transaction=False)
            for x in others:
                p.hget(km.gen_meta(x), "state")
            others = [x for x, state in zip(others, p.execute()) if state == b"retired"]
        users = [str(u) for u in erase]
        keys = [km.erased, *(km.seen(u) for u in users)]
        for x in others:
            keys += [km.vectors(x, "user"), km.vectors(x, "user_acc"), km.updates(x)]
        args: list[Any] = [len(users), first_key, RETENTION_MS, len(others), first_key + 1 + len(users)]
        for n, u in enumerate(users):
            args += [u, erased_digest(u), int(erase[u]), first_key + 1 + n]
        return keys, args

    def erased_users(self) -> dict[str, int]:
        """Every tombstone: ``stream.erasure.erased_digest(user) -> erased_at_ms`` (ZSCAN)."""
        return {d.decode(): int(t) for d, t in self.r.zscan_iter(self.keys.erased, count=_CHUNK)}

    def _absolute(self, b: BatchWrite, iids: Sequence[str], w: int, n_acc: int) -> list[Any]:
        """The versions, absolute rows and absolute accumulators of ``b`` as script arguments ([] without)."""
        if b.item_versions is None or not iids:
            return []
        vers = np.asarray(b.item_versions, np.int64).copy()
        rows = np.asarray(b.item_rows if b.item_rows is not None else (), np.float32).reshape(-1, w)
        acc = np.asarray(b.item_acc if b.item_acc is not None else np.zeros((0, ACC_WIDTH)), np.float32)
        if vers.shape != (len(iids),) or rows.shape[0] != len(iids) or acc.shape != (n_acc, ACC_WIDTH):
            raise StoreSchemaError(
                f"item_versions ({vers.size}), item_rows ({rows.shape[0]}) and item_acc ({len(acc)}) must have "
                f"one entry per item id ({len(iids)}; {n_acc} accumulators); pass them together or not at all"
            )
        # a row whose sum overflows: left to the add (which refuses it)
        bad = np.asarray(~np.isfinite(rows).all(axis=1), np.bool_)
        bad[:n_acc] |= np.asarray(~np.isfinite(acc).all(axis=1), np.bool_)
        if bad.any():
            zero = np.float32(0)
            vers[bad], rows, acc = -1, np.where(bad[:, None], zero, rows), np.where(bad[:n_acc, None], zero, acc)
        rows_blob, acc_blob = encode_joined(rows, w, iids), encode_joined(acc, ACC_WIDTH, iids[:n_acc])
        return [",".join(map(str, vers.tolist())), rows_blob, acc_blob]

    def _status(self, code: int, detail: Any, g: int, b: BatchWrite) -> ApplyStatus:
        if code == 1:
            return ApplyStatus.APPLIED
        if code == 0:
            log.info("stale batch partition=%s expected applied offset %s, Redis has %s; nothing written",
                     b.partition, b.expected_offset, _s(detail) or None)  # fmt: skip
            return ApplyStatus.STALE
        if code == -1:
            log.info("generation %s is no longer live (live=%s); batch for partition %s not written",
                     g, _s(detail), b.partition)  # fmt: skip
            return ApplyStatus.NEW_GENERATION
        if code == -6:
            log.info("generation %s popularity reference is %s, the batch used %s; not written",
                     g, _s(detail), b.pop_ref_ms)  # fmt: skip
            return ApplyStatus.POPULARITY_MOVED
        _raise_lua(code, detail, self.width)
        raise AssertionError(code)  # pragma: no cover

    def rescale_popularity(self, g: int, old_ref_ms: int, new_ref_ms: int, half_life_ms: int) -> bool:
        """Move generation ``g``'s decayed popularity to the reference time ``new_ref_ms`` (scores times
        ``2^-((new - old) / half_life)``), atomically; False if another writer moved it first."""
        factor = 2.0 ** (-(new_ref_ms - old_ref_ms) / half_life_ms)
        code, _ = self._rescale(
            keys=[self.keys.gen_meta(g), self.keys.popularity(g)], args=[int(old_ref_ms), int(new_ref_ms), factor]
        )
        return bool(code == 1)

    # ------------------------------------------------------------------ bulk writes (ALS, tools)
    def begin_generation(
        self, source: Literal["als", "online"] = "als", pop_half_life_ms: int = DAY_MS, lease_s: float = LEASE_S
    ) -> int:
        """Allocate generation ``next_gen + 1`` in state ``building`` and return its number.

        The builder holds a lease on it (``g:<g>:lease``, expiring after ``lease_s``) that it renews with
        :meth:`renew_lease` while it writes; a building generation whose lease expired was abandoned (its
        builder was killed) and :meth:`gc_generations` drops it at once.
        """
        self.meta()
        km, now = self.keys, _num(self._clock())
        g = int(self.r.hincrby(km.meta, "next_gen", 1))
        p = self.r.pipeline(transaction=True)
        p.hset(km.gen_meta(g), mapping={**_new_generation(source, now, pop_half_life_ms, complete=False), "lease": 1})
        p.set(km.lease(g), self.owner, px=int(lease_s * 1000))
        p.zadd(km.gens, {str(g): g})
        p.execute()
        log.info("generation %s begun (source=%s, lease %.0fs held by %s) namespace=%s", g, source, lease_s,
                 self.owner, km.ns)  # fmt: skip
        return g

    def renew_lease(self, g: int, lease_s: float = LEASE_S) -> None:
        """Extend the lease on building generation ``g``; :class:`GenerationError` if it already expired
        (another process may have collected the generation as abandoned: stop building it)."""
        if not self.r.set(self.keys.lease(g), self.owner, px=int(lease_s * 1000), xx=True):
            raise GenerationError(
                f"the lease on building generation {g} of model {self.keys.ns!r} expired (nothing renewed it for "
                f"{lease_s:.0f}s); it may have been collected as abandoned: nothing is published from it"
            )

    def lease_holder(self, g: int) -> str | None:
        """Who holds the lease on building generation ``g`` (``host:pid``), None when nobody does."""
        return _s(self.r.get(self.keys.lease(g)))

    def write_vectors(
        self,
        g: int,
        table: Table,
        ids: Sequence[str],
        matrix: npt.NDArray[np.float32],
        chunk: int = _CHUNK,
        pipeline: redis.client.Pipeline | None = None,
    ) -> None:
        """HSET rows (absolute, ``(n, k + 1)``; ``(n, 2)`` for ``*_acc``) in chunks; on ``pipeline`` if given."""
        ids = [str(i) for i in ids]
        blobs = encode(matrix, self._width(table), ids)
        _same_len("ids", ids, blobs, "matrix")
        key = self.keys.vectors(g, table)
        for c in range(0, len(ids), chunk):
            p = pipeline if pipeline is not None else self.r.pipeline(transaction=False)
            p.hset(key, mapping=dict(zip(ids[c : c + chunk], blobs[c : c + chunk])))
            if pipeline is None:
                p.execute()

    def write_counts(
        self, g: int, counts: Mapping[str, float], chunk: int = _CHUNK, pipeline: redis.client.Pipeline | None = None
    ) -> None:
        """ZADD absolute item counts (ALS seeds a generation's popularity from its snapshot)."""
        self._zadd(self.keys.counts(g), counts, f"item counts for generation {g}", chunk, pipeline)

    def write_popularity(self, g: int, scores: Mapping[str, float], ref_ms: int, chunk: int = _CHUNK) -> None:
        """ZADD decayed popularity scores relative to ``ref_ms`` and record the reference in the meta."""
        self._zadd(self.keys.popularity(g), scores, f"popularity for generation {g}", chunk, None)
        self.r.hset(self.keys.gen_meta(g), "pop_ref_ms", int(ref_ms))

    def _zadd(self, key: str, values: Mapping[str, float], what: str, chunk: int, pipeline: Any) -> None:
        items = [(str(i), float(c)) for i, c in values.items()]
        if not all(math.isfinite(c) for _, c in items):
            raise ModelDiverged(f"{what} hold NaN/inf; refused")
        for c in range(0, len(items), chunk):
            p = pipeline if pipeline is not None else self.r.pipeline(transaction=False)
            p.zadd(key, dict(items[c : c + chunk]))
            if pipeline is None:
                p.execute()

    def write_offsets(
        self,
        g: int,
        offsets: Mapping[int, int],
        watermarks: Mapping[int, Mapping[str, Any]],
        pipeline: redis.client.Pipeline | None = None,
    ) -> None:
        """HSET applied offsets and dedupe watermarks per partition (publish also does this atomically)."""
        p = pipeline if pipeline is not None else self.r.pipeline(transaction=True)
        if offsets:
            p.hset(self.keys.offsets(g), mapping={str(int(a)): int(b) for a, b in offsets.items()})
        if watermarks:
            p.hset(
                self.keys.watermarks(g),
                mapping={str(int(a)): json.dumps(dict(b), sort_keys=True) for a, b in watermarks.items()},
            )
        if pipeline is None:
            p.execute()

    def publish_generation(
        self,
        g: int,
        offsets: Mapping[int, int],
        watermarks: Mapping[int, Mapping[str, Any]],
        bias: float,
        n_users: int,
        n_items: int,
        scale: float = 1.0,
    ) -> None:
        """Atomically flip ``live_gen`` to the building generation ``g`` (one Lua script).

        Refused (:class:`GenerationError`, nothing written) unless ``g`` is ``building`` and holds exactly
        ``n_users`` user and ``n_items`` item rows. On success ``g`` gets its global row (bias ``bias``),
        becomes complete with ``bias``, ``scale`` and its snapshot ``offsets``/``watermarks`` (also stored as
        its applied offsets, the LMF fence), and the previous live generation is marked retired.
        """
        if not (math.isfinite(bias) and math.isfinite(scale) and scale > 0):
            raise ModelDiverged(f"generation {g} calibration bias {bias} / scale {scale}; refused to publish")
        km, now = self.keys, _num(self._clock())
        offs = {str(int(a)): int(b) for a, b in offsets.items()}
        wms = {str(int(a)): dict(b) for a, b in watermarks.items()}
        flat: list[Any] = []
        for part in sorted(set(offs) | set(wms)):
            flat += [part, offs.get(part, ""), json.dumps(wms[part], sort_keys=True) if part in wms else ""]
        glob = np.zeros((1, self.width), np.float32)
        glob[0, -1] = bias
        code, detail = 0, ""
        for _ in range(5):
            prev = self.live_generation()
            keys = [km.meta, km.gen_meta(g), km.vectors(g, "user"), km.vectors(g, "item"), km.offsets(g)]
            keys += [km.watermarks(g), km.gen_meta(prev)]
            args: list[Any] = [g, prev, int(n_users), int(n_items), _num(bias), json.dumps(offs, sort_keys=True)]
            args += [json.dumps(wms, sort_keys=True), now, _num(scale), encode_joined(glob, self.width, ["global"])]
            code, detail = self._publish(keys=keys, args=[*args, *flat])
            if code == 1:
                log.info("generation %s published (was %s) namespace=%s n_users=%s n_items=%s",
                         g, prev, km.ns, n_users, n_items)  # fmt: skip
                self.r.unlink(km.lease(g))
                return
            if code != -1:
                break
        what = {
            -1: f"live_gen kept changing (now {_s(detail)})",
            -2: f"its state is {_s(detail)}, not building",
            -3: f"it holds {_s(detail)} user rows, expected n_users={n_users}",
            -4: f"it holds {_s(detail)} item rows, expected n_items={n_items}",
        }[code]
        raise GenerationError(
            f"generation {g} not published: {what}; write all vectors of a fresh "
            "begin_generation() before publishing (nothing was changed)"
        )

    def drop_generation(self, g: int) -> None:
        """UNLINK every key of generation ``g``; :class:`GenerationError` if ``g`` is live."""
        km = self.keys
        if not self._drop(keys=[km.meta, km.gens, *km.generation_keys(g)], args=[int(g)]):
            raise GenerationError(f"generation {g} is live in model {km.ns!r}; publish another first")
        log.info("generation %s dropped namespace=%s", g, km.ns)

    def gc_generations(self, grace_seconds: float, now: float | None = None) -> list[int]:
        """Drop retired generations retired more than ``grace_seconds`` ago and abandoned building ones.

        A building generation begun with a lease is abandoned once its lease has expired (its builder died)
        and is dropped at once; one with a live lease is never dropped (another ALS is writing it). A building
        generation without a lease (begun by an older zerocf) is dropped ``grace_seconds`` after it was begun.
        """
        now = self._clock() if now is None else now
        live, dropped = self.live_generation(), []
        for g in self.generations():
            if g == live:
                continue
            try:
                gm = self.generation_meta(g)
            except GenerationError:
                continue
            since = gm.retired_at if gm.state == "retired" else gm.created_at
            if gm.state == "building" and self.r.hexists(self.keys.gen_meta(g), "lease"):
                holder = self.lease_holder(g)
                if holder is not None:
                    log.info("generation %s is being built by %s (lease held): not collected", g, holder)
                    continue
                since = -math.inf  # abandoned: its builder's lease expired
            if gm.state in ("retired", "building") and since is not None and now - since >= grace_seconds:
                try:
                    self.drop_generation(g)
                    dropped.append(g)
                except GenerationError:  # it went live meanwhile
                    continue
        return dropped

    # ------------------------------------------------------------------ popularity, counters, seen
    def top_items(self, g: int, n: int) -> list[tuple[str, float]]:
        """The ``n`` most clicked items of generation ``g`` (all-time counts), highest first."""
        rows = self.r.zrevrange(self.keys.counts(g), 0, n - 1, withscores=True) if n > 0 else []
        return [(i.decode(), float(c)) for i, c in rows]

    def popular_items(self, g: int, n: int) -> list[tuple[str, float]]:
        """The ``n`` items of generation ``g`` with the highest time-decayed popularity (the fallback), highest
        first; all-time counts where the generation has no decayed popularity yet."""
        rows = self.r.zrevrange(self.keys.popularity(g), 0, n - 1, withscores=True) if n > 0 else []
        return [(i.decode(), float(c)) for i, c in rows] if rows else self.top_items(g, n)

    def item_counts(self, g: int) -> dict[str, float]:
        """Every item count of generation ``g`` (ZSCAN)."""
        return {i.decode(): float(c) for i, c in self.r.zscan_iter(self.keys.counts(g), count=_CHUNK)}

    def item_popularity(self, g: int) -> dict[str, float]:
        """Every item's decayed popularity in generation ``g`` (ZSCAN), relative to its ``pop_ref_ms``."""
        return {i.decode(): float(c) for i, c in self.r.zscan_iter(self.keys.popularity(g), count=_CHUNK)}

    def user_update_counts(self, g: int, users: Sequence[str] | None = None) -> dict[str, int]:
        """Events applied per user in generation ``g`` (all users when ``users`` is None; 0 if none)."""
        key = self.keys.updates(g)
        if users is None:
            return {u.decode(): int(n) for u, n in self.r.hgetall(key).items()}
        vals = self.r.hmget(key, list(users)) if users else []
        return {u: int(n or 0) for u, n in zip(users, vals)}

    def add_seen(self, seen: Iterable[tuple[str, str, int]], pipeline: redis.client.Pipeline | None = None) -> None:
        """Record ``(user, item, ts_ms)`` clicks in the users' seen sets (the batch write's Lua code)."""
        keys, args = self._seen_groups(seen, None, first_key=1)
        if keys:
            self._seen_add(
                keys=keys,
                args=[self.seen_cap, self.seen_ttl, self.seen_ttl * 1000, *args],
                client=pipeline if pipeline is not None else self.r,
            )

    def _seen_groups(self, seen: Iterable[tuple[str, str, int]], upkeep: Mapping[str, int] | None, first_key: int
                     ) -> tuple[list[str], list[Any]]:  # fmt: skip
        """Seen keys (KEYS from ``first_key``) and the batch script's per-user groups ``(KEYS index, flags, m,
        (ts, item) * m)`` (``lua._SEEN_GROUPS_LIB``); flags from ``upkeep`` (absent: prune and expire)."""
        by_user: dict[str, list[Any]] = {}
        for user, item, ts in seen:
            by_user.setdefault(str(user), []).extend((int(ts), str(item)))
        keys: list[str] = []
        args: list[Any] = []
        for n, (user, pairs) in enumerate(by_user.items()):
            keys.append(self.keys.seen(user))
            flags = SEEN_PRUNE | SEEN_EXPIRE if upkeep is None else upkeep.get(user, 0)
            args += [first_key + n, flags, len(pairs) // 2, *pairs]
        return keys, args

    def seen_items(self, user: str, limit: int | None = None) -> list[str]:
        """The user's seen items, newest first (at most ``limit``)."""
        if limit is not None and limit <= 0:
            return []
        return [i.decode() for i in self.r.zrevrange(self.keys.seen(str(user)), 0, _end(limit))]

    def seen_items_many(self, users: Sequence[str], limit: int | None = None) -> dict[str, list[str]]:
        """:meth:`seen_items` for many users in one pipelined round trip."""
        if limit is not None and limit <= 0:
            return {str(u): [] for u in users}
        p = self.r.pipeline(transaction=False)
        for u in users:
            p.zrevrange(self.keys.seen(str(u)), 0, _end(limit))
        return {str(u): [i.decode() for i in rows] for u, rows in zip(users, p.execute())}

    def user_rows_and_seen(self, g: int, users: Sequence[str], limit: int | None = None
                           ) -> tuple[F32, npt.NDArray[np.bool_], dict[str, list[str]]]:  # fmt: skip
        """:meth:`get_vectors` of ``users`` (generation ``g``) and :meth:`seen_items_many` in ONE pipelined round
        trip: what a lookup reads per request (two round trips doubled its tail latency on a busy machine)."""
        if not users:
            return np.zeros((0, self.width), np.float32), np.zeros(0, np.bool_), {}
        p = self.r.pipeline(transaction=False)
        p.hmget(self.keys.vectors(g, "user"), [str(u) for u in users])
        seen = limit is None or limit > 0
        for u in users if seen else ():
            p.zrevrange(self.keys.seen(str(u)), 0, _end(limit))
        rows, *lists = p.execute()
        vecs, found = decode(rows, self.width, users)
        return vecs, found, {str(u): [i.decode() for i in got] for u, got in zip(users, lists)} if seen else {}

    # ------------------------------------------------------------------ live quality (workers.online.quality)
    def write_quality(self, worker: str, doc: Mapping[str, Any], ttl_s: float) -> None:
        """Store one LMF worker's live-quality figures ``doc`` (JSON) for ``ttl_s`` seconds and list the worker
        in ``quality`` (scored with now); workers that published nothing for ``ttl_s`` leave the listing. One
        round trip."""
        now, ttl = self._clock(), max(1, math.ceil(ttl_s))
        index = self.keys.quality_workers
        p = self.r.pipeline(transaction=False)
        p.set(self.keys.quality(worker), json.dumps(doc, separators=(",", ":"), sort_keys=True), ex=ttl)
        p.zadd(index, {worker: now})
        p.zremrangebyscore(index, "-inf", now - ttl)
        p.expire(index, ttl)
        p.execute()

    def read_quality(self) -> list[dict[str, Any]]:
        """The live-quality figures of every LMF worker whose key has not expired, in worker-id order (read
        only: a listed worker whose figures expired is skipped; the writers prune the listing)."""
        workers = [w.decode() for w in self.r.zrange(self.keys.quality_workers, 0, -1)]
        if not workers:
            return []
        p = self.r.pipeline(transaction=False)
        for w in workers:
            p.get(self.keys.quality(w))
        out = []
        for w, raw in sorted(zip(workers, p.execute())):
            try:
                doc = json.loads(raw) if raw is not None else None
            except ValueError:
                log.warning("live-quality figures of worker %s are not JSON; skipped", w)
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out


def _new_generation(source: str, now: str, pop_half_life_ms: int, *, complete: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"state": "complete" if complete else "building", "source": source, "created_at": now}
    meta |= {"n_users": 0, "n_items": 0, "bias": "0.0", "scale": "1.0", "offsets": "{}", "watermarks": "{}"}
    meta |= {"pop_ref_ms": 0, "pop_half_life_ms": int(pop_half_life_ms)}
    if complete:
        meta["published_at"] = now
    return meta


def _acc_blob(values: npt.NDArray[np.float32] | None, ids: Sequence[str], name: str) -> bytes:
    """The accumulators of ``ids`` (``(n, 2)``) as one joined buffer; b"" when ``values`` is None."""
    if values is None:
        return b""
    arr = np.asarray(values, np.float32)
    if arr.ndim != 2 or arr.shape[1] != ACC_WIDTH:
        raise ValueError(f"{name} must have shape (n, {ACC_WIDTH}), got {arr.shape}")
    _same_len("ids", ids, range(arr.shape[0]), name)
    return encode_joined(arr, ACC_WIDTH, ids)


def _versions(values: Sequence[bytes | None]) -> npt.NDArray[np.int64]:
    return np.array([0 if v is None else int(v) for v in values], np.int64)


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _f(v: bytes | None) -> float | None:
    return None if v is None or v == b"" else float(v)


def _num(x: float) -> str:
    return repr(float(x))


def _end(limit: int | None) -> int:
    return -1 if limit is None else int(limit) - 1


def _pairs(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    out: list[Any] = [None] * (2 * len(a))
    out[0::2], out[1::2] = a, b
    return out


def _same_len(na: str, a: Sequence[Any], b: Sequence[Any], nb: str) -> None:
    if len(a) != len(b):
        raise StoreSchemaError(f"{na} has {len(a)} ids but {nb} has {len(b)} rows; pass one row per id")


def _raise_lua(code: int, detail: Any, width: int) -> None:
    if code == -2:
        raise ModelDiverged(
            f"adding the delta to item {_s(detail)!r} overflows float32; refused, nothing "
            "written. Lower the learning rate or clip gradients"
        )
    if code == -5:
        raise StoreSchemaError(
            f"batch {_s(detail)} rows do not hold n * {4 * width} bytes (k={width - 1} + bias); are the "
            "worker and the store module from the same zerocf version?"
        )
    if code == -3:
        raise StoreSchemaError(
            f"stored item row {_s(detail)!r} is not {4 * width} bytes (k={width - 1} + bias); the model "
            "was written with another k; set ZEROCF_FACTORS to the model's k or use another "
            "ZEROCF_TOPIC_PREFIX"
        )
    if code == -7:
        raise StoreSchemaError(
            f"stored item accumulator {_s(detail)!r} is not 8 bytes (2 AdaGrad sums); the model was written "
            "by another zerocf version; rebuild it with `zerocf als --once --rebuild`"
        )
    raise StoreSchemaError(f"unexpected store script result {code} {detail!r}; check the Redis version (>= 6.2)")
