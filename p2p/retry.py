"""Retry policy and timeouts for registry requests.

What is retried: failures that say nothing about the request itself — a connection that could not be
made or broke, a timeout, ``5xx``, and ``429 Too Many Requests``. Everything else (4xx, wrong bytes) is
final at once.

Bounds: at most `RetryPolicy.attempts` tries AND at most `RetryPolicy.budget` seconds from the first
try, whichever comes first. The delay before try n+1 is ``base_delay * 2**n`` capped at `max_delay`, with
up to 25 % random jitter (so a fleet that failed together does not retry together), or the server's
``Retry-After`` when it sends one — unless that would end past the budget, in which case we fail now
rather than sleep for nothing.

Timeouts: every request has httpx connect/read/write/pool timeouts, so no single socket operation can
block longer than `Timeouts.read`; and a body is read against a deadline of ``total + bytes received /
min_rate`` seconds, checked at every network read, so a server that trickles bytes cannot stretch a
request past that plus one `Timeouts.read` either.

A caller's deadline (`p2p.deadline`: the device daemon's read timeout) bounds all of it: each socket
timeout is cut to what is left of it, a body is cut off at it, and no retry starts (nor backoff sleeps)
past it. Then the call fails with `RegistryUnavailableError` naming the last cause.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Timeouts:
    """Seconds, and a rate. One response must be complete within ``total + received / min_rate``.

    So a small answer gets `total` seconds however it trickles, and a 4 GB blob is not cut off for
    being big — only for arriving slower than `min_rate` bytes/s on average.
    """

    connect: float = 10.0
    read: float = 30.0
    write: float = 30.0
    pool: float = 10.0
    total: float = 60.0
    min_rate: float = 256 * 1024

    def httpx(self, cap: float | None = None) -> httpx.Timeout:
        """The socket timeouts, each at most `cap` seconds when given (what is left of a deadline)."""
        if cap is None:
            return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)
        return httpx.Timeout(
            connect=min(self.connect, cap),
            read=min(self.read, cap),
            write=min(self.write, cap),
            pool=min(self.pool, cap),
        )


@dataclass(frozen=True)
class Deadline:
    """When the body of one response must be complete (see `Timeouts`), and at the latest `hard`: the
    caller's own deadline (`p2p.deadline`, a `time.monotonic()` value), when it has one."""

    clock: Callable[[], float]
    start: float
    total: float
    min_rate: float
    hard: float | None = None

    @classmethod
    def starting_now(
        cls, timeouts: Timeouts, clock: Callable[[], float], hard: float | None = None
    ) -> Deadline:
        return cls(clock, clock(), timeouts.total, timeouts.min_rate, hard)

    def expired(self, received: int) -> bool:
        if self.hard is not None and time.monotonic() > self.hard:
            return True
        return self.clock() > self.start + self.total + received / self.min_rate


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff."""

    attempts: int = 5
    budget: float = 60.0
    base_delay: float = 0.2
    max_delay: float = 10.0
    jitter: float = 0.25

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Delay before retry number `retry` (0-based) when the server named none."""
        delay = min(self.max_delay, self.base_delay * 2.0**retry)
        r = rng.random() if rng is not None else random.random()
        return delay * (1 - self.jitter * r)


NO_RETRY = RetryPolicy(attempts=1, budget=0.0)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)
