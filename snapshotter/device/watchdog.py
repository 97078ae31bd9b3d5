"""Deadlines for FUSE requests answered off the request threads: each is answered exactly once, by
whoever comes first — the worker with the data, or the watchdog with EIO when the deadline passes.

Why a watchdog and not a timeout on the worker: a read that needs the network runs on the I/O pool,
and the pool can be full of reads waiting for a hung registry. A request queued behind them has not
started when its time is up; only a thread that watches the clock can answer it then. Together with
the deadline every worker passes down (`p2p.deadline`), this bounds the time of one FUSE request to
`read_timeout` plus scheduling, however many readers wait and whatever the network does.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Pending:
    """One request in flight on the I/O pool."""

    unique: int
    nodeid: int
    offset: int
    size: int
    deadline: float  # time.monotonic()
    _answered: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def claim(self) -> bool:
        """True for the first caller only: that caller answers the request."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            return True

    @property
    def answered(self) -> bool:
        return self._answered


class Watchdog:
    """Calls `expire(p)` for every watched request not claimed by its deadline, from one thread."""

    def __init__(self, expire: Callable[[Pending], None]) -> None:
        self._expire = expire
        self._heap: list[tuple[float, int, Pending]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fuse-watchdog", daemon=True)
        self._thread.start()

    def watch(self, p: Pending) -> None:
        with self._cond:
            heapq.heappush(self._heap, (p.deadline, next(self._seq), p))
            if self._heap[0][2] is p:
                self._cond.notify()

    def waiting(self, due_before: float) -> int:
        """How many watched requests, not answered yet, have a deadline before `due_before`."""
        with self._cond:
            return sum(1 for due, _seq, p in self._heap if due < due_before and not p.answered)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            due: list[Pending] = []
            with self._cond:
                if self._stopped:
                    return
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].answered):
                    p = heapq.heappop(self._heap)[2]
                    if not p.answered:
                        due.append(p)
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for p in due:
                if p.claim():
                    self._expire(p)
