"""Errors of the workers package.

Every error derives from :class:`WorkerError`, itself a :class:`stream.errors.ZerocfError`; errors that a
retry may cure set ``retriable = True``.

>>> issubclass(ModelDiverged, WorkerError)
True
"""

from __future__ import annotations

from stream.errors import ZerocfError

__all__ = ["GenerationError", "ModelDiverged", "StoreSchemaError", "WorkerError"]


class WorkerError(ZerocfError):
    """Base class of the errors raised by the LMF/ALS workers, the store and the lookup client."""


class StoreSchemaError(WorkerError):
    """What Redis holds does not match what this process expects (k, dtype, schema version, blob size).

    The message names the stored value, the expected one and the command that fixes it, e.g.
    ``redis model zerocf has k=32, worker configured k=64; rerun with --factors 32 ...``.
    """


class ModelDiverged(WorkerError):
    """A factor, delta, accumulator or bias is NaN or infinite; it was refused and nothing was written."""


class GenerationError(WorkerError):
    """A generation cannot be published, dropped or read in its current state (named in the message)."""
