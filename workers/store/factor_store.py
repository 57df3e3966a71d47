"""The Redis factor store: reads and writes of one model's factors, generations, offsets, counts, seen sets.

Keys come from :mod:`workers.store.keys` (callers never format keys; tools and benchmarks read
``store.keys``), values from :mod:`workers.store.codec`, scripts from :mod:`workers.store.lua`.

The hot-path batch write (:meth:`FactorStore.apply_batch`) and generation publish/drop run as Lua scripts
(EVALSHA; redis-py reloads them on NOSCRIPT). They need a real Redis >= 6.2 (``struct`` library,
``ZADD GT``). fakeredis (with ``lupa``) runs the scripts that do not pack floats, so everything but
``apply_batch`` also works on it.

>>> import fakeredis, numpy as np
>>> store = FactorStore(fakeredis.FakeRedis(), namespace="demo")
>>> store.ensure_model(4)
1
>>> store.keys.vectors(1, "user")
'zcf:v1:{demo}:g:1:user'
>>> store.write_vectors(1, "user", ["u1"], np.ones((1, 4), dtype=np.float32))
>>> vecs, found = store.get_vectors(1, "user", ["u1", "nobody"])
>>> vecs.dtype, vecs.shape, found.tolist()
(dtype('float32'), (2, 4), [True, False])
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import redis

from stream.config import redact_url
from stream.errors import ConfigError, ServiceUnavailable
from workers.errors import GenerationError, ModelDiverged, StoreSchemaError
from workers.store.codec import DTYPE, decode, encode, encode_joined
from workers.store.keys import SCHEMA_VERSION, TABLES, Keys, Table
from workers.store.lua import APPLY_BATCH_LUA, DROP_LUA, PUBLISH_LUA, SEEN_ADD_LUA, SEEN_MANY_LUA

log = logging.getLogger(__name__)

_CHUNK = 1000

__all__ = ["ApplyStatus", "BatchState", "FactorStore", "GenerationMeta", "ModelMeta"]


# ----------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ModelMeta:
    """The model meta hash."""

    schema_version: int
    k: int
    dtype: str
    live_gen: int
    next_gen: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class GenerationMeta:
    """One generation's meta hash. ``offsets``: events partition -> last offset its snapshot covers."""

    g: int
    state: str
    source: str
    created_at: float
    n_users: int
    n_items: int
    bias: float
    offsets: dict[int, int]
    watermarks: dict[int, dict[str, Any]]
    published_at: float | None
    retired_at: float | None


@dataclass(frozen=True, eq=False)
class BatchState:
    """Everything an LMF batch reads, fetched in one round trip by :meth:`FactorStore.read_batch_state`.

    ``offsets[p]`` is the partition's last applied offset (None: nothing applied yet in this generation);
    ``*_acc`` are None unless accumulators were requested.
    """

    live_gen: int
    user_vecs: npt.NDArray[np.float32]
    user_found: npt.NDArray[np.bool_]
    item_vecs: npt.NDArray[np.float32]
    item_found: npt.NDArray[np.bool_]
    offsets: dict[int, int | None]
    watermarks: dict[int, dict[str, Any]]
    user_acc: npt.NDArray[np.float32] | None = None
    user_acc_found: npt.NDArray[np.bool_] | None = None
    item_acc: npt.NDArray[np.float32] | None = None
    item_acc_found: npt.NDArray[np.bool_] | None = None
    seen: dict[str, list[str]] | None = None  # recent clicks (newest first) of the ``seen_users`` asked for


class ApplyStatus(IntEnum):
    """Outcome of :meth:`FactorStore.apply_batch`; only ``APPLIED`` is truthy.

    >>> bool(ApplyStatus.APPLIED), bool(ApplyStatus.STALE), bool(ApplyStatus.NEW_GENERATION)
    (True, False, False)
    """

    APPLIED = 1
    STALE = 0  # the offset fence failed: nothing written; reseek to the stored offset + 1
    NEW_GENERATION = -1  # live_gen is no longer g: nothing written; seek to the new generation's offsets

    def __bool__(self) -> bool:
        return self is ApplyStatus.APPLIED


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _f(v: bytes | None) -> float | None:
    return None if v is None or v == b"" else float(v)


