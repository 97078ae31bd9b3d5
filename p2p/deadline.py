"""One deadline for everything a thread does to get some bytes: the synchronous cancel scope.

The device daemon answers a read within ``read_timeout`` whatever happens below it. It sets the read's
deadline once (`scope`), and every blocking step on the way asks how long it may still take
(`remaining`): the registry session caps each request's timeouts and its retries with it, the blob
cache waits for another reader's fetch only that long. So a thread that serves a read is free again
shortly after the read's deadline, instead of holding on to a hung connection for the registry
client's own (much longer) timeouts and retries.

Scopes nest: an inner scope can only shorten the deadline. The deadline is per thread (a read runs
on one thread); code that runs without a scope has none (`remaining` returns None).
"""

from __future__ import annotations

import threading
import time

from .errors import DeadlineExceededError

_local = threading.local()


class scope:  # noqa: N801 - used like a function: ``with deadline.scope(at):``
    """Run the body with deadline `at` (a `time.monotonic()` value), or the enclosing one if earlier.

    A class, not a generator-based context manager: the device daemon enters one per read."""

    __slots__ = ("_at", "_outer")

    def __init__(self, at: float | None) -> None:
        self._at = at
        self._outer: float | None = None

    def __enter__(self) -> None:
        outer: float | None = getattr(_local, "at", None)
        self._outer = outer
        at = self._at
        _local.at = at if outer is None else outer if at is None else min(outer, at)

    def __exit__(self, *exc: object) -> None:
        _local.at = self._outer


def current() -> float | None:
    """The deadline of this thread, or None."""
    at: float | None = getattr(_local, "at", None)
    return at


def remaining() -> float | None:
    """Seconds left until this thread's deadline (never negative), or None without one."""
    at = current()
    return None if at is None else max(0.0, at - time.monotonic())


def cap(seconds: float) -> float:
    """`seconds`, or less if this thread's deadline comes first."""
    left = remaining()
    return seconds if left is None else min(seconds, left)


def check(what: str) -> None:
    """Raise `DeadlineExceededError` if this thread's deadline has passed."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceededError(what)
