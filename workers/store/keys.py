"""Every Redis key template of one model (the schema in docs/redis-schema.md); nothing else formats keys.

All keys of one model carry the hash tag ``{<ns>}`` under the versioned prefix ``zcf:v<SCHEMA_VERSION>:``.
Schema 2 (this one) stores every factor row as ``k`` latent values followed by the row's bias, keeps two
AdaGrad accumulator values per row (latent block, bias), holds the model's global bias in the item table under
the reserved id :data:`GLOBAL_ROW` (an empty string: never a valid item id), and keeps a time-decayed
popularity per generation.

>>> Keys("zerocf").vectors(3, "item")
'zcf:v2:{zerocf}:g:3:item'
>>> Keys("zerocf").legacy_meta(1)
'zcf:v1:{zerocf}:meta'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stream.errors import ConfigError

SCHEMA_VERSION = 2
KEY_PREFIX = f"zcf:v{SCHEMA_VERSION}:"
Table = Literal["user", "item", "user_acc", "item_acc"]
TABLES: tuple[Table, ...] = ("user", "item", "user_acc", "item_acc")
GLOBAL_ROW = ""  # item-table field of the global bias row (ids are 1..256 bytes, so it never clashes)

__all__ = ["GLOBAL_ROW", "KEY_PREFIX", "SCHEMA_VERSION", "TABLES", "Keys", "Table"]


@dataclass(frozen=True)
class Keys:
    """Every key template of one model. ``ns`` must not contain braces or whitespace.

    >>> Keys("zerocf").seen("u42")
    'zcf:v2:{zerocf}:seen:u42'
    """

    ns: str

    def __post_init__(self) -> None:
        if not self.ns or any(c in self.ns for c in "{} \t\r\n"):
            raise ConfigError(
                f"namespace {self.ns!r} must be non-empty without braces or whitespace; "
                "use the topic prefix, e.g. zerocf"
            )

    @property
    def base(self) -> str:
        return f"{KEY_PREFIX}{{{self.ns}}}"

    @property
    def meta(self) -> str:
        return f"{self.base}:meta"

    def legacy_meta(self, version: int) -> str:
        """The meta hash of an older schema version (to recognise a model that needs a rebuild)."""
        return f"zcf:v{int(version)}:{{{self.ns}}}:meta"

    @property
    def gens(self) -> str:
        return f"{self.base}:gens"

    def gen_meta(self, g: int) -> str:
        return f"{self.base}:g:{int(g)}:meta"

    def vectors(self, g: int, table: str) -> str:
        if table not in TABLES:
            raise ValueError(f"table {table!r} is not one of {TABLES}")
        return f"{self.base}:g:{int(g)}:{table}"

    def offsets(self, g: int) -> str:
        return f"{self.base}:g:{int(g)}:offsets"

    def watermarks(self, g: int) -> str:
        return f"{self.base}:g:{int(g)}:wm"

    def counts(self, g: int) -> str:
        """All-time click count per item (ZSET)."""
        return f"{self.base}:g:{int(g)}:counts"

    def popularity(self, g: int) -> str:
        """Time-decayed click weight per item (ZSET, scores relative to the generation's ``pop_ref_ms``)."""
        return f"{self.base}:g:{int(g)}:pop"

    def updates(self, g: int) -> str:
        return f"{self.base}:g:{int(g)}:nupd"

    def item_versions(self, g: int) -> str:
        """Write count per item row (HASH, item_id -> integer): bumped by every ``apply_batch`` that writes the
        row, so a worker can tell whether the row it holds is still the stored one (absent = 0)."""
        return f"{self.base}:g:{int(g)}:iver"

    def lease(self, g: int) -> str:
        """The builder's lease on a ``building`` generation (a string with a TTL, renewed while it writes)."""
        return f"{self.base}:g:{int(g)}:lease"

    def seen(self, user: str) -> str:
        return f"{self.base}:seen:{user}"

    @property
    def erased(self) -> str:
        """Tombstones of erased users (ZSET, ``stream.erasure.erased_digest(user)`` -> erased_at ms); not per
        generation, like the seen sets."""
        return f"{self.base}:erased"

    def generation_keys(self, g: int) -> list[str]:
        """All keys owned by generation ``g`` (what :meth:`FactorStore.drop_generation` unlinks)."""
        return [
            self.gen_meta(g),
            *(self.vectors(g, t) for t in TABLES),
            self.offsets(g),
            self.watermarks(g),
            self.counts(g),
            self.popularity(g),
            self.updates(g),
            self.item_versions(g),
            self.lease(g),
        ]

    @property
    def quality_workers(self) -> str:
        """Live quality: LMF worker id -> when it last published its figures (ZSET, epoch s); pruned by the
        writers and expiring with them. Not per generation (a worker's figures span generation swaps)."""
        return f"{self.base}:quality"

    def quality(self, worker: str) -> str:
        """One LMF worker's live-quality figures (STRING, JSON; :mod:`workers.online.quality`), with a TTL so
        a dead worker's figures expire."""
        return f"{self.base}:quality:{worker}"
