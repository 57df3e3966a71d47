"""Errors of the stream package.

Every error derives from :class:`ZerocfError`; errors that a retry may cure set ``retriable = True``
(the same convention as kafka-python's errors).
"""

from __future__ import annotations


class ZerocfError(Exception):
    """Base class of every zerocf error."""

    retriable: bool = False


class ConfigError(ZerocfError, ValueError):
    """A configuration value is missing, unknown or out of range; the message names it and the fix."""


class InvalidEvent(ZerocfError, ValueError):
    """A raw record could not be turned into an event; ``reason`` is the human-readable cause.

    >>> e = InvalidEvent("item_ids has 501 items, the limit is 500")
    >>> e.reason
    'item_ids has 501 items, the limit is 500'
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServiceUnavailable(ZerocfError):
    """Kafka or Redis did not answer; retried with back-off by the workers."""

    retriable = True


class StackError(ZerocfError):
    """The local development stack could not be started, found or stopped."""
