"""The node blob cache: a sparse copy of each blob plus a persisted presence bitmap over fetch units.

Per blob, in ``<root>/blobs/sha256/<hex>/``::

    data       sparse file laid out exactly like the blob (byte x of the blob is byte x of the file)
    bitmap     32 B header + one bit per fetch unit (1 = present: verified and durable)
    complete   exists once every unit is present and the whole file's SHA-256 equals the blob digest

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
upstream request: the first reader claims the unit, the others wait for it.
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

from blockformat.chunkfile import HEADER_SIZE, ChunkReader
from blockformat.errors import CorruptBlobError, SourceError
from blockformat.source import RangeSource

from .digest import Digest, parse_digest
from .errors import CacheError

log = logging.getLogger(__name__)

BITMAP_MAGIC = b"DFLYBMAP"
BITMAP_MAJOR = 1
BITMAP_MINOR = 0
BITMAP_HEADER = struct.Struct("<8sHHIQ4x")  # + CRC32 = 32 bytes
BITMAP_HEADER_SIZE = BITMAP_HEADER.size + 4
#: 64 KiB: a cold 4 KiB read moves 3-7x less than with 1 MiB units, and the background download
#: still streams in ~4 MiB requests (scripts/bench_fetch.py, bench/results/fetch.md).
DEFAULT_UNIT_SIZE = 64 << 10


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self.upstream_requests = 0
        self.upstream_bytes = 0
        self.local_bytes = 0
        self.refs = 0
        os.makedirs(self.dir, exist_ok=True)
        self._data_fd = os.open(os.path.join(self.dir, "data"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(self._data_fd).st_size != size:
                os.ftruncate(self._data_fd, size)
            self._bits = self._load_bitmap()
        except BaseException:
            os.close(self._data_fd)
            raise
        self._complete = os.path.exists(os.path.join(self.dir, "complete"))
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
        - only this class writes ``data``, and only bytes that passed their checks (`_verify_and_store`:
          each chunk's SHA-256 against the verified index, before the write);
        - ``complete`` is set only after the whole file's SHA-256 equalled the blob digest
          (`verify_complete`), or when this process found the marker written by such a check and every
          unit present;
        - once complete nothing writes ``data`` again: `ensure` returns at once, `discard` runs only for
          an incomplete blob (`verify_complete` returns before it), and eviction never touches an open
          blob (it unlinks files of blobs nobody holds; an open descriptor keeps the old file anyway).
        What is left is storage damage after the check, or another root process writing our cache
        directory — the trust every read from a local file system (e.g. an overlayfs layer) takes."""
        return self._complete

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
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        header = self._bitmap_header()
        if raw[:BITMAP_HEADER_SIZE] == header and len(raw) == BITMAP_HEADER_SIZE + nbytes:
            self._bitmap_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            return bytearray(raw[BITMAP_HEADER_SIZE:])
        if raw:
            log.warning("%s: bitmap does not match (size, unit or damage); starting the blob afresh", path)
        # A new (or unusable) bitmap: written whole to a temp file and renamed, so it is never torn.
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header + bytes(nbytes))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)
        self._bitmap_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
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
        with self._geometry_lock:
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
        """Make every unit of [offset, offset+length) present, fetching missing ones from upstream."""
        if length <= 0 or self._complete:
            return
        u = self.unit_size
        first, last = offset // u, (offset + length - 1) // u
        if all(self.is_present(x) for x in range(first, last + 1)):
            return
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
                    raise
                finally:
                    with self._lock:
                        for x in mine:
                            self._flights.pop(x, None)
                    flight.done.set()
            for w in waits:
                w.done.wait()
                if w.error is not None:
                    raise SourceError(self.name, offset, length, f"a concurrent fetch failed: {w.error}")
            if not waits:
                return
            # Units another reader fetched are present now; loop once more for any it could not mark.
            if all(self.is_present(x) for x in range(first, last + 1)):
                return

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

    # -- completion ------------------------------------------------------------------------------

    def verify_complete(self) -> bool:
        """If every unit is present, check the whole file's SHA-256 against the digest; on a match
        write the ``complete`` marker. On a mismatch, clear the bitmap so everything is fetched again."""
        if self._complete:
            return True
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
        with open(marker + ".tmp", "wb") as f:
            f.write(self.digest.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)
        _fsync_dir(self.dir)
        self._complete = True
        return True

    def discard(self) -> None:
        """Forget every unit (the bytes are refetched on demand)."""
        with self._lock:
            self._bits = bytearray(len(self._bits))
            os.pwrite(self._bitmap_fd, bytes(self._bits), BITMAP_HEADER_SIZE)
            os.fdatasync(self._bitmap_fd)
            self._drop_complete_marker()
            os.ftruncate(self._data_fd, 0)
            os.ftruncate(self._data_fd, self._size)

    def _drop_complete_marker(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, "complete"))
        self._complete = False

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

    `open` returns the blob (shared by every user of the same digest) and counts a reference; `release`
    drops it. Only complete blobs with no reference are ever evicted.
    """

    def __init__(self, root: str, unit_size: int = DEFAULT_UNIT_SIZE, limit_bytes: int = 0) -> None:
        if unit_size <= 0 or unit_size & (unit_size - 1) or unit_size < 4096:
            raise CacheError(f"fetch unit {unit_size} must be a power of two of at least 4096 bytes")
        self.root = root
        self.unit_size = unit_size
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._open: dict[Digest, CachedBlob] = {}
        self._last_use: dict[Digest, float] = {}
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)

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
