"""Background full download: after a delay, fetch every missing unit of a cached blob at a bounded
rate, check the whole blob's digest, and mark it complete — from then on no read of it needs the
network (DADI's answer to containers that outlive their registry connection). A blob found complete
at open is re-verified the same way (`CachedBlob.verify_complete`), and units forgotten later because
a read found them damaged on disk (`CachedBlob.repair`) are fetched again.

One `BackgroundDownload` per blob owns its worker threads: `start` launches them, `stop` cancels and
joins them, so no thread outlives its owner. Network failures are retried with capped exponential
backoff for as long as the download is wanted; a whole-blob digest mismatch discards the copy and
starts again, at most `max_digest_attempts` times.

**The cache limit** (`p2p.cache`): a background download fills the cache up to `BACKGROUND_SHARE` of
its limit, evicting unused blobs on the way. When no room is left it stops fetching — the blob stays
partial, which the cache logs once and counts — in state ``cache-full``, and tries again whenever room
may have been made (a blob released, evicted or emptied: `BlobCache.changes`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass

from .cache import BACKGROUND_SHARE, CachedBlob, Progress
from .errors import CacheFullError

log = logging.getLogger(__name__)


class State(enum.Enum):
    WAITING = "waiting"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    COMPLETE = "complete"
    FAILED = "failed"
    STOPPED = "stopped"
    #: Stopped by the cache limit, the blob partial; resumes when room is made.
    CACHE_FULL = "cache-full"


#: Seconds between two looks at the cache for room, while a download waits in `State.CACHE_FULL`.
ROOM_POLL = 0.5


@dataclass(frozen=True)
class Status:
    state: State
    progress: Progress
    failures: int
    error: str | None


class RateLimiter:
    """A token bucket over bytes; `acquire` waits (interruptibly) until the bytes may be sent."""

    def __init__(self, bytes_per_second: float, stop: threading.Event) -> None:
        self.rate = bytes_per_second
        self.stop = stop
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def acquire(self, nbytes: int) -> bool:
        """Reserve `nbytes`; False if stopped while waiting."""
        if self.rate <= 0:
            return not self.stop.is_set()
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now)
            self._next = start + nbytes / self.rate
        wait = start - now
        return not self.stop.wait(wait) if wait > 0 else not self.stop.is_set()


class BackgroundDownload:
    def __init__(
        self,
        blob: CachedBlob,
        delay: float = 5.0,
        rate_bytes_per_second: float = 0.0,
        concurrency: int = 2,
        batch_units: int | None = None,
        max_digest_attempts: int = 3,
        max_backoff: float = 30.0,
    ) -> None:
        self.blob = blob
        self.delay = delay
        self.concurrency = max(1, concurrency)
        # Requests of about 4 MiB: big enough to stream at full speed (scripts/bench_fetch.py), whatever
        # the fetch unit that lazy reads use.
        self.batch_units = max(1, batch_units if batch_units is not None else (4 << 20) // blob.unit_size)
        self.max_digest_attempts = max_digest_attempts
        self.max_backoff = max_backoff
        self._stop = threading.Event()
        self._done = threading.Event()
        self._limiter = RateLimiter(rate_bytes_per_second, self._stop)
        self._lock = threading.Lock()
        self._state = State.WAITING
        self._failures = 0
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self._full = threading.Event()  # a fetch found no room within the cache limit

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> BackgroundDownload:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"bg-{self.blob.digest[7:19]}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            if self._state not in (State.COMPLETE, State.FAILED):
                self._state = State.STOPPED
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the blob is complete and verified, or the download ended; True if verified."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.blob.sealed() and not self._done.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            self._done.wait(0.05 if left is None else min(0.05, left))
        return self.blob.sealed()

    def status(self) -> Status:
        with self._lock:
            return Status(self._state, self.blob.progress(), self._failures, self._error)

    def _set(self, state: State, error: str | None = None) -> None:
        with self._lock:
            self._state = state
            if error is not None:
                self._error = error

    # -- work ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._stop.wait(self.delay):
                return
            while True:
                self.blob.changed.clear()
                sealed = self._download_and_seal()
                if sealed is None:  # the cache limit: wait for room, then go on
                    if not self._wait_for_room():
                        return
                    continue
                if not sealed:
                    return  # stopped, or failed for good
                # Sealed. Nothing to do until a read finds damaged bytes in the cache and `repair`
                # forgets their units: then they are fetched again and the blob sealed anew.
                while not self.blob.changed.is_set():
                    if self._stop.wait(0.5):
                        return
                log.info("%s: units were forgotten (damaged on disk); downloading them again", self.blob.name)
        except Exception as e:  # a local failure (disk full, ...): report it, never die silently
            log.exception("%s: background download failed", self.blob.name)
            self._set(State.FAILED, str(e))
        finally:
            self._done.set()

    def _wait_for_room(self) -> bool:
        """Wait in `State.CACHE_FULL` until room may have been made; False if stopped meanwhile."""
        cache = self.blob.cache
        seen = cache.changes
        self._set(State.CACHE_FULL)
        while not self._stop.wait(ROOM_POLL):
            if cache.changes != seen or not cache.limit_bytes:
                self._full.clear()
                return True
        return False

    def _download_and_seal(self) -> bool | None:
        """Fetch what is missing and check the whole blob (also a complete one: a ``complete`` marker
        from an earlier process is re-verified); False if stopped or out of attempts, None if the
        cache limit left no room for the rest."""
        for attempt in range(1, self.max_digest_attempts + 1):
            if self.blob.missing_units():
                self._set(State.DOWNLOADING)
                if not self._fetch_all():
                    return None if self._full.is_set() and not self._stop.is_set() else False
            self._set(State.VERIFYING)
            if self.blob.verify_complete():
                self._set(State.COMPLETE)
                log.info("%s: complete and verified", self.blob.name)
                return True
            if self._stop.is_set():
                return False
            if self.blob.missing_units():
                log.warning("%s: digest mismatch after full download (attempt %d)", self.blob.name, attempt)
        self._set(State.FAILED, f"the whole-blob digest did not match {self.max_digest_attempts} times")
        return False

    def _fetch_all(self) -> bool:
        """Fetch every missing unit with `concurrency` workers; False if stopped."""
        runs: list[tuple[int, int]] = []
        missing = self.blob.missing_units()
        i = 0
        while i < len(missing):
            j = i
            while j + 1 < len(missing) and missing[j + 1] == missing[j] + 1 and j + 1 - i < self.batch_units:
                j += 1
            runs.append((missing[i], missing[j]))
            i = j + 1
        queue_lock = threading.Lock()
        pending = list(reversed(runs))

        def worker() -> None:
            while not self._stop.is_set() and not self._full.is_set():
                with queue_lock:
                    if not pending:
                        return
                    first, last = pending.pop()
                self._fetch_run(first, last)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return not self._stop.is_set() and not self._full.is_set()

    def _fetch_run(self, first: int, last: int) -> None:
        u = self.blob.unit_size
        offset = first * u
        length = min((last + 1) * u, self.blob.size()) - offset
        backoff = 0.2
        while not self._stop.is_set():
            if not self._limiter.acquire(length):
                return
            try:
                self.blob.ensure(offset, length, share=BACKGROUND_SHARE)
                return
            except CacheFullError:
                self._full.set()  # logged and counted by the cache, once for the blob
                return
            except Exception as e:  # network or verification: wait and retry while wanted
                with self._lock:
                    self._failures += 1
                    self._error = str(e)
                log.warning(
                    "%s: background fetch of units %d..%d failed (%s); retrying in %.1fs",
                    self.blob.name,
                    first,
                    last,
                    e,
                    backoff,
                )
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, self.max_backoff)
