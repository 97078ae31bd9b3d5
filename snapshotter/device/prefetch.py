"""Access traces on a device: recording what a container reads, and replaying it ahead of the reads.

**Recording** (`Recorder`, `damselfly record-trace`): every read the kernel sends the device file
while the recorder is armed — the mount's own reads, then the container's — is added to a
`blockformat.trace.RangeSet` (device blocks in first-access order; a read answered with a wider
window, `BlockFS`'s page store, counts as the window, since the kernel will not ask for those pages
again). It ends after its seconds or when stopped; `trace` makes a `blockformat.trace.Trace`.

**Replay** (`Replay`): when a chain is attached with a prefetch request (the chain mount names the
image's manifest), a thread finds the image's newest trace among its OCI referrers, checks that it was
recorded on the same chain (layers and size), maps its device ranges to the node-cache units of the
layer blobs that hold them (through the stack and each layer's chunk index), and fetches them in
first-access order with `WORKERS` threads, each unit verified as every fetched unit is
(`CachedBlob.ensure`). The container's own reads keep their own threads and connections and are
never queued behind the replay; while one of them waits on the network the replay runs at most
`WORKERS_UNDER_READS` fetches (its priority is below theirs). A unit a read needs while the replay has
it in flight is waited for, not fetched twice (the cache's unit flights). Nothing the replay does can
make a read fail: its failures are counted and logged, and the reads fetch what they need themselves.

The replay counts what containers read (`note_read`: the distinct blob units of the device's reads
during `WATCH_SECONDS`), how many of those units the replay fetched (`read_units_prefetched`), and how
many were not in the cache yet when a read needed them (`read_units_waited`: the read fetched them, or
waited for a fetch in flight). In ``damselfly devices``, per device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockformat.digest import parse_digest
from blockformat.errors import BlockFormatError
from blockformat.trace import TRACE_MEDIA_TYPE, RangeSet, Trace, clip, same_chain
from p2p import deadline
from p2p.errors import CacheFullError, P2PError
from p2p.manifest import Manifest
from p2p.node import BlobNode, BlobRef
from p2p.referrers import find_referrers

from ..errors import DeviceError

if TYPE_CHECKING:
    from .manager import ImageDevice

log = logging.getLogger(__name__)

#: Replay fetches in flight at once, and while a container's read waits on the network.
WORKERS = 8
WORKERS_UNDER_READS = 4
#: Units fetched by one request of the replay at most (consecutive units of one blob).
RUN_UNITS = 32
#: Units of the trace ordered together (sorted and joined into runs), and the gap a run bridges.
WINDOW_UNITS = 64
GAP_UNITS = 2
#: Seconds after the attach during which the container's reads are counted.
WATCH_SECONDS = 120.0
#: A recording lasts at most this long.
MAX_RECORD_SECONDS = 3600.0


@dataclass(frozen=True)
class PrefetchRequest:
    """Where to look for a chain's trace: the image manifest it is a referrer of, in a repository."""

    manifest: str
    registry: str
    repository: str
    plain_http: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "registry": self.registry,
            "repository": self.repository,
            "plain_http": self.plain_http,
        }

    @classmethod
    def from_json(cls, d: object) -> PrefetchRequest:
        if not isinstance(d, dict):
            raise DeviceError("malformed prefetch request: not an object")
        try:
            plain = d.get("plain_http")
            req = cls(
                str(d["manifest"]),
                str(d["registry"]),
                str(d["repository"]),
                None if plain is None else bool(plain),
            )
            parse_digest(req.manifest)
        except (KeyError, TypeError, ValueError, BlockFormatError, P2PError) as e:
            raise DeviceError(f"malformed prefetch request: {e}") from None
        return req


class Recorder:
    """The reads of one device while armed (thread-safe)."""

    def __init__(self, name: str, seconds: float) -> None:
        if not 0 < seconds <= MAX_RECORD_SECONDS:
            raise DeviceError(f"a recording lasts 0..{MAX_RECORD_SECONDS:.0f} seconds, not {seconds}")
        self.name = name
        self.until = time.monotonic() + seconds
        self._ranges = RangeSet()
        self._lock = threading.Lock()
        self.reads = 0
        self.layers: tuple[str, ...] | None = None  # the chain it saw attached
        self.vsize = 0

    def add(self, offset: int, length: int) -> None:
        if time.monotonic() > self.until:
            return
        with self._lock:
            self.reads += 1
            self._ranges.add(offset, length)

    def trace(self) -> Trace:
        if self.layers is None:
            raise DeviceError(
                f"device {self.name} was not attached while the trace was recorded: nothing was read"
            )
        with self._lock:
            ranges = clip(self._ranges.runs, self.vsize)
        return Trace(tuple(parse_digest(x) for x in self.layers), self.vsize, tuple(ranges), "recorded")