def _num(x: float) -> str:
    return repr(float(x))


# ----------------------------------------------------------------------------------------------- store
class FactorStore:
    """Read and write one model's factors, generations, offsets, counts and seen sets in Redis.

    Parameters
    ----------
    client : redis.Redis
        A client with ``decode_responses=False`` (blobs are bytes).
    namespace : str
        The topic prefix; every key carries the hash tag ``{namespace}``.
    seen_cap, seen_ttl : int
        Per-user recent clicks keep the newest ``seen_cap`` items and expire ``seen_ttl`` seconds after
        the user's last click.
    clock : callable
        Returns epoch seconds (tests inject a fixed clock).
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "zerocf",
        *,
        seen_cap: int = 200,
        seen_ttl: int = 30 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        pool = getattr(client, "connection_pool", None)
        if pool is not None and pool.connection_kwargs.get("decode_responses"):
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
        self._apply = client.register_script(APPLY_BATCH_LUA)
        self._publish = client.register_script(PUBLISH_LUA)
        self._drop = client.register_script(DROP_LUA)
        self._seen_many = client.register_script(SEEN_MANY_LUA)
        self._seen_add = client.register_script(SEEN_ADD_LUA)

    @classmethod
    def from_url(cls, url: str, namespace: str = "zerocf", **kw: Any) -> FactorStore:
        """Connect with a ``redis://`` / ``rediss://`` (TLS) URL; a password may be in the URL.

        ``kw`` goes to :class:`FactorStore` (``seen_cap``, ``seen_ttl``, ``clock``) or else to
        :meth:`redis.Redis.from_url` (e.g. ``ssl_ca_certs``, ``socket_timeout``).
        """
        own = {n: kw.pop(n) for n in ("seen_cap", "seen_ttl", "clock") if n in kw}
        log.info("connecting factor store %s namespace=%s", redact_url(url), namespace)
        client = redis.Redis.from_url(url, decode_responses=False, **kw)
        return cls(client, namespace, **own)

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
        store = cls.from_url(url, namespace, **kw)
        where = redact_url(url)
        try:
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
        """The model's k (read once from Redis, immutable for a model)."""
        if self._k is None:
            self._k = self.meta().k
        return self._k

    def ensure_model(self, k: int) -> int:
        """Create the model (meta + generation 1, complete, source online) if absent; return ``live_gen``.

        Raises :class:`StoreSchemaError` when the stored model has another k, dtype or schema version.
        """
        if int(k) < 1:
            raise StoreSchemaError(f"k={k} must be >= 1; pass --factors with a positive value")
        km, now = self.keys, _num(self._clock())

        def create(pipe: redis.client.Pipeline) -> None:
            if pipe.exists(km.meta):
                return
            pipe.multi()
            pipe.hset(
                km.meta,
                mapping={
                    "schema_version": SCHEMA_VERSION,
                    "k": int(k),
                    "dtype": DTYPE,
                    "live_gen": 1,
                    "next_gen": 1,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            pipe.hset(
                km.gen_meta(1),
                mapping={
                    "state": "complete",
                    "source": "online",
                    "created_at": now,
                    "published_at": now,
                    "n_users": 0,
                    "n_items": 0,
                    "bias": "0.0",
                    "offsets": "{}",
                    "watermarks": "{}",
                },
            )
            pipe.zadd(km.gens, {"1": 1})

        self.r.transaction(create, km.meta)
        m = self.meta()
        ns = self.keys.ns
        if m.schema_version != SCHEMA_VERSION or m.dtype != DTYPE:
            raise StoreSchemaError(
                f"redis model {ns} has schema_version={m.schema_version} dtype={m.dtype}, "
                f"this zerocf reads schema_version={SCHEMA_VERSION} dtype={DTYPE}; "
                "upgrade zerocf or use another ZEROCF_TOPIC_PREFIX"
            )
        if m.k != int(k):
            raise StoreSchemaError(
                f"redis model {ns} has k={m.k}, worker configured k={k}; rerun with "
                f"--factors {m.k} (ZEROCF_FACTORS={m.k}), or start a new model under another ZEROCF_TOPIC_PREFIX "
                "(a model's k is fixed; see docs/production.md, upgrading)"
            )
        self._k = m.k
        return m.live_gen

    def meta(self) -> ModelMeta:
        """Read the model meta hash; :class:`StoreSchemaError` if there is no model."""
        raw = {_s(a): b for a, b in self.r.hgetall(self.keys.meta).items()}
        if not raw:
            raise StoreSchemaError(
                f"no zerocf model in Redis under namespace {self.keys.ns!r}; start "
                "`zerocf lmf` or run `zerocf als --once` first, or check --prefix"
            )
        return ModelMeta(
            int(raw["schema_version"]),
            int(raw["k"]),
            raw["dtype"].decode(),
            int(raw["live_gen"]),
            int(raw["next_gen"]),
            float(raw["created_at"]),
            float(raw["updated_at"]),
        )

    def live_generation(self) -> int:
        """The live generation number (one HGET)."""
        v = self.r.hget(self.keys.meta, "live_gen")
        if v is None:
            self.meta()  # raises the instructive error
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
        )

    def generations(self) -> list[int]:
        """Every generation with a meta hash (building, complete or retired), ascending."""
        return [int(g) for g in self.r.zrange(self.keys.gens, 0, -1)]

    # ------------------------------------------------------------------ vector reads
    def get_vectors(
        self, g: int, table: Table, ids: Sequence[str]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Fetch rows for ``ids`` with one HMGET: ``(n, k)`` float32 (zeros where absent) and found mask."""
        if not ids:
            return np.zeros((0, self.k), dtype=np.float32), np.zeros(0, dtype=np.bool_)
        return decode(self.r.hmget(self.keys.vectors(g, table), list(ids)), self.k, ids)

    def get_all_items(self, g: int, chunk: int = _CHUNK) -> tuple[list[str], npt.NDArray[np.float32]]:
        """Every item vector of generation ``g`` via HSCAN (order unspecified, ids aligned with rows)."""
        rows = dict(self.r.hscan_iter(self.keys.vectors(g, "item"), count=chunk))
        ids = [i.decode() for i in rows]
        return ids, decode(list(rows.values()), self.k, ids)[0]

    def item_count(self, g: int) -> int:
        """Number of item vectors in generation ``g`` (HLEN)."""
        return int(self.r.hlen(self.keys.vectors(g, "item")))

    def read_batch_state(
        self,
        g: int,
        partitions: Sequence[int],
        users: Sequence[str],
        items: Sequence[str],
        *,
        accumulators: bool = False,
        seen_users: Sequence[str] = (),
        seen_limit: int | None = None,
    ) -> BatchState:
        """One pipelined round trip: live_gen, user/item rows, applied offsets + watermarks (+ AdaGrad,
        + the recent clicks of ``seen_users``, read by one Lua call; needs a real Redis)."""
        km, k = self.keys, self.k
        p = self.r.pipeline(transaction=False)
        p.hget(km.meta, "live_gen")
        parts = [str(int(x)) for x in partitions]
        tables = ["user", "item"] + (["user_acc", "item_acc"] if accumulators else [])
        idlists = [list(users), list(items)] * (2 if accumulators else 1)
        for table, ids in zip(tables, idlists):
            if ids:
                p.hmget(km.vectors(g, table), ids)
        if parts:
            p.hmget(km.offsets(g), parts)
            p.hmget(km.watermarks(g), parts)
        seen_users = [str(u) for u in seen_users]
        if seen_users:
            self._seen_many(keys=[km.seen(u) for u in seen_users], args=[_end(seen_limit)], client=p)
        res = iter(p.execute())
        live = next(res)
        if live is None:
            self.meta()
        mats: dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]] = {}
        for table, ids in zip(tables, idlists):
            mats[table] = decode(next(res) if ids else [], k, ids)
        offs = next(res) if parts else []
        wms = next(res) if parts else []
        seen = {u: [i.decode() for i in rows] for u, rows in zip(seen_users, next(res))} if seen_users else None
        return BatchState(
            live_gen=int(live),
            user_vecs=mats["user"][0],
            user_found=mats["user"][1],
            item_vecs=mats["item"][0],
            item_found=mats["item"][1],
            offsets={int(pp): (None if o is None else int(o)) for pp, o in zip(parts, offs)},
            watermarks={int(pp): json.loads(w) for pp, w in zip(parts, wms) if w is not None},
            seen=seen,
            user_acc=mats["user_acc"][0] if accumulators else None,
            user_acc_found=mats["user_acc"][1] if accumulators else None,
            item_acc=mats["item_acc"][0] if accumulators else None,
            item_acc_found=mats["item_acc"][1] if accumulators else None,
        )

    # ------------------------------------------------------------------ hot-path writes (Lua)
    def apply_batch(
        self,
        g: int,
        partition: int,
        expected_offset: int | None,
        new_offset: int,
        watermarks: Mapping[str, Any],
        user_ids: Sequence[str],
        user_vecs: npt.NDArray[np.float32],
        item_ids: Sequence[str],
        item_deltas: npt.NDArray[np.float32],
        *,
        counts: Mapping[str, float] | None = None,
        user_increments: Mapping[str, int] | None = None,
        seen: Iterable[tuple[str, str, int]] = (),
        user_acc: npt.NDArray[np.float32] | None = None,
        item_acc_deltas: npt.NDArray[np.float32] | None = None,
    ) -> ApplyStatus:
        """Atomically apply one LMF batch to generation ``g`` (one EVALSHA); see docs/redis-schema.md.

        Writes happen only if ``live_gen == g`` (else ``NEW_GENERATION``) and the partition's stored
        applied offset equals ``expected_offset`` (absent when None; else ``STALE``). Then: user rows
        (and ``user_acc``) are SET (one writer per user), ``item_deltas`` (and ``item_acc_deltas``) are
        ADDED in float32 to the stored item rows -- an absent item starts from zeros, so pass its initial
        vector as its delta --, ``counts`` ZINCRBY, ``user_increments`` HINCRBY, ``seen`` ``(user, item,
        ts_ms)`` ZADD GT + cap + EXPIRE, then the partition's offset and dedupe ``watermarks`` are stored.
        Raises :class:`ModelDiverged` for NaN/inf input or a float32 overflow (nothing written).
        """
        k = self.k
        user_ids, item_ids = [str(u) for u in user_ids], [str(i) for i in item_ids]
        ublob = encode_joined(user_vecs, k, user_ids)
        iblob = encode_joined(item_deltas, k, item_ids)
        _same_len("user_ids", user_ids, range(len(ublob) // (4 * k)), "user_vecs")
        _same_len("item_ids", item_ids, range(len(iblob) // (4 * k)), "item_deltas")
        uacc = encode_joined(user_acc, k, user_ids) if user_acc is not None else b""
        iacc = encode_joined(item_acc_deltas, k, item_ids) if item_acc_deltas is not None else b""
        n_uacc, n_iacc = len(uacc) // (4 * k), len(iacc) // (4 * k)
        if user_acc is not None:
            _same_len("user_ids", user_ids, range(n_uacc), "user_acc")
        if item_acc_deltas is not None:
            _same_len("item_ids", item_ids, range(n_iacc), "item_acc_deltas")
        counts = dict(counts or {})
        if not all(math.isfinite(c) for c in counts.values()):
            raise ModelDiverged(f"batch for partition {partition} has a non-finite item count; refused")
        km = self.keys
        seen_keys, seen_args = self._seen_args(seen, first_key=10)
        incr = dict(user_increments or {})
        keys = [
            km.meta,
            km.offsets(g),
            km.watermarks(g),
            *(km.vectors(g, kd) for kd in TABLES),
            km.counts(g),
            km.updates(g),
            *seen_keys,
        ]
        args: list[Any] = [
            int(g),
            int(partition),
            "" if expected_offset is None else int(expected_offset),
            int(new_offset),
            json.dumps(dict(watermarks), sort_keys=True),
            k,
            self.seen_cap,
            self.seen_ttl,
            len(user_ids),
            len(item_ids),
            len(counts),
            len(incr),
            len(seen_args) // 3,
            n_uacc,
            n_iacc,
        ]
        args += [*user_ids, ublob, *item_ids, iblob]
        args += _pairs(list(counts), [_num(c) for c in counts.values()])
        args += _pairs(list(incr), [int(n) for n in incr.values()]) + seen_args
        args += [*user_ids[:n_uacc], uacc, *item_ids[:n_iacc], iacc]
        code, detail = self._apply(keys=keys, args=args)
        return self._status(code, detail, g, partition, expected_offset)

    def _status(self, code: int, detail: Any, g: int, partition: int, expected: int | None) -> ApplyStatus:
        if code == 1:
            return ApplyStatus.APPLIED
        if code == 0:
            log.info(
                "stale batch partition=%s expected applied offset %s, Redis has %s; nothing written",
                partition,
                expected,
                _s(detail) or None,
            )
            return ApplyStatus.STALE
        if code == -1:
            log.info(
                "generation %s is no longer live (live=%s); batch for partition %s not written",
                g,
                _s(detail),
                partition,
            )
            return ApplyStatus.NEW_GENERATION
        _raise_lua(code, detail, self.k)
        raise AssertionError(code)  # pragma: no cover

    # ------------------------------------------------------------------ bulk writes (ALS, tools)
    def begin_generation(self, source: Literal["als", "online"] = "als") -> int:
        """Allocate generation ``next_gen + 1`` in state ``building`` and return its number."""
        self.meta()
        km, now = self.keys, _num(self._clock())
        g = int(self.r.hincrby(km.meta, "next_gen", 1))
        p = self.r.pipeline(transaction=True)
        p.hset(
            km.gen_meta(g),
            mapping={
                "state": "building",
                "source": source,
                "created_at": now,
                "n_users": 0,
                "n_items": 0,
                "bias": "0.0",
                "offsets": "{}",
                "watermarks": "{}",
            },
        )
        p.zadd(km.gens, {str(g): g})
        p.execute()
        log.info("generation %s begun (source=%s) namespace=%s", g, source, km.ns)
        return g

    def write_vectors(
        self,
        g: int,
        table: Table,
        ids: Sequence[str],
        matrix: npt.NDArray[np.float32],
        chunk: int = _CHUNK,
        pipeline: redis.client.Pipeline | None = None,
    ) -> None:
        """HSET rows (absolute) in chunks of ``chunk`` rows; queued on ``pipeline`` when given."""
        ids = [str(i) for i in ids]
        blobs = encode(matrix, self.k, ids)
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
        items = [(str(i), float(c)) for i, c in counts.items()]
        if not all(math.isfinite(c) for _, c in items):
            raise ModelDiverged(f"item counts for generation {g} hold NaN/inf; refused")
        for c in range(0, len(items), chunk):
            p = pipeline if pipeline is not None else self.r.pipeline(transaction=False)
            p.zadd(self.keys.counts(g), dict(items[c : c + chunk]))
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
    ) -> None:
        """Atomically flip ``live_gen`` to the building generation ``g`` (one Lua script).

        Refused (:class:`GenerationError`, nothing written) unless ``g`` is ``building`` and holds exactly
        ``n_users`` user and ``n_items`` item rows. On success ``g`` becomes complete with ``bias``, its
        snapshot ``offsets``/``watermarks`` (also stored as its applied offsets, the LMF fence), and the
        previous live generation is marked retired.
        """
        if not math.isfinite(bias):
            raise ModelDiverged(f"generation {g} calibration bias is {bias}; refused to publish")
        km, now = self.keys, _num(self._clock())
        offs = {str(int(a)): int(b) for a, b in offsets.items()}
        wms = {str(int(a)): dict(b) for a, b in watermarks.items()}
        flat: list[Any] = []
        for part in sorted(set(offs) | set(wms)):
            flat += [part, offs.get(part, ""), json.dumps(wms[part], sort_keys=True) if part in wms else ""]
        for _ in range(5):
            prev = self.live_generation()
            code, detail = self._publish(
                keys=[
                    km.meta,
                    km.gen_meta(g),
                    km.vectors(g, "user"),
                    km.vectors(g, "item"),
                    km.offsets(g),
                    km.watermarks(g),
                    km.gen_meta(prev),
                ],
                args=[
                    int(g),
                    prev,
                    int(n_users),
                    int(n_items),
                    _num(bias),
                    json.dumps(offs, sort_keys=True),
                    json.dumps(wms, sort_keys=True),
                    now,
                    *flat,
                ],
            )
            if code == 1:
                log.info(
                    "generation %s published (was %s) namespace=%s n_users=%s n_items=%s",
                    g,
                    prev,
                    km.ns,
                    n_users,
                    n_items,
                )
                return
            if code != -1:
                break
        what = {
            -1: f"live_gen kept changing (now {_s(detail)})",
            -2: f"its state is {_s(detail)}, not building",
            -3: f"it holds {detail} user rows, expected n_users={n_users}",
            -4: f"it holds {detail} item rows, expected n_items={n_items}",
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
        """Drop retired generations retired, and building ones created, more than ``grace_seconds`` ago."""
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
            if gm.state in ("retired", "building") and since is not None and now - since >= grace_seconds:
                try:
                    self.drop_generation(g)
                    dropped.append(g)
                except GenerationError:  # it went live meanwhile
                    continue
        return dropped

    # ------------------------------------------------------------------ popularity, counters, seen
    def top_items(self, g: int, n: int) -> list[tuple[str, float]]:
        """The ``n`` most clicked items of generation ``g``, highest count first."""
        rows = self.r.zrevrange(self.keys.counts(g), 0, n - 1, withscores=True) if n > 0 else []
        return [(i.decode(), float(c)) for i, c in rows]

    def item_counts(self, g: int) -> dict[str, float]:
        """Every item count of generation ``g`` (ZSCAN)."""
        return {i.decode(): float(c) for i, c in self.r.zscan_iter(self.keys.counts(g), count=_CHUNK)}

    def user_update_counts(self, g: int, users: Sequence[str] | None = None) -> dict[str, int]:
        """Events applied per user in generation ``g`` (all users when ``users`` is None; 0 if none)."""
        key = self.keys.updates(g)
        if users is None:
            return {u.decode(): int(n) for u, n in self.r.hgetall(key).items()}
        vals = self.r.hmget(key, list(users)) if users else []
        return {u: int(n or 0) for u, n in zip(users, vals)}

    def add_seen(self, seen: Iterable[tuple[str, str, int]], pipeline: redis.client.Pipeline | None = None) -> None:
        """Record ``(user, item, ts_ms)`` clicks in the per-user recent sets (the batch write's Lua code)."""
        keys, args = self._seen_args(seen, first_key=1)
        if keys:
            self._seen_add(
                keys=keys,
                args=[self.seen_cap, self.seen_ttl, *args],
                client=pipeline if pipeline is not None else self.r,
            )

    def _seen_args(self, seen: Iterable[tuple[str, str, int]], first_key: int) -> tuple[list[str], list[Any]]:
        """Seen keys and ``(KEYS index, ts, item)`` triples for the Lua ``add_seen`` (KEYS from ``first_key``)."""
        index: dict[str, int] = {}
        args: list[Any] = []
        for user, item, ts in seen:
            idx = index.setdefault(self.keys.seen(str(user)), first_key + len(index))
            args += [idx, int(ts), str(item)]
        return list(index), args

    def seen_items(self, user: str, limit: int | None = None) -> list[str]:
        """The user's recently clicked items, newest first (at most ``limit``)."""
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


def _end(limit: int | None) -> int:
    return -1 if limit is None else int(limit) - 1


def _pairs(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    out: list[Any] = [None] * (2 * len(a))
    out[0::2], out[1::2] = a, b
    return out


def _same_len(na: str, a: Sequence[Any], b: Sequence[Any], nb: str) -> None:
    if len(a) != len(b):
        raise StoreSchemaError(f"{na} has {len(a)} ids but {nb} has {len(b)} rows; pass one row per id")


def _raise_lua(code: int, detail: Any, k: int) -> None:
    if code == -2:
        raise ModelDiverged(
            f"adding the delta to item {_s(detail)!r} overflows float32; refused, nothing "
            "written. Lower the learning rate or clip gradients"
        )
    if code == -5:
        raise StoreSchemaError(
            f"batch {_s(detail)} vectors do not hold n * {4 * k} bytes (k={k}); are the "
            "worker and the store module from the same zerocf version?"
        )
    if code == -3:
        raise StoreSchemaError(
            f"stored item vector {_s(detail)!r} is not {4 * k} bytes (k={k}); the model "
            "was written with another k; set ZEROCF_FACTORS to the model's k or use another "
            "ZEROCF_TOPIC_PREFIX"
        )
    raise StoreSchemaError(f"unexpected store script result {code} {detail!r}; check the Redis version (>= 6.2)")
