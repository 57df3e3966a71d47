"""Top-k recommendations and P(click) scores over the factor store (the read side of the model).

Model: ``P(click | u, i) = sigmoid(b + b_u + b_i + p_u . q_i)``: rows hold ``k`` latent values then their bias,
``b`` is the generation's global bias. Items rank by ``b_i + p_u . q_i``. :class:`Recommender` keeps the live
generation's item matrix in memory and reads only the user's row (one HMGET) and seen items (one ZREVRANGE)
from Redis per request; the rest is one float32 matrix-vector product and an ``argpartition``.

Cache and staleness. At most every ``refresh_s`` seconds a request (or :meth:`Recommender.refresh`, which
``zerocf serve`` calls from its main loop) checks ``live_gen`` and the item count (HLEN): a new generation
or a changed item count reloads the whole matrix. Existing item vectors also change online (LMF adds item
deltas), so the matrix is reloaded anyway once it is older than ``max(refresh_s, load_seconds /
RELOAD_SHARE)``: a reload never takes more than ``RELOAD_SHARE`` (5 %) of wall time. Hence a served item
vector is at most ``max(refresh_s, load_seconds / RELOAD_SHARE) + refresh_s + load_seconds`` old, and a new
generation or a new item is visible after at most ``refresh_s + load_seconds`` (with ``load_seconds`` the
duration of the last full load, ~0.1-1 s at 100k items and k=64). User vectors are always read fresh,
from the cached generation, so ``p``, ``q`` and the biases always come from one generation; a retired
generation stays readable for the ALS worker's ``gc_grace_s`` (600 s), far longer than ``refresh_s``.

Users without a vector in the cached generation get the generation's most popular items by time-decayed
popularity (``popular_items``; all-time counts before it has any, the item biases before that) with
``fallback=True``; an item's score is then ``sigmoid(b + b_i)``, the user-free click probability. Every seen
item of a user (all of them within the retention window the store keeps) is excluded, for users with and
without a vector.

Similar items (:meth:`Recommender.similar`, :meth:`~Recommender.similar_many`) rank the cached matrix by the
cosine of the latent vectors (biases left out), normalised once per load (:mod:`workers.kernels.similarity`);
the item itself is never returned. An item without a vector in the cached generation (unknown, not learnt
yet, or all zeros) gets the same popularity fallback as a user without one, itself excluded, with
``fallback=True``. Items the ``hidden`` hook names are left out of every answer (nothing by default;
``zerocf serve`` plugs the catalogue in there: :class:`stream.catalog.CatalogView`). A lookup's ``only``
(the items of a category) restricts an answer further: nothing outside it is returned (an empty ``only``
gives an empty list).

Catalogues of ``ann_min_items`` items or more (200,000 by default, ``ZEROCF_SERVE_ANN_MIN_ITEMS``; 0 =
always exact) are ranked through an approximate index (:mod:`workers.kernels.ann`, faiss IVF-Flat over
the ``[q_i, b_i]`` rows lifted so that L2 nearness is inner product) instead of the full product: the index
returns ``max(2k, k + ANN_EXTRA)`` candidates, hidden items excluded inside its scan, and those are scored
exactly against the cached matrix. Seen items are dropped by id from ``ANN_SEEN_EXTRA`` more candidates
(turning 1,000 seen ids into rows costs more than the search at 1M items); only when fewer than ``k``
survive are they turned into rows and excluded inside a second scan, and when even that leaves fewer than
``k`` the lookup scans exactly. A lookup with ``only`` scores the rows of ``only`` exactly (cost
proportional to its size). The index is built (trained) once per generation on the reload thread, before
the new matrix is swapped in; later reloads of the same generation keep it, put its rows first in its own
order and add the items that arrived since as new ids (filed under the trained centroids, no training; one
longer than every trained row goes to a side list that each search scans exactly), so a new item is
findable as soon as it is in the cached matrix. Vectors that LMF changed after they were indexed are scored
fresh but found through their indexed position: the index is retrained when the generation changes, when it
holds twice the rows it was trained on, when its side list would hold more than ``ANN_MAX_OVERFLOW`` rows,
or once it is older than ``max(ANN_REBUILD_S, build_seconds / RELOAD_SHARE)`` (an hour; a build took 4.5-15
s at 1M items on 2 loaded cores), and at once if an indexed item left the store.

Lost or empty stores are errors, never empty answers. A user without a vector may mean that Redis lost the
model (an empty restart, a flushed database): before answering one, the live generation is read (one round
trip), and a missing model or a live generation older than the cached one raises :class:`StoreLost`; a
model without a single item raises :class:`EmptyModel` (both are :class:`NoModel`). Known users cost nothing
extra: their row in the cached generation proves that it is there. :meth:`Recommender.recommend_stale`
answers from the cache alone (its popular items, seen items not excluded) for a server that chooses to keep
answering while Redis is away.

>>> import fakeredis, numpy as np
>>> store = FactorStore(fakeredis.FakeRedis(), namespace="doc")
>>> _ = store.ensure_model(2)
>>> rows = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0]], dtype=np.float32)  # latent (2), bias
>>> store.write_vectors(1, "item", ["a", "b", "c"], rows)
>>> store.write_vectors(1, "user", ["u1"], np.array([[2, 1, 0]], dtype=np.float32))
>>> store.write_counts(1, {"c": 5, "b": 3})
>>> rec = Recommender(store)
>>> r = rec.recommend("u1", k=2)
>>> r.items, [round(s, 3) for s in r.scores], r.fallback
(['a', 'b'], [0.881, 0.731], False)
>>> rec.recommend("stranger", k=2).items, rec.recommend("stranger", k=2).fallback
(['c', 'b'], True)
>>> [round(float(x), 3) for x in rec.score("u1", ["c", "zzz"])]
[0.119, nan]
>>> sim = rec.similar("a", k=2)
>>> sim.items, [round(s, 3) for s in sim.scores], sim.fallback
(['b', 'c'], [0.0, -1.0], False)
>>> rec.similar("new-item", k=2).items, rec.similar("new-item", k=2).fallback
(['c', 'b'], True)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from workers.errors import GenerationError, StoreSchemaError, WorkerError
from workers.kernels.ann import ItemIndex
from workers.kernels.similarity import cosine_top_k, unit_rows
from workers.kernels.topk import top_k
from workers.serving.gate import FifoGate
from workers.store import GLOBAL_ROW, FactorStore

log = logging.getLogger(__name__)

__all__ = ["EmptyModel", "NoModel", "Recommendation", "Recommender", "SimilarItems", "StoreLost", "sigmoid"]

RELOAD_SHARE = 0.05  # a periodic content reload may use at most this share of wall time
STALE_POPULAR = 1000  # popular items kept with the cached matrix, for recommend_stale
_BATCH_CELLS = 1 << 22  # users x items scores per chunk of recommend_many (16 MiB of float32)
ANN_MIN_ITEMS = 200_000  # default catalogue size from which lookups use the index (ZEROCF_SERVE_ANN_MIN_ITEMS)
ANN_EXTRA = 32  # candidates beyond k that the index returns for the exact re-scoring (at least 2k in all)
ANN_SEEN_EXTRA = 64  # more candidates asked for a user with seen items, dropped by id after the scan
ANN_REBUILD_S = 3600.0  # an index of the same generation is retrained after this long (or 20x its build time)
ANN_MAX_OVERFLOW = 10_000  # new rows too long for the index's lift (scanned exactly per search) before a retrain


class NoModel(WorkerError):
    """Redis holds no model under the namespace (nothing trained yet, or a wrong prefix/URL)."""

    reason = "no_model"


class StoreLost(NoModel):
    """The model that was being served is gone from Redis (restarted empty, flushed) or was reset."""

    reason = "store_lost"


class EmptyModel(NoModel):
    """The model exists but its live generation has no item yet: there is nothing to recommend."""

    reason = "empty_model"


@dataclass(frozen=True)
class Recommendation:
    """Top-k items of one user, best first.

    ``scores[j]`` is P(click) of ``items[j]``; ``fallback`` is True when the user has no vector and the
    items are the generation's most clicked ones; ``generation`` is the generation that served it;
    ``stale`` is True when the answer came from the cache alone (:meth:`Recommender.recommend_stale`).
    """

    user: str
    items: list[str]
    scores: list[float]
    fallback: bool
    generation: int
    stale: bool = False


@dataclass(frozen=True)
class SimilarItems:
    """The items most similar to ``item``, best first (:meth:`Recommender.similar`).

    ``scores[j]`` is the cosine of the latent vectors of ``item`` and ``items[j]``, in [-1, 1]. With
    ``fallback`` True, ``item`` has no vector in ``generation`` (unknown, not learnt yet, or all zeros) and
    the items are that generation's most popular ones, scored by their user-free P(click)
    ``sigmoid(b + b_i)``, exactly as :meth:`Recommender.recommend` answers a user without a vector.
    ``stale`` is True when the answer came from the cache alone (:meth:`Recommender.similar_stale`).
    """

    item: str
    items: list[str]
    scores: list[float]
    fallback: bool
    generation: int
    stale: bool = False


@dataclass(frozen=True, eq=False)
class _ItemCache:
    """One immutable cached item matrix (swapped as a whole, so readers need no lock)."""

    gen: int
    bias: float
    ids: list[str]
    index: dict[str, int]
    matrix: npt.NDArray[np.float32]  # (n_items, k)
    loaded_at: float
    load_seconds: float
    popular: list[str]  # the generation's most popular items at load time, best first (recommend_stale)
    unit: npt.NDArray[np.float32]  # (n_items, k - 1): latent parts at unit norm, for similar()
    has_direction: npt.NDArray[np.bool_]  # (n_items,): False for an all-zero latent vector
    ann: ItemIndex | None = None  # over every row, ids = rows (catalogues of ann_min_items or more)
    ann_built_at: float = 0.0  # when (on the clock) ann was trained


def sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Logistic function in float32, overflow-safe.

    >>> sigmoid(np.array([0.0, 100.0, -100.0], dtype=np.float32)).tolist()
    [0.5, 1.0, 0.0]
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32, copy=False)


class Recommender:
    """Serve top-k recommendations and P(click) scores from a :class:`FactorStore`.

    Parameters
    ----------
    store : FactorStore
        The model's store; only its public read methods are used.
    refresh_s : float
        The cached item matrix checks the live generation and item count at most this often (seconds).
    clock : callable
        Monotonic seconds (tests inject a fake clock).
    auto_refresh : bool
        Check the cache on the request path (default). ``zerocf serve`` turns it off and calls
        :meth:`refresh` from its main loop so that no request pays for a reload.
    reload_store : FactorStore, optional
        The store full reloads read through (default ``store``): ``zerocf serve`` gives requests a client
        with a short timeout and reloads one with a longer one.
    gate : FifoGate, optional
        Bounds how many threads run the numpy part of a lookup at once, first come first served
        (:mod:`workers.serving.gate`); Redis reads happen outside it. None: no bound.
    hidden : callable, optional
        Returns the ids of the items no answer may contain (hidden or expired ones). It is called once per
        lookup on the request path, so it must answer from memory (a catalogue consumer keeping a set up to
        date, not a Redis round trip). Every answer applies it: :meth:`recommend`, :meth:`similar`, their
        popularity fallbacks and their stale forms. None (the default): nothing is hidden;
        ``zerocf serve`` passes :meth:`stream.catalog.CatalogView.hidden_now`.
    ann_min_items : int
        Catalogues of at least this many items are ranked through an approximate index (see the module
        docstring); 0 = always exact. ``zerocf serve`` passes ``ZEROCF_SERVE_ANN_MIN_ITEMS``.
    ann_threads : int, optional
        OpenMP threads of an index build (None: one per CPU).

    Thread-safe: readers take the current cache reference; one thread at a time reloads.
    """

    def __init__(
        self,
        store: FactorStore,
        refresh_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        auto_refresh: bool = True,
        reload_store: FactorStore | None = None,
        gate: FifoGate | None = None,
        hidden: Callable[[], Collection[str]] | None = None,
        ann_min_items: int = ANN_MIN_ITEMS,
        ann_threads: int | None = None,
    ) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s={refresh_s} must be >= 0 seconds")
        if ann_min_items < 0:
            raise ValueError(f"ann_min_items={ann_min_items} must be >= 0 (0 = always exact)")
        self.ann_min_items, self.ann_threads = int(ann_min_items), ann_threads
        self.store, self.refresh_s, self._clock, self.auto_refresh = store, float(refresh_s), clock, auto_refresh
        self._reload_store = reload_store or store
        self._gate: contextlib.AbstractContextManager[object] = gate or contextlib.nullcontext()
        self._hidden_items = hidden
        self._hidden_memo: tuple[_ItemCache, frozenset[str], list[int]] | None = None  # (cache, hidden, rows)
        self._cache: _ItemCache | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        self.refreshes = 0  # full matrix loads so far (exported by serve as a metric)

    # ------------------------------------------------------------------ cache
    @property
    def generation(self) -> int | None:
        """The generation of the cached matrix (None before the first load)."""
        return None if self._cache is None else self._cache.gen

    @property
    def n_items(self) -> int:
        """Items in the cached matrix (0 before the first load)."""
        return 0 if self._cache is None else len(self._cache.ids)

    @property
    def last_checked(self) -> float:
        """When (on ``clock``) Redis last answered a check of the live generation (-inf: never)."""
        return self._checked_at

    def refresh(self, force: bool = False) -> bool:
        """Reload the item matrix if due (see the module docstring); return True when it was reloaded.

        Raises :class:`NoModel` when Redis holds no model. Cheap when not due (no Redis call).
        """
        if not force and self._cache is not None and self._clock() - self._checked_at < self.refresh_s:
            return False
        if not self._lock.acquire(blocking=self._cache is None or force):
            return False  # another thread is reloading: keep serving the current snapshot
        try:
            return self._refresh_locked(force)
        finally:
            self._lock.release()

    def _refresh_locked(self, force: bool) -> bool:
        now, cache = self._clock(), self._cache
        if not force and cache is not None and now - self._checked_at < self.refresh_s:
            return False  # reloaded by another thread while we waited
        live = self._live_generation(self._reload_store)
        self._checked_at = now
        if cache is not None and not force and live == cache.gen:
            age_limit = max(self.refresh_s, cache.load_seconds / RELOAD_SHARE)
            if self._reload_store.item_count(live) == len(cache.ids) and now - cache.loaded_at < age_limit:
                return False
        self._cache = self._load(live)
        self.refreshes += 1
        return True

    def _lost(self, exc: Exception) -> StoreLost:
        g = "?" if self._cache is None else self._cache.gen
        return StoreLost(f"model {self.store.keys.ns!r} (generation {g} was being served) is gone from Redis: {exc}")

    def _live_generation(self, store: FactorStore | None = None) -> int:
        try:
            return (store or self.store).live_generation()
        except StoreSchemaError as exc:
            if self._cache is not None:
                raise self._lost(exc) from None
            raise NoModel(
                f"no model in Redis namespace {self.store.keys.ns!r}; run `zerocf lmf` or "
                "`zerocf als --once` first, or check ZEROCF_TOPIC_PREFIX"
            ) from exc

    def _load(self, live: int) -> _ItemCache:
        started, store = self._clock(), self._reload_store
        for _ in range(3):
            try:
                ids, matrix, bias = store.get_all_items(live)
                popular = [i for i, _ in store.popular_items(live, STALE_POPULAR)]
                break
            except GenerationError:  # dropped between reading live_gen and loading it: read again
                live = self._live_generation(store)
        else:
            raise GenerationError(
                f"live generation of {self.store.keys.ns!r} kept changing during the item "
                "load; retry, and check that the ALS worker is not publishing in a loop"
            )
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        ids, matrix, ann, built_at, build_s = self._indexed(live, ids, matrix)
        unit, has_direction = unit_rows(matrix[:, :-1])  # once per load, not per similar() call
        took = self._clock() - started - build_s  # a build is bounded on its own (ANN_REBUILD_S)
        log.info(
            "item matrix loaded namespace=%s gen=%s items=%d bias=%.4f in %.3fs",
            self.store.keys.ns,
            live,
            len(ids),
            bias,
            took,
        )
        return _ItemCache(
            live,
            float(bias),
            ids,
            {i: n for n, i in enumerate(ids)},
            matrix,
            self._clock(),
            took,
            popular,
            unit,
            has_direction,
            ann,
            built_at,
        )

    def _indexed(
        self, live: int, ids: list[str], matrix: npt.NDArray[np.float32]
    ) -> tuple[list[str], npt.NDArray[np.float32], ItemIndex | None, float, float]:
        """``(ids, matrix, index, built_at, build_seconds)`` of a load: no index below ``ann_min_items``; the
        cached index of the same generation with the rows reordered to its ids and the new items added, or
        a new one (see the module docstring). ``build_seconds`` is 0 unless it was trained here."""
        if self.ann_min_items == 0 or len(ids) < self.ann_min_items:
            return ids, matrix, None, 0.0, 0.0
        old, now = self._cache, self._clock()
        if old is not None and old.ann is not None and old.gen == live and old.ann.n <= 2 * old.ann.trained_n:
            fresh = now - old.ann_built_at < max(ANN_REBUILD_S, old.ann.build_seconds / RELOAD_SHARE)
            pos = {i: n for n, i in enumerate(ids)}
            order = [pos.get(i, -1) for i in old.ids[: old.ann.n]]
            if fresh and -1 not in order:  # every indexed item is still there: keep the index
                rest = np.ones(len(ids), dtype=bool)
                rest[order] = False
                rows = np.concatenate([np.asarray(order, dtype=np.intp), np.flatnonzero(rest)])
                ids, matrix = [ids[j] for j in rows.tolist()], matrix[rows]
                ann = old.ann.with_rows(matrix[old.ann.n :])
                if ann.overflow_n <= ANN_MAX_OVERFLOW:
                    return ids, matrix, ann, old.ann_built_at, 0.0
                # too many new rows beyond the lift's bound to scan per search: retrain below
        try:
            ann = ItemIndex.build(matrix, threads=self.ann_threads)
        except ImportError as exc:  # faiss-cpu missing from this install: serve exactly, say so once
            log.warning("no item index (%s): lookups over %d items stay exact; pip install faiss-cpu", exc, len(ids))
            self.ann_min_items = 0
            return ids, matrix, None, 0.0, 0.0
        log.info(
            "item index built namespace=%s gen=%s items=%d cells=%d nprobe=%d in %.1fs",
            self.store.keys.ns,
            live,
            ann.n,
            ann.nlist,
            ann.nprobe,
            ann.build_seconds,
        )
        return ids, matrix, ann, now, ann.build_seconds

    def _current(self) -> _ItemCache:
        if self._cache is None or self.auto_refresh:
            self.refresh()
        assert self._cache is not None
        return self._cache

    # ------------------------------------------------------------------ queries
    def recommend(
        self, user_id: str, k: int = 10, exclude_seen: bool = True, *, only: Collection[str] | None = None
    ) -> Recommendation:
        """Top-``k`` items for one user by P(click), best first.

        Known users: ``sigmoid(bias + Q p_u)`` over the cached matrix, their recent clicks excluded when
        ``exclude_seen``. Unknown users: the most clicked items (``fallback=True``). Fewer than ``k`` items
        come back when the model has fewer candidates. Raises :class:`EmptyModel` when the model has no
        item and :class:`StoreLost` when Redis lost it (see the module docstring). With ``only`` (e.g. the
        items of a category) nothing outside it is returned; an empty ``only`` gives empty lists.
        """
        return self.recommend_many([user_id], k, exclude_seen, only=only)[str(user_id)]

    def recommend_many(
        self,
        user_ids: Sequence[str],
        k: int = 10,
        exclude_seen: bool = True,
        *,
        only: Collection[str] | None = None,
    ) -> dict[str, Recommendation]:
        """:meth:`recommend` for many users: one HMGET of their vectors, one pipelined read of their recent
        clicks, and one matrix product per chunk of users (chunks bound memory to 16 MiB of scores).

        Returns a dict keyed by user id in first-seen order (duplicates collapse).
        """
        if int(k) < 1:
            raise ValueError(f"k={k} must be >= 1")
        k = int(k)
        users = list(dict.fromkeys(str(u) for u in user_ids))
        cache = self._current()
        if not users:
            return {}
        self._require_items(cache)
        hidden = self._hidden()
        indexed = cache.ann is not None  # only: the rows of only are scored, not the complement masked
        hidden_rows = self._hidden_rows(cache, hidden) if indexed else self._excluded_rows(cache, hidden, only)
        if exclude_seen:  # one round trip for both
            vecs, found, seen = self.store.user_rows_and_seen(cache.gen, users)
        else:
            (vecs, found), seen = self.store.get_vectors(cache.gen, "user", users), {}
        out: dict[str, Recommendation] = {}
        known = np.flatnonzero(found)
        if indexed:  # a large catalogue: the index's candidates (or the rows of only), scored exactly
            allowed = None if only is None else self._allowed_rows(cache, only, hidden_rows)
            hidden_ids = np.asarray(hidden_rows, dtype=np.int64)
            for i in known.tolist():
                with self._gate:
                    user_seen = seen.get(users[i], ())
                    out[users[i]] = self._rank_indexed(cache, users[i], vecs[i], k, user_seen, hidden_ids, allowed)
            known = known[:0]
        chunk = max(1, _BATCH_CELLS // max(1, len(cache.ids)))
        for c in range(0, len(known), chunk):
            rows = known[c : c + chunk]
            with self._gate:
                augmented = vecs[rows].copy()
                offsets = augmented[:, -1] + np.float32(cache.bias)  # b_u + b: the same for every item of a user
                augmented[:, -1] = 1.0  # [p_u, 1] . [q_i, b_i] = p_u . q_i + b_i
                logits = augmented @ cache.matrix.T  # (m, n_items) float32
                logits += offsets[:, None]
                for r, i in enumerate(rows):
                    excl = self._rows(cache, seen.get(users[i], ())) + hidden_rows
                    out[users[i]] = self._rank(cache, users[i], logits[r], k, excl)
        missing = [u for u, f in zip(users, found) if not f]
        if missing:
            self._check_store(cache)
            for u, (items, scores) in self._fallback(cache, missing, k, seen, hidden, only=only).items():
                out[u] = Recommendation(u, items, scores, True, cache.gen)
        return {u: out[u] for u in users}

    def _require_items(self, cache: _ItemCache) -> None:
        if not cache.ids:
            raise EmptyModel(
                f"model {self.store.keys.ns!r} generation {cache.gen} has no items yet; feed clicks through "
                "`zerocf ingest` and `zerocf lmf`, or publish one with `zerocf als --once`"
            )

    def _hidden(self) -> Collection[str]:
        return () if self._hidden_items is None else self._hidden_items()

    def _hidden_rows(self, cache: _ItemCache, hidden: Collection[str]) -> list[int]:
        """:meth:`_rows` of the hidden items, kept while neither the item cache nor the hidden set changes (the
        catalogue hands out the same frozenset until then): not one dict lookup per hidden item per request."""
        if not isinstance(hidden, frozenset):  # a mutable collection may change in place: no memo
            return self._rows(cache, hidden)
        memo = self._hidden_memo
        if memo is not None and memo[0] is cache and memo[1] is hidden:
            return memo[2]
        rows = self._rows(cache, hidden)
        self._hidden_memo = (cache, hidden, rows)
        return rows

    @staticmethod
    def _rows(cache: _ItemCache, items: Collection[str]) -> list[int]:
        """Row indices of those of ``items`` that the cached matrix holds."""
        return [j for j in (cache.index.get(i) for i in items) if j is not None]

    @staticmethod
    def _row_ids(cache: _ItemCache, items: Collection[str]) -> npt.NDArray[np.int64]:
        """:meth:`_rows` as an array, for the index (one dict lookup per item at C speed, 25 % faster)."""
        rows = np.fromiter(map(cache.index.get, items, itertools.repeat(-1)), np.int64, len(items))
        return rows[rows >= 0]

    @classmethod
    def _excluded_rows(cls, cache: _ItemCache, hidden: Collection[str], only: Collection[str] | None) -> list[int]:
        """Rows no answer may hold: the hidden items, and with ``only`` every item outside it."""
        if only is None:
            return cls._rows(cache, hidden)
        out = np.ones(len(cache.ids), dtype=bool)
        out[cls._rows(cache, only)] = False
        out[cls._rows(cache, hidden)] = True
        return np.flatnonzero(out).tolist()

    @classmethod
    def _allowed_rows(cls, cache: _ItemCache, only: Collection[str], hidden_rows: list[int]) -> npt.NDArray[np.intp]:
        """Rows of ``only`` that no answer excludes for everyone (``hidden_rows`` already covers the rest)."""
        rows = np.unique(np.asarray(cls._rows(cache, only), dtype=np.intp))
        return np.setdiff1d(rows, np.asarray(hidden_rows, dtype=np.intp), assume_unique=True)

    def _rank_indexed(
        self,
        cache: _ItemCache,
        user: str,
        vec: npt.NDArray[np.float32],
        k: int,
        seen: Collection[str],
        hidden_ids: npt.NDArray[np.int64],
        allowed: npt.NDArray[np.intp] | None,
    ) -> Recommendation:
        """:meth:`_rank` of one user over the index's candidates (or over ``allowed`` rows, exactly)."""
        q = np.array(vec, dtype=np.float32, copy=True)
        offset = q[-1] + np.float32(cache.bias)
        q[-1] = 1.0  # [p_u, 1] . [q_i, b_i] = p_u . q_i + b_i
        if allowed is not None:  # a category: exact over its rows, the user's seen ones removed
            rows = np.setdiff1d(allowed, self._row_ids(cache, seen).astype(np.intp))
        else:
            found = self._candidates(cache, q, k, seen, hidden_ids)
            if found is None:  # the probed cells held too few eligible items: scan exactly
                logits = cache.matrix @ q + offset
                excl = np.concatenate([self._row_ids(cache, seen), hidden_ids])
                return self._rank(cache, user, logits, k, excl.tolist())
            rows = found
        logits = cache.matrix[rows] @ q + offset
        ids, top = top_k(logits[None, :], k)
        best = ids[0][ids[0] >= 0]
        return Recommendation(
            user, [cache.ids[j] for j in rows[best].tolist()], sigmoid(top[0][: best.size]).tolist(), False, cache.gen
        )

    @classmethod
    def _candidates(
        cls,
        cache: _ItemCache,
        q: npt.NDArray[np.float32],
        k: int,
        seen: Collection[str],
        hidden_ids: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.intp] | None:
        """The index's candidate rows for ``q`` (sorted), none of them seen or hidden; None when the probed
        cells hold fewer than ``k`` eligible items.

        Hidden rows are skipped inside the scan. Seen items are first dropped from a deeper answer by id
        (``ANN_SEEN_EXTRA`` more candidates), which needs no row index of the seen items: at 1M items the
        dict lookups of 1,000 seen ids cost ~1.4 ms, more than the search. Only when fewer than ``k``
        candidates survive are the seen items turned into rows and skipped inside a second scan.
        """
        assert cache.ann is not None
        depth = max(2 * k, k + ANN_EXTRA)
        if seen:
            seen_ids = seen if isinstance(seen, (set, frozenset)) else set(seen)
            got = cache.ann.search(q, depth + min(len(seen_ids), ANN_SEEN_EXTRA), hidden_ids)[0].tolist()
            keep = [j for j in got if cache.ids[j] not in seen_ids]
            if len(keep) >= k:
                return np.sort(np.asarray(keep, dtype=np.intp))
        excl = np.concatenate([cls._row_ids(cache, seen), hidden_ids]) if seen else hidden_ids
        want = min(k, len(cache.ids) - np.unique(excl).size)
        rows = np.sort(cache.ann.search(q, depth, excl)[0]).astype(np.intp)
        return None if rows.size < want else rows

    def _check_store(self, cache: _ItemCache) -> None:
        """Raise :class:`StoreLost` unless Redis still holds the cached generation's model (one round trip)."""
        ns = self.store.keys.ns
        try:
            live = self.store.live_generation()
        except StoreSchemaError as exc:
            raise self._lost(exc) from None
        if live < cache.gen:
            raise StoreLost(
                f"model {ns!r} went back from generation {cache.gen} to {live}: Redis lost its data and a new "
                "model was started; restore Redis, or rebuild with `zerocf als --once`"
            )

    def recommend_stale(self, user_id: str, k: int = 10, *, only: Collection[str] | None = None) -> Recommendation:
        """The cached generation's most popular items at its load (seen items not excluded), from memory
        alone: for a server that keeps answering while Redis is away. ``fallback`` and ``stale`` are True.

        Raises :class:`NoModel` before the first load (there is nothing to serve).
        """
        cache, user = self._cached(), str(user_id)
        items, scores = self._fallback(cache, [user], int(k), {}, self._hidden(), stale=True, only=only)[user]
        return Recommendation(user, items, scores, True, cache.gen, stale=True)

    def _cached(self) -> _ItemCache:
        if self._cache is None:
            raise NoModel(f"no item cache of model {self.store.keys.ns!r} yet; Redis has not answered since start")
        return self._cache

    def similar(self, item_id: str, k: int = 10, *, only: Collection[str] | None = None) -> SimilarItems:
        """The ``k`` items whose latent vectors are most cosine-similar to ``item_id``'s, best first.

        From the cached generation's item matrix, normalised once per load; ``item_id`` itself and hidden
        items are never returned. An item without a vector gets the popularity fallback
        (``fallback=True``, see :class:`SimilarItems`). Redis is asked once whether it still holds the
        cached model: raises :class:`EmptyModel`/:class:`StoreLost` like :meth:`recommend`. ``only``
        restricts the answer as in :meth:`recommend`.
        """
        return self.similar_many([item_id], k, only=only)[str(item_id)]

    def similar_many(
        self, item_ids: Sequence[str], k: int = 10, *, only: Collection[str] | None = None
    ) -> dict[str, SimilarItems]:
        """:meth:`similar` for many items: one check of the store, one matrix product per 1,024 items.

        Returns a dict keyed by item id in first-seen order (duplicates collapse).
        """
        if int(k) < 1:
            raise ValueError(f"k={k} must be >= 1")
        items = list(dict.fromkeys(str(i) for i in item_ids))
        cache = self._current()
        if not items:
            return {}
        self._require_items(cache)
        self._check_store(cache)  # the answer is computed from memory: make sure Redis still holds its model
        return self._similar(cache, items, int(k), stale=False, only=only)

    def similar_stale(self, item_id: str, k: int = 10, *, only: Collection[str] | None = None) -> SimilarItems:
        """:meth:`similar` from the cache alone (no Redis call, ``stale=True``; a fallback uses the popular
        items cached at load), for a server that keeps answering while Redis is away.

        Raises :class:`NoModel` before the first load.
        """
        return self._similar(self._cached(), [str(item_id)], int(k), stale=True, only=only)[str(item_id)]

    def _similar(
        self, cache: _ItemCache, items: list[str], k: int, stale: bool, only: Collection[str] | None = None
    ) -> dict[str, SimilarItems]:
        hidden = self._hidden()
        rows = [cache.index.get(i, -1) for i in items]
        known = [n for n, r in enumerate(rows) if r >= 0 and cache.has_direction[r]]
        out: dict[str, SimilarItems] = {}
        if known:
            with self._gate:
                excl = self._excluded_rows(cache, hidden, only)
                ids, top = cosine_top_k(cache.unit, [rows[n] for n in known], k, excl)
            for n, row_ids, row_scores in zip(known, ids, top):
                keep = row_ids >= 0
                best = [cache.ids[j] for j in row_ids[keep]]
                out[items[n]] = SimilarItems(items[n], best, row_scores[keep].tolist(), False, cache.gen, stale)
        missing = [i for i in items if i not in out]
        if missing:
            own = {i: (i,) for i in missing}
            for i, (best, scores) in self._fallback(cache, missing, k, own, hidden, stale, only).items():
                out[i] = SimilarItems(i, best, scores, True, cache.gen, stale)
        return {i: out[i] for i in items}

    @staticmethod
    def _prior(cache: _ItemCache, items: Sequence[str]) -> list[float]:
        """``sigmoid(b + b_i)`` of each item (0 for an item without a row): the user-free P(click)."""
        b_i = np.array([cache.matrix[cache.index[i], -1] if i in cache.index else 0.0 for i in items], np.float32)
        return sigmoid(b_i + np.float32(cache.bias)).tolist()

    @classmethod
    def _by_bias_of(cls, cache: _ItemCache, items: Collection[str], n: int) -> list[str]:
        """The ``n`` items of ``items`` (those with a row) with the largest bias, best first."""
        rows = np.array(cls._rows(cache, items), dtype=np.intp)
        if not rows.size:
            return []
        ids, _ = top_k(cache.matrix[None, rows, -1], n)
        return [cache.ids[rows[j]] for j in ids[0] if j >= 0]

    @staticmethod
    def _by_bias(cache: _ItemCache, n: int) -> list[str]:
        """The ``n`` items with the largest bias: the fallback of a generation without any popularity."""
        ids, _ = top_k(cache.matrix[None, :, -1], n)
        return [cache.ids[j] for j in ids[0] if j >= 0]

    def _rank(
        self, cache: _ItemCache, user: str, logits: npt.NDArray[np.float32], k: int, excl: list[int]
    ) -> Recommendation:
        if excl:
            logits[excl] = -np.inf
        ids, top = top_k(logits[None, :], k)
        best = ids[0][ids[0] >= 0]
        return Recommendation(
            user, [cache.ids[j] for j in best], sigmoid(top[0][: best.size]).tolist(), False, cache.gen
        )

    def _fallback(
        self,
        cache: _ItemCache,
        keys: list[str],
        k: int,
        exclude: Mapping[str, Collection[str]],
        hidden: Collection[str],
        stale: bool = False,
        only: Collection[str] | None = None,
    ) -> dict[str, tuple[list[str], list[float]]]:
        """``(items, sigmoid(b + b_i))`` per key: the generation's most popular items (read fresh, or those
        cached at load when ``stale``; the largest item biases without any popularity), minus the key's
        ``exclude`` items and the ``hidden`` ones. With ``only``, items outside it are dropped and the list
        is topped up with ``only``'s items of the largest bias (popular ones first)."""
        n = k + max((len(exclude.get(u, ())) for u in keys), default=0) + len(hidden)
        if stale:
            top = cache.popular[:n]
        else:
            top = [item for item, _ in self.store.popular_items(cache.gen, n)]
        top = top or self._by_bias(cache, n)
        if only is not None:
            allowed = only if isinstance(only, (set, frozenset)) else set(only)
            top = [i for i in top if i in allowed]
            have = set(top)
            top += [i for i in self._by_bias_of(cache, allowed, n) if i not in have]
        prior = dict(zip(top, self._prior(cache, top)))
        hide = set(hidden)
        out = {}
        for u in keys:
            own = set(exclude.get(u, ()))
            items = [i for i in top if i not in hide and i not in own][:k]
            out[u] = (items, [prior[i] for i in items])
        return out

    def score(self, user_id: str, item_ids: Sequence[str]) -> npt.NDArray[np.float32]:
        """P(click) of ``user_id`` for each of ``item_ids`` (vectors read fresh from Redis), float32.

        NaN where the model has no opinion: for an item without a vector, and for every item when the user
        has no vector. The generation is the cached one, so bias, p and q come from the same generation.
        """
        cache = self._current()
        ids = [str(i) for i in item_ids]
        out = np.full(len(ids), np.nan, dtype=np.float32)
        if not ids:
            return out
        p, pf = self.store.get_vectors(cache.gen, "user", [str(user_id)])
        if not pf[0]:
            return out
        q, qf = self.store.get_vectors(cache.gen, "item", ids)
        qf &= np.array([i != GLOBAL_ROW for i in ids])  # the global bias row is not an item
        k = p.shape[1] - 1
        logits = q[qf, :k] @ p[0, :k] + q[qf, k] + p[0, k] + np.float32(cache.bias)
        out[qf] = sigmoid(logits)
        return out
