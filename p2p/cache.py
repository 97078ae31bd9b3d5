"""The node blob cache: a sparse copy of each blob plus a persisted presence bitmap over fetch units.

Per blob, in ``<root>/blobs/sha256/<hex>/``::

    data       sparse file laid out exactly like the blob (byte x of the blob is byte x of the file)
    bitmap     32 B header + one bit per fetch unit (1 = present: verified and durable)
    complete   exists once every unit is present and the whole file's SHA-256 equals the blob digest

Everything is root's alone: the cache root and every directory below it are mode 0700 (forced at every
start, whoever created them), the files 0600 — the cache holds the bytes of every image on the node.

    bitmap header: 0 magic "DFLYBMAP" | 8 u16 major | 10 u16 minor | 12 u32 unit size
                   | 16 u64 blob size | 24 4x | 28 u32 CRC32 of bytes 0..27

Write order, and what a crash leaves: fetched bytes are verified (below), written to ``data`` and
fdatasync'ed; only then are their units' bits written to ``bitmap`` and that fdatasync'ed. So a set bit
always means durable, verified bytes; a crash at any point loses at most units whose bits were not yet
written, and those are fetched again. ``complete`` is written last (temp file, fsync, rename).

Verification before anything is marked present: the blob is a chunk container (blockformat), opened
with the index digest from the image manifest. Each structure in a fetched range is checked — the
header by its CRC32, each chunk by its SHA-256 from the index, the index and trailer against the bytes
verified at open — and a unit is marked present only when every structure overlapping it was checked.
A fetch therefore widens a run of missing units to whole chunks at its edges.

Reads of present units never touch the network. Concurrent reads of the same missing unit make one
upstream request: the first reader claims the unit, the others wait for it — each no longer than its
own deadline (`p2p.deadline`). A fetch that fails puts its units in a cool-down: for `fail_cooldown`
seconds a read that needs them fails at once (`CoolingDownError`) instead of waiting on the upstream
again (the kernel retries a failed read at once, and a loop device serves its reads one by one).

**Sealed.** A blob is *sealed* when this process has checked the whole file's SHA-256 against the blob
digest; its readers then skip the per-chunk SHA-256 (`sealed` says why that is safe). A ``complete``
marker found at open means "every unit was present and verified once" — it spares the network, not the
checks: the blob is read locally with per-chunk checks until a re-verification of the whole file in
this process (`verify_complete`, run by the background download) seals it, so bytes damaged on disk
while the daemon was down are caught. A chunk that fails its check when read from the cache is
`repair`ed: its units are forgotten and fetched again, verified, and the read is retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blockformat.chunkfile import HEADER_SIZE, MAX_BLOB_SIZE, TAIL_READ, ChunkReader
from blockformat.durable import PRIVATE_FILE_MODE, atomic_write, private_dir
from blockformat.errors import CorruptBlobError, SourceError
from blockformat.source import RangeSource

from . import deadline
from .digest import Digest, parse_digest
from .errors import CacheError, CoolingDownError, DeadlineExceededError

log = logging.getLogger(__name__)

BITMAP_MAGIC = b"DFLYBMAP"
BITMAP_MAJOR = 1
BITMAP_MINOR = 0
BITMAP_HEADER = struct.Struct("<8sHHIQ4x")  # + CRC32 = 32 bytes
BITMAP_HEADER_SIZE = BITMAP_HEADER.size + 4
#: 64 KiB: a cold 4 KiB read moves 3-7x less than with 1 MiB units, and the background download
#: still streams in ~4 MiB requests (scripts/bench_fetch.py, bench/results/fetch.md).
DEFAULT_UNIT_SIZE = 64 << 10


@dataclass(frozen=True)
class Progress:
    present_units: int
    total_units: int
    present_bytes: int
    size: int
    complete: bool

    @property
    def fraction(self) -> float:
        return self.present_units / self.total_units if self.total_units else 1.0


class _Flight:
    """One in-progress upstream fetch that other readers of the same units wait for."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class _RawView:
    """What the chunk reader sees while the blob's geometry is being learnt: the cache where units are
    present, the upstream elsewhere (those bytes are kept so they can be verified and stored after)."""

    def __init__(self, blob: CachedBlob) -> None:
        self.blob = blob
        self.fetched: list[tuple[int, bytes]] = []

    @property
    def name(self) -> str:
        return self.blob.name

    def size(self) -> int:
        return self.blob.size()

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.blob.size())
        if self.blob.units_present(offset, end - offset):
            return self.blob.read_local(offset, end - offset)
        # Widen to whole units so what is fetched can be stored.
        u = self.blob.unit_size
        start = offset - offset % u
        data = self.blob.upstream_read(start, end - start)
        self.fetched.append((start, data))
        return data[offset - start :]


