"""The factor store: the one owner of the Redis key schema (docs/redis-schema.md).

:mod:`.keys` holds every key template, :mod:`.codec` the float32 row encoding, :mod:`.records` the typed
records, :mod:`.lua` the scripts and :mod:`.factor_store` the :class:`FactorStore` that reads and writes
them. Callers import from here.
"""

from workers.store.codec import DTYPE, decode, encode, encode_joined
from workers.store.factor_store import LEASE_S, FactorStore, ModelLost
from workers.store.keys import GLOBAL_ROW, KEY_PREFIX, SCHEMA_VERSION, TABLES, Keys, Table
from workers.store.records import (
    SEEN_EXPIRE,
    SEEN_PRUNE,
    ApplyStatus,
    BatchState,
    BatchWrite,
    Fence,
    GenerationMeta,
    ModelMeta,
)

__all__ = [
    "DTYPE",
    "GLOBAL_ROW",
    "KEY_PREFIX",
    "LEASE_S",
    "SCHEMA_VERSION",
    "SEEN_EXPIRE",
    "SEEN_PRUNE",
    "TABLES",
    "ApplyStatus",
    "BatchState",
    "BatchWrite",
    "FactorStore",
    "Fence",
    "GenerationMeta",
    "Keys",
    "ModelLost",
    "ModelMeta",
    "Table",
    "decode",
    "encode",
    "encode_joined",
]
