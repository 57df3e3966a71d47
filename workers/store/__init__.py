"""The factor store: the one owner of the Redis key schema (docs/redis-schema.md).

:mod:`.keys` holds every key template, :mod:`.codec` the float32 blob encoding, :mod:`.lua` the scripts and
:mod:`.factor_store` the :class:`FactorStore` that reads and writes them. Callers import from here.
"""

from workers.store.codec import DTYPE, decode, encode, encode_joined
from workers.store.factor_store import ApplyStatus, BatchState, FactorStore, GenerationMeta, ModelMeta
from workers.store.keys import KEY_PREFIX, SCHEMA_VERSION, TABLES, Keys, Table

__all__ = [
    "DTYPE",
    "KEY_PREFIX",
    "SCHEMA_VERSION",
    "TABLES",
    "ApplyStatus",
    "BatchState",
    "FactorStore",
    "GenerationMeta",
    "Keys",
    "ModelMeta",
    "Table",
    "decode",
    "encode",
    "encode_joined",
]