class CachedBlob:
    """One blob in the cache, readable as a `RangeSource` (`read` fetches what is missing)."""

    def __init__(
        self,
        cache: BlobCache,
        digest: Digest,
        size: int,
        upstream: RangeSource,
        index_digest: str | None,
    ) -> None:
        self.cache = cache
        self.digest = digest
        self._size = size
        self.upstream = upstream
        self.index_digest = index_digest
        self.unit_size = cache.unit_size
        self.units = (size + self.unit_size - 1) // self.unit_size
        self.dir = cache.blob_dir(digest)
        self._lock = threading.Lock()
        self._flights: dict[int, _Flight] = {}
        self._geometry: ChunkReader | None = None
        self._geometry_lock = threading.Lock()
        self._cooling: dict[int, float] = {}  # unit -> until when a read of it fails at once
        self.upstream_requests = 0
        self.upstream_bytes = 0
        self.local_bytes = 0
        self.repairs = 0  # structures found damaged in the cache and fetched again
        self.refs = 0
        #: Set when units are forgotten (`repair`, `discard`): a finished background download resumes.
        self.changed = threading.Event()
        private_dir(self.dir)
        self._data_fd = _open_private(os.path.join(self.dir, "data"))
        try:
            if os.fstat(self._data_fd).st_size != size:
                os.ftruncate(self._data_fd, size)
            self._bits = self._load_bitmap()
        except BaseException:
            os.close(self._data_fd)
            raise
        # The marker spares the network, not the checks: sealed only once re-verified in this process.
        self._complete = os.path.exists(os.path.join(self.dir, "complete"))
        self._sealed = False
        self._generation = 0  # counts `_drop_complete_marker`s: a seal checks nothing changed meanwhile
        if self._complete and self.present_count() != self.units:
            self._drop_complete_marker()

    # -- RangeSource -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"cache:{self.digest}"

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        self.ensure(offset, end - offset)
        return self.read_local(offset, end - offset)

    # -- state -----------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self._complete

    def sealed(self) -> bool:
        """True when every byte `read` returns was verified and the data file can no longer change.

        Readers (`ChunkReader(verified=...)`) then skip the per-chunk SHA-256. That is safe because:
        - this process checked the whole file's SHA-256 against the blob digest (`verify_complete`),
          after every unit was present — a ``complete`` marker left by an earlier process does not
          count: the file may have been damaged while no daemon watched it;
        - only this class writes ``data``, and only bytes that passed their checks (`_verify_and_store`);
        - once sealed nothing writes ``data`` again: `ensure` returns at once, `discard` and `repair`
          unseal first, and eviction never touches an open blob.
        What is left is storage damage after the check, or another root process writing our cache
        directory (mode 0700) — the trust every read from a local file system takes."""
        return self._sealed

    @property
    def verified(self) -> bool:
        """Whether the whole blob was checked against its digest in this process (same as `sealed`)."""
        return self._sealed

    def present_count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def is_present(self, unit: int) -> bool:
        return bool(self._bits[unit >> 3] & (1 << (unit & 7)))

    def units_present(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        first, last = offset // self.unit_size, (offset + length - 1) // self.unit_size
        return all(self.is_present(u) for u in range(first, last + 1))

    def missing_units(self) -> list[int]:
        return [u for u in range(self.units) if not self.is_present(u)]

    def progress(self) -> Progress:
        present = self.present_count()
        last_present = self.units and self.is_present(self.units - 1)
        nbytes = present * self.unit_size
        if last_present:
            nbytes -= self.units * self.unit_size - self._size
        return Progress(present, self.units, nbytes, self._size, self._complete)

    # -- bitmap ----------------------------------------------------------------------------------

    def _bitmap_header(self) -> bytes:
        h = BITMAP_HEADER.pack(BITMAP_MAGIC, BITMAP_MAJOR, BITMAP_MINOR, self.unit_size, self._size)
        return h + struct.pack("<I", zlib.crc32(h) & 0xFFFFFFFF)

    def _load_bitmap(self) -> bytearray:
        path = os.path.join(self.dir, "bitmap")
        nbytes = (self.units + 7) // 8
        try:
            with open(path, "rb") as f:
                raw = f.read(BITMAP_HEADER_SIZE + nbytes + 1)  # a longer file is not ours either
        except FileNotFoundError:
            raw = b""
        header = self._bitmap_header()
        if raw[:BITMAP_HEADER_SIZE] == header and len(raw) == BITMAP_HEADER_SIZE + nbytes:
            self._bitmap_fd = _open_private(path, create=False)
            return bytearray(raw[BITMAP_HEADER_SIZE:])
        if raw:
            log.warning("%s: bitmap does not match (size, unit or damage); starting the blob afresh", path)
        # A new (or unusable) bitmap: written whole to a temp file and renamed, so it is never torn.
        with atomic_write(path, PRIVATE_FILE_MODE) as f:
            f.write(header + bytes(nbytes))
        self._bitmap_fd = _open_private(path, create=False)
        return bytearray(nbytes)

    def _mark_present(self, first: int, last: int) -> None:
        """Set the bits of units first..last (inclusive) and make them durable."""
        if first > last:
            return
        with self._lock:
            for u in range(first, last + 1):
                self._bits[u >> 3] |= 1 << (u & 7)
            lo, hi = first >> 3, (last >> 3) + 1
            os.pwrite(self._bitmap_fd, bytes(self._bits[lo:hi]), BITMAP_HEADER_SIZE + lo)
        os.fdatasync(self._bitmap_fd)

    # -- local I/O -------------------------------------------------------------------------------

    def read_local(self, offset: int, length: int) -> bytes:
        data = os.pread(self._data_fd, length, offset)
        self.local_bytes += len(data)
        return data

    def upstream_read(self, offset: int, length: int) -> bytes:
        data = self.upstream.read(offset, length)
        with self._lock:
            self.upstream_requests += 1
            self.upstream_bytes += len(data)
        if len(data) != length:
            raise SourceError(self.name, offset, length, f"upstream returned {len(data)} bytes")
        return data

    # -- geometry and verification ---------------------------------------------------------------

    def geometry(self) -> ChunkReader:
        """The blob's verified trailer and index (fetched once; its tail units are stored)."""
        if self._geometry is not None:
            return self._geometry
        left = deadline.remaining()
        if not self._geometry_lock.acquire(timeout=-1 if left is None else left):
            raise SourceError(self.name, 0, 0, "waiting for the blob's index") from DeadlineExceededError(
                f"{self.name}: index"
            )
        try:
            if self._geometry is None:
                view = _RawView(self)
                g = self._geometry = ChunkReader(view, self.index_digest, cache_chunks=0)
                for fetched_at, fetched in view.fetched:
                    start, data = fetched_at, fetched
                    if HEADER_SIZE < start < g.index_offset:
                        # The unit-aligned tail read began inside a chunk: fetch that chunk's head
                        # (less than a chunk) so the first unit can be verified and kept, not refetched.
                        cstart = g.chunk_range(g.chunk_at(start))[0]
                        if cstart < start:
                            data = self.upstream_read(cstart, start - cstart) + data
                            start = cstart
                    try:
                        self._verify_and_store(start, data)
                    except CorruptBlobError as e:  # as in _fetch_units: the upstream lied, not the cache
                        raise SourceError(
                            self.name, start, len(data), f"upstream sent wrong bytes: {e}"
                        ) from e
            return self._geometry
        finally:
            self._geometry_lock.release()

    def _verified_span(self, g: ChunkReader, a: int, data: bytes | memoryview) -> tuple[int, int]:
        """Check every whole structure in [a, a+len(data)); return the span [v0, v1) they cover.

        Raises CorruptBlobError for the first structure that fails its check."""
        b = a + len(data)
        idx = g.index_offset
        mv = memoryview(data)
        # Start: the first structure that begins at or after a.
        if a == 0:
            v0 = 0
            if b < HEADER_SIZE:
                return 0, 0
            g.check_header(bytes(mv[:HEADER_SIZE]))
            pos = HEADER_SIZE
        elif a < HEADER_SIZE:
            pos = v0 = HEADER_SIZE
        else:
            pos = v0 = a
        if pos < idx:
            i = g.chunk_at(pos)
            start, _n = g.chunk_range(i)
            if start < pos:  # a chunk cut by the start of the range cannot be checked: skip it
                i += 1
                pos = v0 = g.chunk_range(i)[0] if i < g.chunk_count else idx
            while i < g.chunk_count:
                start, n = g.chunk_range(i)
                if start + n > b:
                    return v0, start
                g.check_stored(i, mv[start - a : start - a + n])
                i += 1
            pos = idx
        if pos >= b:
            return v0, b
        g.check_tail(pos, mv[pos - a :])
        return v0, b

    def _verify_and_store(self, a: int, data: bytes | memoryview) -> None:
        g = self._geometry
        assert g is not None
        v0, v1 = self._verified_span(g, a, data)
        if v1 <= v0:
            return
        u = self.unit_size
        first = (v0 + u - 1) // u
        last = v1 // u - 1 if v1 < self._size else self.units - 1
        if first > last:
            return
        lo, hi = first * u, min((last + 1) * u, self._size)
        chunk = memoryview(data)[lo - a : hi - a]
        written = os.pwrite(self._data_fd, chunk, lo)
        if written != len(chunk):
            raise CacheError(f"{self.name}: short write to the cache ({written} of {len(chunk)} bytes)")
        os.fdatasync(self._data_fd)
        self._mark_present(first, last)

    def _expanded(self, g: ChunkReader, a: int, b: int) -> tuple[int, int]:
        """Widen [a, b) to whole structures so every unit inside it can be verified."""
        idx = g.index_offset
        if a < HEADER_SIZE:
            a = 0
        elif a < idx:
            a = g.chunk_range(g.chunk_at(a))[0]
        if HEADER_SIZE < b <= idx:
            i = g.chunk_at(b - 1)
            start, n = g.chunk_range(i)
            b = start + n
        return a, b

    # -- fetching --------------------------------------------------------------------------------

    def ensure(self, offset: int, length: int) -> None:
        """Make every unit of [offset, offset+length) present, fetching missing ones from upstream.

        Bounded by this thread's deadline (`p2p.deadline`); units that failed a moment ago fail at once."""
        if length <= 0 or self._complete:
            return
        u = self.unit_size
        first, last = offset // u, (offset + length - 1) // u
        if all(self.is_present(x) for x in range(first, last + 1)):
            return
        self._check_cooling(first, last, offset, length)
        g = self.geometry()
        while True:
            mine: list[int] = []
            waits: list[_Flight] = []
            flight = _Flight()
            with self._lock:
                for x in range(first, last + 1):
                    if self.is_present(x):
                        continue
                    other = self._flights.get(x)
                    if other is not None:
                        waits.append(other)
                    else:
                        self._flights[x] = flight
                        mine.append(x)
            if mine:
                try:
                    for run_first, run_last in _runs(mine):
                        self._fetch_units(g, run_first, run_last)
                except BaseException as e:
                    flight.error = e
                    if not isinstance(_cause(e), DeadlineExceededError):  # our own time, not its fault
                        self._cool(mine)
                    raise
                finally:
                    with self._lock:
                        for x in mine:
                            self._flights.pop(x, None)
                    flight.done.set()
            for w in waits:
                if not w.done.wait(deadline.remaining()):
                    raise SourceError(
                        self.name, offset, length, "waiting for a concurrent fetch of the same units"
                    ) from DeadlineExceededError(f"{self.name}: {offset}+{length}")
                if w.error is not None:
                    raise SourceError(
                        self.name, offset, length, f"a concurrent fetch failed: {w.error}"
                    ) from w.error
            if not waits:
                return
            # Units another reader fetched are present now; loop once more for any it could not mark.
            if all(self.is_present(x) for x in range(first, last + 1)):
                return

    def _check_cooling(self, first: int, last: int, offset: int, length: int) -> None:
        """Raise at once if a missing unit of first..last failed less than `fail_cooldown` ago."""
        if not self._cooling:
            return
        now = time.monotonic()
        with self._lock:
            for x in [x for x, until in self._cooling.items() if until <= now]:
                del self._cooling[x]
            until = max(
                (self._cooling.get(x, 0.0) for x in range(first, last + 1) if not self.is_present(x)),
                default=0.0,
            )
        if until > now:
            raise SourceError(self.name, offset, length, "its units failed to fetch a moment ago") from (
                CoolingDownError(f"{self.name}: {offset}+{length}", "the last fetch failed", until - now)
            )

    def _cool(self, units: list[int]) -> None:
        until = time.monotonic() + self.cache.fail_cooldown
        with self._lock:
            for x in units:
                self._cooling[x] = until

    def _fetch_units(self, g: ChunkReader, first: int, last: int) -> None:
        u = self.unit_size
        a, b = first * u, min((last + 1) * u, self._size)
        a, b = self._expanded(g, a, b)
        data = self.upstream_read(a, b - a)
        try:
            self._verify_and_store(a, data)
        except CorruptBlobError as e:
            raise SourceError(self.name, a, b - a, f"upstream sent wrong bytes: {e}") from e
        if not all(self.is_present(x) for x in range(first, last + 1)):
            raise CacheError(f"{self.name}: units {first}..{last} could not be verified after fetching")
        if self._cooling:
            with self._lock:
                for x in range(first, last + 1):
                    self._cooling.pop(x, None)

    def repair(self, offset: int) -> None:
        """A structure at blob offset `offset`, read from this cache, failed its check: the bytes on
        disk are damaged. Forget the units that hold it, so the next read fetches them again (verified),
        and unseal the blob. The background download, if it finished, resumes (`changed`)."""
        g = self._geometry
        if g is None and offset >= HEADER_SIZE:
            try:
                g = self.geometry()  # the index, from the cache when its bytes there are sound
            except (CorruptBlobError, SourceError):
                g = None
        if g is not None and HEADER_SIZE <= offset < g.index_offset:
            start, n = g.chunk_range(g.chunk_at(offset))
            end = start + max(n, 1)
        elif offset < HEADER_SIZE:
            start, end = 0, HEADER_SIZE
        else:  # the index or the trailer (or a geometry not known yet): the whole tail
            start, end = min(offset, max(0, self._size - TAIL_READ)), self._size
        u = self.unit_size
        first, last = start // u, (max(end, start + 1) - 1) // u
        with self._lock:
            for x in range(first, min(last, self.units - 1) + 1):
                self._bits[x >> 3] &= ~(1 << (x & 7)) & 0xFF
            lo, hi = first >> 3, (min(last, self.units - 1) >> 3) + 1
            os.pwrite(self._bitmap_fd, bytes(self._bits[lo:hi]), BITMAP_HEADER_SIZE + lo)
            self._drop_complete_marker()
            self.repairs += 1
        os.fdatasync(self._bitmap_fd)
        self.changed.set()
        log.warning(
            "%s: damaged bytes in the cache at offset %d (units %d..%d); they are fetched again",
            self.name,
            offset,
            first,
            last,
        )

    # -- completion ------------------------------------------------------------------------------

    def verify_complete(self) -> bool:
        """Seal the blob: if every unit is present, check the whole file's SHA-256 against the digest —
        in this process, even when a ``complete`` marker says an earlier one did — and on a match write
        the marker (if missing) and seal. On a mismatch forget every unit so all is fetched again."""
        if self._sealed:
            return True
        generation = self._generation
        if self.present_count() != self.units:
            return False
        algo, _, want = self.digest.partition(":")
        h = hashlib.new(algo)
        pos = 0
        while pos < self._size:
            chunk = os.pread(self._data_fd, min(8 << 20, self._size - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            pos += len(chunk)
        if h.hexdigest() != want:
            log.warning(
                "%s: whole-blob digest mismatch (got %s:%s); fetching it again",
                self.name,
                algo,
                h.hexdigest(),
            )
            self.discard()
            return False
        marker = os.path.join(self.dir, "complete")
        if not os.path.exists(marker):
            with atomic_write(marker, PRIVATE_FILE_MODE) as f:
                f.write(self.digest.encode() + b"\n")
        with self._lock:
            if generation != self._generation:  # a repair forgot units while we hashed: not sealed
                return False
            self._complete = self._sealed = True
        return True

    def discard(self) -> None:
        """Forget every unit (the bytes are refetched on demand)."""
        with self._lock:
            self._drop_complete_marker()
            self._bits = bytearray(len(self._bits))
            os.pwrite(self._bitmap_fd, bytes(self._bits), BITMAP_HEADER_SIZE)
            os.fdatasync(self._bitmap_fd)
            os.ftruncate(self._data_fd, 0)
            os.ftruncate(self._data_fd, self._size)
        self.changed.set()

    def _drop_complete_marker(self) -> None:
        """Unseal and forget completeness (first, before any byte or bit changes)."""
        self._sealed = self._complete = False
        self._generation += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, "complete"))

    def close(self) -> None:
        for fd in (self._data_fd, self._bitmap_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._data_fd = self._bitmap_fd = -1


def _runs(units: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted unit numbers -> (first, last) of each run of neighbours."""
    start = prev = units[0]
    for x in units[1:]:
        if x != prev + 1:
            yield start, prev
            start = x
        prev = x
    yield start, prev


class BlobCache:
    """All cached blobs of a node under one root, with size accounting and LRU eviction.

    `fail_cooldown`: seconds a read needing units whose fetch just failed fails at once (0: never;
    the device daemon sets it, see the module docstring).

    `open` returns the blob (shared by every user of the same digest) and counts a reference; `release`
    drops it. Only complete blobs with no reference are ever evicted.
    """

    def __init__(
        self,
        root: str,
        unit_size: int = DEFAULT_UNIT_SIZE,
        limit_bytes: int = 0,
        fail_cooldown: float = 0.0,
    ) -> None:
        if unit_size <= 0 or unit_size & (unit_size - 1) or unit_size < 4096:
            raise CacheError(f"fetch unit {unit_size} must be a power of two of at least 4096 bytes")
        self.root = root
        self.unit_size = unit_size
        self.limit_bytes = limit_bytes
        self.fail_cooldown = fail_cooldown
        self._lock = threading.Lock()
        self._open: dict[Digest, CachedBlob] = {}
        self._last_use: dict[Digest, float] = {}
        for d in (root, os.path.join(root, "blobs"), os.path.join(root, "blobs", "sha256")):
            private_dir(d)

    def blob_dir(self, digest: Digest) -> str:
        algo, _, hexpart = digest.partition(":")
        return os.path.join(self.root, "blobs", algo, hexpart)

    def open(
        self,
        digest: str,
        size: int,
        upstream: RangeSource,
        index_digest: str | None = None,
    ) -> CachedBlob:
        d = parse_digest(digest)
        if not 0 < size <= MAX_BLOB_SIZE:
            # The size comes from outside (a descriptor, a label, a HEAD): the bitmap is sized by it.
            raise CacheError(
                f"blob {d}: declared size {size} is outside 1..{MAX_BLOB_SIZE} bytes (the largest chunk "
                "container a reader accepts); the image or its labels are wrong"
            )
        with self._lock:
            blob = self._open.get(d)
            if blob is None:
                blob = CachedBlob(self, d, size, upstream, index_digest)
                self._open[d] = blob
            blob.refs += 1
            self._last_use[d] = time.monotonic()
        if self.limit_bytes:
            self.evict()
        return blob

    def release(self, blob: CachedBlob) -> None:
        with self._lock:
            blob.refs -= 1
            self._last_use[blob.digest] = time.monotonic()
            if blob.refs <= 0:
                blob.close()
                self._open.pop(blob.digest, None)
        if self.limit_bytes:
            self.evict()

    def entries(self) -> Iterator[tuple[Digest, str]]:
        base = os.path.join(self.root, "blobs")
        for algo in sorted(os.listdir(base)):
            for hexpart in sorted(os.listdir(os.path.join(base, algo))):
                yield Digest(f"{algo}:{hexpart}"), os.path.join(base, algo, hexpart)

    def usage(self) -> int:
        """Bytes the cache occupies on disk (allocated blocks of the sparse data files and bitmaps)."""
        total = 0
        for _d, path in self.entries():
            for name in ("data", "bitmap"):
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(path, name)).st_blocks * 512
        return total

    def evict(self, on_evict: Callable[[Digest], None] | None = None) -> list[Digest]:
        """Remove complete, unused blobs, least recently used first, until usage is within the limit."""
        evicted: list[Digest] = []
        if not self.limit_bytes:
            return evicted
        usage = self.usage()
        if usage <= self.limit_bytes:
            return evicted
        candidates: list[tuple[float, Digest, str]] = []
        with self._lock:
            for d, path in self.entries():
                if d in self._open or not os.path.exists(os.path.join(path, "complete")):
                    continue
                last = self._last_use.get(d)
                if last is None:  # not used by this process: fall back to the marker's mtime
                    last = os.stat(os.path.join(path, "complete")).st_mtime - time.time() + time.monotonic()
                candidates.append((last, d, path))
        for _last, d, path in sorted(candidates):
            if usage <= self.limit_bytes:
                break
            size = 0
            with self._lock:
                if d in self._open:
                    continue
                for name in ("complete", "bitmap", "data"):
                    p = os.path.join(path, name)
                    with contextlib.suppress(FileNotFoundError):
                        size += os.stat(p).st_blocks * 512
                        os.unlink(p)
                with contextlib.suppress(OSError):
                    os.rmdir(path)
                self._last_use.pop(d, None)
            usage -= size
            evicted.append(d)
            log.info("evicted %s (%d bytes) from the blob cache", d, size)
            if on_evict is not None:
                on_evict(d)
        return evicted


def _open_private(path: str, create: bool = True) -> int:
    """Open a cache file read-write, mode 0600 (also one an older version made 0644)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _cause(e: BaseException) -> BaseException:
    """The innermost explicit cause of `e` (its ``__cause__`` chain), or `e` itself."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e
