"""Who fetches which missing unit of a cached blob, and which units failed a moment ago.

Concurrent reads of the same missing unit make one upstream request: the first reader *claims* the unit
(its `Flight`), the others wait for that flight — each no longer than its own deadline — and see its
error if it failed. A fetch that fails (other than by the reader's own deadline) puts its units in a
*cool-down*: until it ends, a read that needs them fails at once instead of waiting on the upstream
again (the kernel retries a failed read at once, and a loop device serves its reads one by one).

The bookkeeping shares its owner's lock (`p2p.cachedblob.CachedBlob`), the one that also guards the
presence bits: a unit is seen either present, or claimed, or free — never marked present by one thread
while another claims it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable


class Flight:
    """One in-progress upstream fetch that other readers of the same units wait for."""

    __slots__ = ("done", "error", "fetched")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        #: Bytes the fetch got, by source (`p2p.tally`): its waiters count them as theirs.
        self.fetched: dict[str, int] = {}


class UnitFlights:
    """The claimed units of one blob (unit -> its flight) and the cooling ones (unit -> until when)."""

    def __init__(self, lock: threading.Lock, present: Callable[[int], bool]) -> None:
        self._lock = lock
        self._present = present
        self._flights: dict[int, Flight] = {}
        self._cooling: dict[int, float] = {}

    def claim(self, units: Iterable[int]) -> tuple[list[int], Flight, list[Flight]]:
        """Claim every missing unit nobody is fetching: (the units claimed, the flight to `finish` for
        them, the other readers' flights to wait for)."""
        mine: list[int] = []
        waits: list[Flight] = []
        flight = Flight()
        with self._lock:
            for x in units:
                if self._present(x):
                    continue
                other = self._flights.get(x)
                if other is not None:
                    waits.append(other)
                else:
                    self._flights[x] = flight
                    mine.append(x)
        return mine, flight, waits

    def finish(self, mine: list[int], flight: Flight, error: BaseException | None) -> None:
        """End the flight of `mine` (with the error that ended it, if any) and wake its waiters."""
        flight.error = error
        with self._lock:
            for x in mine:
                self._flights.pop(x, None)
        flight.done.set()

    def cooling_until(self, units: Iterable[int]) -> float:
        """The latest end of a cool-down among the missing `units` (0.0: none cools down)."""
        if not self._cooling:
            return 0.0
        now = time.monotonic()
        with self._lock:
            for x in [x for x, until in self._cooling.items() if until <= now]:
                del self._cooling[x]
            return max((self._cooling.get(x, 0.0) for x in units if not self._present(x)), default=0.0)

    def cool(self, units: Iterable[int], seconds: float) -> None:
        until = time.monotonic() + seconds
        with self._lock:
            for x in units:
                self._cooling[x] = until

    def uncool(self, units: Iterable[int]) -> None:
        if self._cooling:
            with self._lock:
                for x in units:
                    self._cooling.pop(x, None)
