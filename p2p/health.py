"""Is an upstream worth waiting for? A circuit breaker per upstream (a registry, later a peer).

Without it, every read of a missing block waits out its whole deadline on an upstream that already
failed — and reads arrive one after another (a loop device serves its queue in order), so forty
readers of a hung registry took forty timeouts. With it:

- **closed** (healthy): every fetch goes through.
- **open**: the last fetch failed for want of an answer (a timeout, a refused connection, 5xx past
  the retries). For `cooldown` seconds every fetch fails at once with `CoolingDownError`.
- **half-open**: after the cool-down one fetch — the *probe* — goes through while the others keep
  failing at once. Its success closes the breaker; its failure opens it for another cool-down. So a
  registry that comes back serves again within one cool-down (at once, when a probe is in flight
  as it answers), and a dead one costs one waiting reader per cool-down, not one per read.

Only failures that say "no answer" count (`p2p.errors.RegistryUnavailableError`, `UnavailableError`).
An answer, even a 404 or wrong bytes, proves the upstream is there: it closes the breaker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CoolingDownError
from .settings import DEFAULT_COOLDOWN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admission:
    """A fetch that may go ahead; `probe` says whether it decides the breaker's state."""

    probe: bool


class Breaker:
    def __init__(
        self, name: str, cooldown: float = DEFAULT_COOLDOWN, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.cooldown = cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed
        self._why = ""
        self._probing = False
        self.refused = 0  # fetches failed at once (metrics, tests)
        self.trips = 0  # times the breaker opened

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def admit(self, what: str) -> Admission:
        """Let a fetch of `what` go ahead, or raise `CoolingDownError` at once."""
        with self._lock:
            if self._open_until is None:
                return Admission(probe=False)
            now = self._clock()
            if now >= self._open_until and not self._probing:
                self._probing = True
                return Admission(probe=True)
            self.refused += 1
            left = max(0.0, self._open_until - now)
            why = f"{self.name} failed: {self._why}" + ("; a probe is in flight" if self._probing else "")
        raise CoolingDownError(what, why, left)

    def succeeded(self, admission: Admission) -> None:
        with self._lock:
            if admission.probe:
                self._probing = False
            if self._open_until is not None:
                log.info("%s answers again", self.name)
            self._open_until = None

    def failed(self, admission: Admission, why: str) -> None:
        with self._lock:
            if admission.probe:
                self._probing = False
            if self._open_until is None:
                self.trips += 1
                log.warning(
                    "%s does not answer (%s); failing fetches from it for %.1fs",
                    self.name,
                    why,
                    self.cooldown,
                )
            self._open_until = self._clock() + self.cooldown
            self._why = why

    def done(self, admission: Admission) -> None:
        """The fetch ended without telling anything about the upstream (e.g. a local error)."""
        if admission.probe:
            with self._lock:
                self._probing = False
