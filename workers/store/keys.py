"""Every Redis key template of one model (the schema in docs/redis-schema.md); nothing else formats keys.

All keys of one model carry the hash tag ``{<ns>}`` under the versioned prefix ``zcf:v<SCHEMA_VERSION>:``.

>>> Keys("zerocf").vectors(3, "item")
'zcf:v1:{zerocf}:g:3:item'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stream.errors import ConfigError

SCHEMA_VERSION = 1
KEY_PREFIX = f"zcf:v{SCHEMA_VERSION}:"
Table = Literal["user", "item", "user_acc", "item_acc"]
TABLES: tuple[Table, ...] = ("user", "item", "user_acc", "item_acc")

__all__ = ["KEY_PREFIX", "SCHEMA_VERSION", "TABLES", "Keys", "Table"]


@dataclass(frozen=True)
class Keys:
    """Every key template of one model. ``ns`` must not contain braces or whitespace.

    >>> Keys("zerocf").seen("u42")
    'zcf:v1:{zerocf}:seen:u42'
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
        return f"{self.base}:g:{int(g)}:counts"

    def updates(self, g: int) -> str:
        return f"{self.base}:g:{int(g)}:nupd"

    def seen(self, user: str) -> str:
        return f"{self.base}:seen:{user}"

    def generation_keys(self, g: int) -> list[str]:
        """All keys owned by generation ``g`` (what :meth:`FactorStore.drop_generation` unlinks)."""
        return [
            self.gen_meta(g),
            *(self.vectors(g, kd) for kd in TABLES),
            self.offsets(g),
            self.watermarks(g),
            self.counts(g),
            self.updates(g),
        ]
