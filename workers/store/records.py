"""What the factor store reads and writes, as typed records (pure).

>>> bool(ApplyStatus.APPLIED), bool(ApplyStatus.STALE), bool(ApplyStatus.NEW_GENERATION)
(True, False, False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

__all__ = ["ApplyStatus", "BatchState", "BatchWrite", "GenerationMeta", "ModelMeta"]


@dataclass(frozen=True)
class ModelMeta:
    """The model meta hash.

    ``model_id``: a random id given to the model when it is first created in Redis; a model re-created after
    Redis lost its data gets a new one, so a checkpoint or a consumer group that names the old id can tell.
    """

    schema_version: int
    k: int
    dtype: str
    live_gen: int
    next_gen: int
    created_at: float
    updated_at: float
    model_id: str = ""


@dataclass(frozen=True)
class GenerationMeta:
    """One generation's meta hash.

    ``offsets``: events partition -> last offset its snapshot covers. ``bias``: the global bias an ALS
    generation was published with (the live value is the :data:`~workers.store.keys.GLOBAL_ROW` row);
    ``scale``: the calibration scale folded into its factors (1 for an online generation).
    ``pop_ref_ms``/``pop_half_life_ms``: the time-decayed popularity's reference time (0 = not set yet) and
    half-life.
    """

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
    scale: float = 1.0
    pop_ref_ms: int = 0
    pop_half_life_ms: int = 86_400_000


@dataclass(frozen=True, eq=False)
class BatchState:
    """Everything an LMF batch reads, fetched in one round trip by ``FactorStore.read_batch_state``.

    ``offsets[p]`` is the partition's last applied offset (None: nothing applied yet in this generation);
    rows are ``(n, k + 1)`` (latent values, then the bias); accumulators ``(n,)``, None unless requested.
    """

    live_gen: int
    user_rows: F32
    user_found: npt.NDArray[np.bool_]
    item_rows: F32
    item_found: npt.NDArray[np.bool_]
    offsets: dict[int, int | None]
    watermarks: dict[int, dict[str, Any]]
    user_acc: npt.NDArray[np.float32] | None = None
    item_acc: npt.NDArray[np.float32] | None = None
    seen: dict[str, list[str]] | None = None  # seen items (newest first) of the ``seen_users`` asked for
    item_versions: npt.NDArray[np.int64] | None = None  # (n,) the items' row versions, read before the rows


@dataclass(frozen=True, eq=False)
class BatchWrite:
    """One LMF batch's write, applied atomically by ``FactorStore.apply_batch`` (see docs/redis-schema.md).

    - ``user_rows`` (absolute, one writer per user) and ``user_acc`` (absolute) are SET;
    - ``item_deltas`` and ``item_acc_deltas`` are ADDED in float32 to the stored rows; an absent row starts
      at zeros, so workers that create the same item concurrently both add to zero and the row stays exact;
    - optionally ``item_versions`` with ``item_rows`` (and ``item_acc`` with accumulator deltas): the version
      of each row the caller last knew and that row plus its delta, computed by the caller in float32. A row
      whose stored version is still the one sent is SET to it (the same bits, without the add in Redis); any
      other row falls back to the add. Version -1: unknown, always added;
    - ``counts`` (all-time clicks) and ``popularity`` (decayed click weight relative to ``pop_ref_ms``)
      are added per item, ``user_increments`` per user;
    - ``partition``'s applied offset is fenced (``expected_offset``) and advanced (``new_offset``,
      ``watermarks``); ``more`` :class:`Fence` entries do the same for other partitions in the same batch
      (one worker writes the partitions of one poll at once: one script instead of one per partition);
    - ``seen`` ``(user, item, ts_ms)`` enter the users' seen sets; each touched set is capped at ``seen_cap``.
      ``seen_upkeep`` (``user -> SEEN_PRUNE | SEEN_EXPIRE``) says which sets are also pruned to the retention
      and get their TTL refreshed in this batch; None (the default) does both for every touched set. The LMF
      worker asks for each at most every 1 % of the retention (event time) / TTL (wall time) per user, and on
      its first write of a user (docs/redis-schema.md);
    - ``erase`` ``{user: erased_at_ms}`` (``stream.erasure``): before any of the writes above, each user's row,
      accumulators, counter and seen set are deleted and a tombstone recorded (the writes above may then create
      the user afresh from events after the erasure);
    - finally the partition's applied offset becomes ``new_offset`` with the dedupe ``watermarks``.
    """

    partition: int
    expected_offset: int | None
    new_offset: int
    watermarks: Mapping[str, Any]
    user_ids: Sequence[str] = ()
    user_rows: F32 | None = None
    item_ids: Sequence[str] = ()
    item_deltas: F32 | None = None
    user_acc: npt.NDArray[np.float32] | None = None
    item_acc_deltas: npt.NDArray[np.float32] | None = None
    item_versions: Sequence[int] | npt.NDArray[np.int64] | None = None
    item_rows: F32 | None = None
    item_acc: npt.NDArray[np.float32] | None = None
    counts: Mapping[str, float] = field(default_factory=dict)
    popularity: Mapping[str, float] = field(default_factory=dict)
    pop_ref_ms: int = 0
    user_increments: Mapping[str, int] = field(default_factory=dict)
    seen: Sequence[tuple[str, str, int]] = ()
    seen_upkeep: Mapping[str, int] | None = None
    erase: Mapping[str, int] = field(default_factory=dict)
    more: Sequence[Fence] = ()


SEEN_PRUNE = 1  # seen_upkeep flag: drop items clicked more than the retention before the user's newest click
SEEN_EXPIRE = 2  # seen_upkeep flag: (re)set the set's TTL


@dataclass(frozen=True)
class Fence:
    """One more events partition a :class:`BatchWrite` covers: its stored applied offset must be
    ``expected_offset`` (absent when None); the write sets it to ``new_offset`` with ``watermarks``."""

    partition: int
    expected_offset: int | None
    new_offset: int
    watermarks: Mapping[str, Any]


class ApplyStatus(IntEnum):
    """Outcome of ``FactorStore.apply_batch``; only ``APPLIED`` is truthy."""

    APPLIED = 1
    STALE = 0  # the offset fence failed: nothing written; reseek to the stored offset + 1
    NEW_GENERATION = -1  # live_gen is no longer g: nothing written; seek to the new generation's offsets
    POPULARITY_MOVED = -6  # another writer set or rescaled the decayed popularity's reference: reload, retry

    def __bool__(self) -> bool:
        return self is ApplyStatus.APPLIED
