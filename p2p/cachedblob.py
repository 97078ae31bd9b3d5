"""One blob in the node cache: a sparse copy of it that fills as it is read, never with unchecked bytes.

Files, in the blob's directory (`p2p.cache`): ``data`` (laid out exactly like the blob), ``bitmap``
(one bit per fetch unit: `p2p.bitmap`) and ``complete``. Normative spec: docs/format.md §6.

Write order, and what a crash leaves: fetched bytes are verified (below), written to ``data`` and
fdatasync'ed; only then are their units' bits written to ``bitmap`` and that fdatasync'ed. So a set bit
always means durable, verified bytes; a crash at any point loses at most units whose bits were not yet
written, and those are fetched again. ``complete`` is written last (temp file, fsync, rename).

Verification before anything is marked present: the blob is a chunk container (blockformat), whose
index (`ChunkIndex`, loaded once per blob: `CachedBlob.index`) is checked against the index digest
from the image manifest. Each structure in a fetched range is checked — the header by its CRC32, each
chunk by its SHA-256 from the index, the index and trailer against the bytes verified at open
(`ChunkIndex.verified_span`) — and a unit is marked present only when every structure overlapping it
was checked. A fetch therefore widens a run of missing units to whole chunks at its edges
(`ChunkIndex.expand`).

**Within the cache limit** (`p2p.cache`): a write reserves its room first. A store refused for want of
room leaves its units missing; `read` serves them from the verified bytes it fetched (*spilled*, not
kept), and `ensure` — which fetches to keep — raises `CacheFullError`, before any fetch when the cache
is full already.

Reads of present units never touch the network. Concurrent reads of the same missing unit make one
upstream request, and a unit whose fetch failed fails at once for `fail_cooldown` seconds
(`CoolingDownError`): `p2p.flights`. Every wait is bounded by the reader's deadline (`p2p.deadline`).

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
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockformat.chunkindex import ChunkIndex
from blockformat.chunklayout import HEADER_SIZE, TAIL_READ
from blockformat.digest import Digest, Verifier
from blockformat.durable import PRIVATE_FILE_MODE, atomic_write, private_dir
from blockformat.errors import CorruptBlobError, SourceError
from blockformat.source import RangeSource

from . import deadline, tally
from .bitmap import PresenceBitmap, open_private
from .errors import CacheError, CacheFullError, CoolingDownError, DeadlineExceededError, unavailable_cause
from .flights import UnitFlights
from .transport import CheckedSource

if TYPE_CHECKING:
    from .cache import BlobCache

log = logging.getLogger(__name__)

#: The allocation unit assumed when reserving room in the cache (file systems' usual block size).
BLOCK = 4096


def blocks(nbytes: int) -> int:
    """`nbytes` rounded up to whole blocks."""
    return -(-nbytes // BLOCK) * BLOCK


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


class _RawView:
    """What `ChunkIndex.load` reads while the blob's index is being learnt: the cache where units are
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
        self._flights = UnitFlights(self._lock, self.is_present)
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()
        self.upstream_requests = 0
        self.upstream_bytes = 0
        self.local_bytes = 0
        self.repairs = 0  # structures found damaged in the cache and fetched again
        self.refs = 0
        #: Set when units are forgotten (`repair`, `discard`): a finished background download resumes.
        self.changed = threading.Event()
        private_dir(self.dir)
        self._data_fd = open_private(os.path.join(self.dir, "data"))
        try:
            if os.fstat(self._data_fd).st_size != size:
                os.ftruncate(self._data_fd, size)
            self._bitmap = PresenceBitmap(os.path.join(self.dir, "bitmap"), self.unit_size, size)
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
        """Bytes [offset, offset+length), fetching missing units. Units the cache has no room to keep
        (its limit) are served from the verified bytes fetched for this read."""
        end = min(offset + length, self._size)
        if end <= offset:
            return b""
        spilled: list[tuple[int, bytes]] = []
        self.ensure(offset, end - offset, spilled)
        if not spilled:
            return self.read_local(offset, end - offset)
        return self._compose(offset, end, spilled)

    def _compose(self, offset: int, end: int, spilled: list[tuple[int, bytes]]) -> bytes:
        """[offset, end) from the spilled pieces (whole verified units) where they cover it, else from
        the data file (units present: `ensure` made every unit present or spilled)."""
        out = bytearray()
        pos = offset
        uncached = 0
        for start, data in sorted(spilled, key=lambda x: x[0]):
            stop = min(start + len(data), end)
            if stop <= pos:
                continue
            if start > pos:
                out += self.read_local(pos, min(start, end) - pos)
                pos = min(start, end)
                if pos >= end:
                    break
            out += data[pos - start : stop - start]
            uncached += stop - pos
            pos = stop
        if pos < end:
            out += self.read_local(pos, end - pos)
        self.cache.note_uncached(uncached)
        return bytes(out)

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
        return self._bitmap.count()

    def is_present(self, unit: int) -> bool:
        return self._bitmap.is_present(unit)

    def units_present(self, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        first, last = offset // self.unit_size, (offset + length - 1) // self.unit_size
        return all(self.is_present(u) for u in range(first, last + 1))

    def missing_units(self) -> list[int]:
        return self._bitmap.missing()

    def progress(self) -> Progress:
        present = self.present_count()
        last_present = self.units and self.is_present(self.units - 1)
        nbytes = present * self.unit_size
        if last_present:
            nbytes -= self.units * self.unit_size - self._size
        return Progress(present, self.units, nbytes, self._size, self._complete)

    def _mark_present(self, first: int, last: int) -> None:
        """Set the bits of units first..last (inclusive) and make them durable."""
        if first > last:
            return
        with self._lock:
            self._bitmap.set(first, last)
        self._bitmap.sync()

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

    # -- the index and verification ---------------------------------------------------------------

    def index(self) -> ChunkIndex:
        """The blob's trailer and index, verified (`ChunkIndex`): loaded once per blob, from the cache's
        units where they are present and from upstream elsewhere; the tail units fetched are verified
        against it and stored. Readers of the blob share it (``ChunkReader(..., index=blob.index())``).

        Waits for another thread's load no longer than this thread's deadline (`p2p.deadline`)."""
        if self._index is not None:
            return self._index
        left = deadline.remaining()
        if not self._index_lock.acquire(timeout=-1 if left is None else left):
            raise SourceError(self.name, 0, 0, "waiting for the blob's index") from DeadlineExceededError(
                f"{self.name}: index"
            )
        try:
            if self._index is None:
                view = _RawView(self)
                g = self._index = self._load_index(view)
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
            return self._index
        finally:
            self._index_lock.release()

    def _load_index(self, view: _RawView) -> ChunkIndex:
        """`ChunkIndex.load` through `view`. Bytes a checked source fetched unchecked for it (from a
        peer) that fail the index's checks are blamed on their sender, and the load tried again (the
        next try asks someone else)."""
        attempts = 3 if isinstance(self.upstream, CheckedSource) else 1
        for attempt in range(attempts):
            try:
                return ChunkIndex.load(view, self.index_digest)
            except CorruptBlobError:
                if attempt + 1 == attempts or not view.fetched:
                    raise
                assert isinstance(self.upstream, CheckedSource)
                self.upstream.distrust_unchecked()
                view.fetched.clear()
        raise AssertionError("unreachable")

    def _verify_and_store(
        self, a: int, data: bytes | memoryview, share: float = 1.0
    ) -> tuple[int, bytes] | None:
        """Check the structures in [a, a+len(data)) (`ChunkIndex.verified_span`), then write the whole
        units they cover to ``data``, fdatasync it, and only then mark those units present.

        The write reserves its room in the cache first (within `share` of its limit). Without room,
        nothing is written and the verified whole units are returned as (offset, bytes) instead."""
        g = self._index
        if g is None:
            raise CacheError(f"{self.name}: bytes to store before the blob's index is known")
        v0, v1 = g.verified_span(a, data)
        if v1 <= v0:
            return None
        u = self.unit_size
        first = (v0 + u - 1) // u
        last = v1 // u - 1 if v1 < self._size else self.units - 1
        if first > last:
            return None
        lo, hi = first * u, min((last + 1) * u, self._size)
        chunk = memoryview(data)[lo - a : hi - a]
        need = self._room_for(first, last)
        if not self.cache.reserve(need, share):
            self.cache.note_full(self, need)
            return lo, bytes(chunk)
        try:
            written = os.pwrite(self._data_fd, chunk, lo)
            if written != len(chunk):
                raise CacheError(f"{self.name}: short write to the cache ({written} of {len(chunk)} bytes)")
            os.fdatasync(self._data_fd)
            self._mark_present(first, last)
        finally:
            self.cache.settle(need, self)
        return None

    def _room_for(self, first: int, last: int) -> int:
        """What writing units first..last may take on disk: the missing ones, in whole blocks, plus a
        block for the file system's bookkeeping (an extent tree block of a fragmented sparse file)."""
        u = self.unit_size
        missing = sum(
            min((x + 1) * u, self._size) - x * u for x in range(first, last + 1) if not self.is_present(x)
        )
        return blocks(missing) + BLOCK

    # -- fetching --------------------------------------------------------------------------------

    def ensure(
        self,
        offset: int,
        length: int,
        spill: list[tuple[int, bytes]] | None = None,
        share: float = 1.0,
    ) -> None:
        """Make every unit of [offset, offset+length) present, fetching missing ones from upstream.

        Units the cache has no room for (its limit, `share` of it for this caller) are fetched and
        verified all the same; with `spill` their bytes are appended to it as (offset, whole units),
        without it `CacheFullError` is raised — at once, before fetching, if the cache is full already.

        Bounded by this thread's deadline (`p2p.deadline`); units that failed a moment ago fail at once."""
        if length <= 0 or self._complete:
            return
        u = self.unit_size
        first, last = offset // u, (offset + length - 1) // u
        if all(self.is_present(x) for x in range(first, last + 1)):
            return
        self._check_cooling(first, last, offset, length)
        if spill is None and self.cache.limit_bytes:
            need = self._room_for(first, last)
            if not self.cache.has_room(need, share):
                self.cache.note_full(self, need)
                raise CacheFullError(self.name, need, self.cache.limit_bytes)
        g = self.index()
        while True:
            mine, flight, waits = self._flights.claim(range(first, last + 1))
            if mine:
                error: BaseException | None = None
                kept_out: list[tuple[int, bytes]] = []
                fetched = tally.watch()
                try:
                    with fetched:
                        for run_first, run_last in _runs(mine):
                            self._fetch_units(g, run_first, run_last, kept_out, share)
                except BaseException as e:
                    error = e
                    if not isinstance(unavailable_cause(e), DeadlineExceededError):  # our own time
                        self._flights.cool(mine, self.cache.fail_cooldown)
                    raise
                finally:
                    # Waiters for units not kept find them missing and fetch them for themselves.
                    flight.fetched = fetched.counts
                    self._flights.finish(mine, flight, error)
                if kept_out:
                    if spill is None:
                        nbytes = sum(len(d) for _o, d in kept_out)
                        raise CacheFullError(self.name, nbytes, self.cache.limit_bytes)
                    spill.extend(kept_out)
            for w in waits:
                if not w.done.wait(deadline.remaining()):
                    raise SourceError(
                        self.name, offset, length, "waiting for a concurrent fetch of the same units"
                    ) from DeadlineExceededError(f"{self.name}: {offset}+{length}")
                if w.error is not None:
                    raise SourceError(
                        self.name, offset, length, f"a concurrent fetch failed: {w.error}"
                    ) from w.error
                tally.add_all(w.fetched)
            if not waits:
                return
            # Units another reader fetched are present now; loop once more for any it could not mark.
            if all(self.is_present(x) for x in range(first, last + 1)):
                return

    def _check_cooling(self, first: int, last: int, offset: int, length: int) -> None:
        """Raise at once if a missing unit of first..last failed less than `fail_cooldown` ago."""
        until = self._flights.cooling_until(range(first, last + 1))
        now = time.monotonic()
        if until > now:
            raise SourceError(self.name, offset, length, "its units failed to fetch a moment ago") from (
                CoolingDownError(f"{self.name}: {offset}+{length}", "the last fetch failed", until - now)
            )

    def _fetch_units(
        self, g: ChunkIndex, first: int, last: int, kept_out: list[tuple[int, bytes]], share: float
    ) -> None:
        """Fetch units first..last, verify and store them; units the cache has no room for go to
        `kept_out` (whole verified units) instead."""
        u = self.unit_size
        # Whole structures only: a unit is marked present once every structure overlapping it checked.
        a, b = g.expand(first * u, min((last + 1) * u, self._size))
        spilled: list[tuple[int, bytes]] = []
        if isinstance(self.upstream, CheckedSource):
            # The source tries its transports in turn; bytes that fail here are another's to send.
            def store(data: bytes) -> None:
                piece = self._verify_and_store(a, data, share)
                if piece is not None:
                    spilled.append(piece)
                with self._lock:
                    self.upstream_requests += 1
                    self.upstream_bytes += len(data)

            self.upstream.fetch_checked(a, b - a, store)
        else:
            data = self.upstream_read(a, b - a)
            try:
                piece = self._verify_and_store(a, data, share)
            except CorruptBlobError as e:
                raise SourceError(self.name, a, b - a, f"upstream sent wrong bytes: {e}") from e
            if piece is not None:
                spilled.append(piece)
        held = {x for o, d in spilled for x in range(o // u, (o + len(d) - 1) // u + 1)}
        if not all(self.is_present(x) or x in held for x in range(first, last + 1)):
            raise CacheError(f"{self.name}: units {first}..{last} could not be verified after fetching")
        kept_out.extend(spilled)
        self._flights.uncool(range(first, last + 1))

    def repair(self, offset: int) -> None:
        """A structure at blob offset `offset`, read from this cache, failed its check: the bytes on
        disk are damaged. Forget the units that hold it, so the next read fetches them again (verified),
        and unseal the blob. The background download, if it finished, resumes (`changed`)."""
        g = self._index
        if g is None and offset >= HEADER_SIZE:
            try:
                g = self.index()  # the index, from the cache when its bytes there are sound
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
            self._bitmap.clear(first, last)
            self._drop_complete_marker()
            self.repairs += 1
        self.cache.count_repair()
        self._bitmap.sync()
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
        v = Verifier(self.digest, self._size)
        while v.count < self._size:
            chunk = os.pread(self._data_fd, min(8 << 20, self._size - v.count), v.count)
            if not chunk:
                break
            v.update(chunk)
        bad = v.mismatch()
        if bad is not None:
            what, _expected, got = bad
            log.warning("%s: whole-blob %s mismatch (got %s); fetching it again", self.name, what, got)
            self.discard()
            return False
        marker = os.path.join(self.dir, "complete")
        # The marker spares a restarted daemon the network, nothing more: without room for its block
        # the blob is sealed all the same, and verified again after a restart.
        if not os.path.exists(marker) and self.cache.reserve(BLOCK):
            try:
                with atomic_write(marker, PRIVATE_FILE_MODE) as f:
                    f.write(self.digest.encode() + b"\n")
            finally:
                self.cache.settle(BLOCK, self)
        with self._lock:
            if generation != self._generation:  # a repair forgot units while we hashed: not sealed
                return False
            self._complete = self._sealed = True
        self.cache.measure(self)
        return True

    def discard(self) -> None:
        """Forget every unit (the bytes are refetched on demand)."""
        with self._lock:
            self._drop_complete_marker()
            self._bitmap.clear_all()
            self._bitmap.sync()
            os.ftruncate(self._data_fd, 0)
            os.ftruncate(self._data_fd, self._size)
        self.cache.measure(self)
        self.changed.set()

    def _drop_complete_marker(self) -> None:
        """Unseal and forget completeness (first, before any byte or bit changes)."""
        self._sealed = self._complete = False
        self._generation += 1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, "complete"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._data_fd)
        self._data_fd = -1
        self._bitmap.close()


def _runs(units: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted unit numbers -> (first, last) of each run of neighbours."""
    start = prev = units[0]
    for x in units[1:]:
        if x != prev + 1:
            yield start, prev
            start = x
        prev = x
    yield start, prev