class Replay:
    """The replay of one attached device's trace (a thread), and the count of what it served."""

    def __init__(
        self,
        name: str,
        device: ImageDevice,
        layers: Sequence[str],
        node: BlobNode,
        request: PrefetchRequest,
        read_timeout: float,
    ) -> None:
        self.name = name
        self.device = device
        self.layers = layers
        self.node = node
        self.request = request
        self.read_timeout = read_timeout
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._foreground = 0
        self._active = 0
        self._lock = threading.Lock()
        self.state = "looking"
        self.error = ""
        self.trace_digest = ""
        self.ranges = 0
        self.planned_units = 0
        self.present_units = 0  # already in the cache when the replay came to them
        self.fetched_bytes = 0
        self.failures = 0
        #: The node cache had no room within its limit: what the replay fetched would not be kept, so it
        #: stops (the reads fetch what they need themselves).
        self.cache_full = threading.Event()
        self.seconds = 0.0
        self._fetched: set[tuple[int, int]] = set()  # (layer, unit) the replay fetched
        self._read: set[tuple[int, int]] = set()  # (layer, unit) the container's reads needed
        self._waited: set[tuple[int, int]] = set()  # ... and were not in the cache when read
        self._thread = threading.Thread(target=self._run, name=f"replay-{name[:12]}", daemon=True)

    def start(self) -> Replay:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the container's reads ---------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        return time.monotonic() - self.started < WATCH_SECONDS

    def note_read(self, offset: int, length: int) -> bool:
        """Count the units a read of the device needs; True when one of them is not in the cache yet
        (the read will wait on the network: `foreground` it)."""
        units, missing = [], []
        for i, first, last in self.device.blob_units(offset, length):
            cached = self.device.cached(i)
            for u in range(first, last + 1):
                units.append((i, u))
                if cached is not None and not cached.complete and not cached.is_present(u):
                    missing.append((i, u))
        with self._lock:
            self._read.update(units)
            self._waited.update(missing)
        return bool(missing)

    def foreground(self, delta: int) -> None:
        with self._cond:
            self._foreground += delta
            if self._foreground == 0:
                self._cond.notify_all()

    # -- the replay --------------------------------------------------------------------------------

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            trace = self._find()
            if trace is None:
                return
            runs = list(self._plan(trace))
            self.state = "replaying"
            log.info(
                "%s: replaying trace %s (%d ranges, %d units to fetch)",
                self.name,
                self.trace_digest,
                self.ranges,
                self.planned_units,
            )
            self._replay(runs)
            if not self._stop.is_set():
                self.state = "done"
                log.info(
                    "%s: trace replayed in %.2fs: %d bytes fetched, %d units already here, %d failed",
                    self.name,
                    time.monotonic() - t0,
                    self.fetched_bytes,
                    self.present_units,
                    self.failures,
                )
        except Exception as e:  # a hint that could not be followed: say why, never fail a read
            self.state, self.error = "failed", str(e)
            log.warning("%s: no trace prefetch: %s", self.name, e)
        finally:
            self.seconds = time.monotonic() - t0

    def _find(self) -> Trace | None:
        r = self.request
        with deadline.scope(time.monotonic() + self.read_timeout):
            client, _ = self.node.registry_client(r.registry, r.plain_http)
            found = find_referrers(client, r.repository, r.manifest, TRACE_MEDIA_TYPE)
            if not found:
                self.state = "none"
                log.info("%s: image %s has no trace to replay", self.name, r.manifest)
                return None
            manifest = client.get_manifest(r.repository, found[-1].digest)
            if not isinstance(manifest, Manifest) or len(manifest.layers) != 1:
                raise DeviceError(f"referrer {found[-1].digest} is not a trace manifest with one layer")
            blob = manifest.layers[0]
            if blob.media_type != TRACE_MEDIA_TYPE:
                raise DeviceError(f"referrer {found[-1].digest} holds a {blob.media_type}, not a trace")
            ref = BlobRef(blob.digest, blob.size, None, r.registry, r.repository, document=True)
            raw = self.node.document(ref, r.plain_http)
        self.trace_digest = blob.digest
        trace = Trace.from_json(raw, f"trace {blob.digest}")
        if not same_chain(trace, self.layers) or trace.vsize != self.device.size:
            self.state = "mismatch"
            log.warning(
                "%s: trace %s was recorded on another chain of layers; not replayed", self.name, blob.digest
            )
            return None
        self.ranges = len(trace.ranges)
        return trace

    def _plan(self, trace: Trace) -> Iterator[tuple[int, int, int]]:
        """(layer, first unit, last unit) runs to fetch, roughly in first-access order, each unit once.

        The units, in the order the trace first reads them, are taken `WINDOW_UNITS` at a time; within
        a window they are sorted and joined into runs, across gaps of up to `GAP_UNITS` units (a few
        units more cost less than a round trip), of at most `RUN_UNITS`."""
        order: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        for offset, length in trace.ranges:
            for i, first, last in self.device.blob_units(offset, length):
                for u in range(first, last + 1):
                    if (i, u) not in seen:
                        seen.add((i, u))
                        order.append((i, u))
        self.planned_units = len(order)
        for w in range(0, len(order), WINDOW_UNITS):
            window = sorted(order[w : w + WINDOW_UNITS])
            i0, first = window[0]
            last = first
            for i, u in window[1:]:
                if i == i0 and u - last <= GAP_UNITS + 1 and u - first < RUN_UNITS:
                    last = u
                    continue
                yield i0, first, last
                i0, first, last = i, u, u
            yield i0, first, last

    def _replay(self, runs: list[tuple[int, int, int]]) -> None:
        pending = list(reversed(runs))
        take = threading.Lock()

        def worker() -> None:
            while not self._stop.is_set() and not self.cache_full.is_set():
                with take:
                    if not pending:
                        return
                    i, first, last = pending.pop()
                if not self._slot():
                    return
                try:
                    self._fetch(i, first, last)
                finally:
                    with self._cond:
                        self._active -= 1
                        self._cond.notify_all()

        threads = [threading.Thread(target=worker, name=f"replay-{n}", daemon=True) for n in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _slot(self) -> bool:
        """Wait for a fetch slot: `WORKERS` in all, fewer while the container waits; False if stopped."""
        with self._cond:
            while not self._stop.is_set():
                limit = WORKERS_UNDER_READS if self._foreground else WORKERS
                if self._active < limit:
                    self._active += 1
                    return True
                self._cond.wait(0.05)
        return False

    def _fetch(self, i: int, first: int, last: int) -> None:
        cached = self.device.cached(i)
        if cached is None:
            return
        missing = [u for u in range(first, last + 1) if not cached.is_present(u)]
        with self._lock:
            self.present_units += last - first + 1 - len(missing)
        if not missing:
            return
        a, b = missing[0], missing[-1]
        u = cached.unit_size
        offset, end = a * u, min((b + 1) * u, cached.size())
        try:
            with deadline.scope(time.monotonic() + self.read_timeout):
                cached.ensure(offset, end - offset)
        except CacheFullError:
            if not self.cache_full.is_set():
                self.cache_full.set()
                log.info("%s: the node cache is full (its limit): the trace replay stops", self.name)
            return
        except Exception as e:
            with self._lock:
                self.failures += 1
            log.info("%s: prefetch of %s units %d..%d failed: %s", self.name, cached.name, a, b, e)
            return
        with self._lock:
            self._fetched.update((i, x) for x in missing)
            self.fetched_bytes += end - offset  # the units' bytes: some of them fetched already

    # -- status ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            read = len(self._read)
            prefetched = len(self._read & self._fetched)
            waited = len(self._waited)
            fetched_units = len(self._fetched)
        return {
            "state": self.state,
            "manifest": self.request.manifest,
            "trace": self.trace_digest,
            "error": self.error,
            "ranges": self.ranges,
            "planned_units": self.planned_units,
            "fetched_units": fetched_units,
            "present_units": self.present_units,
            "fetched_bytes": self.fetched_bytes,
            "failures": self.failures,
            "cache_full": self.cache_full.is_set(),
            "seconds": round(self.seconds, 3),
            "read_units": read,
            "read_units_prefetched": prefetched,
            "read_units_waited": waited,
        }
