"""The node blob cache: a sparse copy of each blob plus a persisted presence bitmap over fetch units.

Per blob, in ``<root>/blobs/sha256/<hex>/`` (normative spec: docs/format.md §6)::

    data       sparse file laid out exactly like the blob (byte x of the blob is byte x of the file)
    bitmap     32 B header + one bit per fetch unit (1 = present: verified and durable)  `p2p.bitmap`
    complete   exists once every unit is present and the whole file's SHA-256 equals the blob digest

Everything is root's alone: the cache root and every directory below it are mode 0700 (forced at every
start, whoever created them), the files 0600 — the cache holds the bytes of every image on the node.

This module is the cache as a whole: `BlobCache` opens each blob once however many devices use it
(reference counted), accounts for the space the cache takes, and keeps it within its limit. One blob —
how its units are fetched, verified, stored, sealed and repaired — is `p2p.cachedblob.CachedBlob`.

**The limit** (`limit_bytes`, ``[device] cache_limit``; 0: none) bounds the bytes the cache root takes
on disk — the allocated blocks of every file and directory below it, what ``du`` counts. The cache
keeps a ledger of them (scanned at start, each blob measured again after every write to it) and every
write reserves its room first (`reserve`): whole units, rounded up to blocks, plus one block for the file
system's own (an extent block). When the room is not there, unused blobs — complete or not, no device
or peer request holding them — are evicted, least recently used first. When that is not enough, the
write is refused and the blob *stays partial*: a read of its missing units still gets them, fetched and
verified as always, but from memory (`CachedBlob.read`), and they are fetched again next time; its
background download waits until room is made (`p2p.background`). The first refusal for a blob is
logged once, and counted (`limit_partial`, `limit_partial_total`, `uncached_reads`, `uncached_bytes`).

The background download may fill the cache to `BACKGROUND_SHARE` of the limit only: the rest stays for
the units containers read on demand, which would otherwise be fetched again on every read once the
background copies of big images had filled the cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from blockformat.chunklayout import MAX_BLOB_SIZE
from blockformat.digest import Digest
from blockformat.durable import private_dir
from blockformat.source import RangeSource

from .cachedblob import BLOCK, CachedBlob, Progress, blocks
from .errors import CacheError
from .settings import DEFAULT_UNIT_SIZE

__all__ = [
    "BACKGROUND_SHARE",
    "BLOCK",
    "DEFAULT_UNIT_SIZE",
    "BlobCache",
    "CachedBlob",
    "Progress",
    "blocks",
]

log = logging.getLogger(__name__)

#: The share of the limit background downloads may fill (see the module docstring).
BACKGROUND_SHARE = 0.9


def _allocated(path: str) -> int:
    """Bytes allocated to `path` itself (0 if it is gone)."""
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _allocated_dir(path: str) -> int:
    """Bytes allocated to directory `path` and the files in it (a blob's directory has no subdirectory)."""
    total = _allocated(path)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(path):
            total += _allocated(os.path.join(path, name))
    return total


def _allocated_tree(path: str) -> int:
    total = _allocated(path)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            total += _allocated(os.path.join(dirpath, name))
    return total


class BlobCache:
    """All cached blobs of a node under one root, with size accounting and LRU eviction.

    `limit_bytes`: the most bytes the root may take on disk (0: no limit; the module docstring).
    `fail_cooldown`: seconds a read needing units whose fetch just failed fails at once (0: never;
    the device daemon sets it, see `p2p.flights`).

    `open` returns the blob (shared by every user of the same digest) and counts a reference; `release`
    drops it. Only blobs with no reference are ever evicted.
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
        #: Structures found damaged in the cache (and fetched again), every blob, since this process
        #: started: ``damselfly_corrupt_chunks_total{source="cache"}``.
        self.repairs = 0
        for d in (root, os.path.join(root, "blobs"), os.path.join(root, "blobs", "sha256")):
            private_dir(d)
        # The ledger: bytes on disk per blob directory, per other file accounted (`settle(path=)`),
        # and the rest of the tree as found at start; reservations of writes under way.
        self._sizes: dict[Digest, int] = {d: _allocated_dir(path) for d, path in self.entries()}
        self._files: dict[str, int] = {}
        self._other = _allocated_tree(root) - sum(self._sizes.values())
        self._total = self._other + sum(self._sizes.values())
        self._reserved = 0
        #: Counters (read by `damselfly devices` and the metrics): blobs evicted and their bytes; blobs
        #: the limit kept partial (once per blob while it is open); reads served without being kept.
        self.evictions = 0
        self.evicted_bytes = 0
        self.limit_partial_total = 0
        self.uncached_reads = 0
        self.uncached_bytes = 0
        #: Bumped whenever room may have been made (a blob unused, evicted or emptied, the limit
        #: raised): a background download the limit stopped tries again.
        self.changes = 0
        self._held: set[Digest] = set()

    def blob_dir(self, digest: Digest) -> str:
        algo, _, hexpart = digest.partition(":")
        return os.path.join(self.root, "blobs", algo, hexpart)

    def open(
        self,
        digest: Digest,
        size: int,
        upstream: RangeSource,
        index_digest: str | None = None,
    ) -> CachedBlob:
        """The blob `digest` (parsed: it names a directory), of `size` bytes, fetched from `upstream`
        where missing and checked against the chunk container index `index_digest`."""
        d = digest
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
                self._measure_locked(d)
            blob.refs += 1
            self._last_use[d] = time.monotonic()
        if self.limit_bytes:
            self.evict()  # a new blob's directory and bitmap take a few blocks
        return blob

    def count_repair(self) -> None:
        with self._lock:
            self.repairs += 1

    def release(self, blob: CachedBlob) -> None:
        with self._lock:
            blob.refs -= 1
            self._last_use[blob.digest] = time.monotonic()
            if blob.refs <= 0:
                blob.close()
                self._open.pop(blob.digest, None)
                self._held.discard(blob.digest)
                self.changes += 1
        if self.limit_bytes:
            self.evict()

    def entries(self) -> Iterator[tuple[Digest, str]]:
        base = os.path.join(self.root, "blobs")
        for algo in sorted(os.listdir(base)):
            for hexpart in sorted(os.listdir(os.path.join(base, algo))):
                yield Digest(f"{algo}:{hexpart}"), os.path.join(base, algo, hexpart)

    def usage(self) -> int:
        """Bytes the cache root takes on disk, by the ledger (what ``du`` of it says, give or take
        the writes under way)."""
        with self._lock:
            return self._total

    # -- room --------------------------------------------------------------------------------------

    def reserve(self, nbytes: int, share: float = 1.0) -> bool:
        """Reserve room for a write of `nbytes` (`blocks` of it, plus `BLOCK` for the file system),
        evicting unused blobs if need be; False if there is no room within `share` of the limit.
        `settle` ends the reservation."""
        with self._lock:
            if not self.limit_bytes:
                self._reserved += nbytes
                return True
            cap = int(self.limit_bytes * share)
            over = self._total + self._reserved + nbytes - cap
            if over > 0:
                self._evict_locked(over)
                over = self._total + self._reserved + nbytes - cap
            if over > 0:
                return False
            self._reserved += nbytes
            return True

    def has_room(self, nbytes: int, share: float = 1.0) -> bool:
        """Whether `reserve(nbytes, share)` would succeed now (evicting what it would)."""
        if not self.reserve(nbytes, share):
            return False
        self.settle(nbytes)
        return True

    def settle(self, nbytes: int, blob: CachedBlob | None = None, path: str | None = None) -> None:
        """End a reservation of `nbytes`, measuring what the write took: `blob`'s directory, or the file
        `path` (another file under the root, such as an image config of the document store)."""
        with self._lock:
            self._reserved -= nbytes
            if blob is not None:
                self._measure_locked(blob.digest)
            if path is not None:
                size = _allocated(path)
                self._total += size - self._files.get(path, 0)
                self._files[path] = size

    def measure(self, blob: CachedBlob) -> None:
        """Account again for what `blob` takes on disk (after it changed other than by a reserved
        write: emptied, sealed)."""
        with self._lock:
            self._measure_locked(blob.digest)
            self.changes += 1
            if blob.complete:
                self._held.discard(blob.digest)

    def _measure_locked(self, d: Digest) -> None:
        size = _allocated_dir(self.blob_dir(d))
        self._total += size - self._sizes.get(d, 0)
        self._sizes[d] = size

    def note_full(self, blob: CachedBlob, nbytes: int) -> None:
        """A write of `nbytes` to `blob` found no room: the blob stays partial. Logged and counted once
        per blob while it is open."""
        with self._lock:
            if blob.digest in self._held:
                return
            self._held.add(blob.digest)
            self.limit_partial_total += 1
            usage, reserved = self._total, self._reserved
        p = blob.progress()
        log.warning(
            "cache limit: %s stays partial (%d of %d units, %d of %d bytes): the cache at %s takes %d of "
            "its %d bytes (%d more being written) and no unused blob is left to evict for %d more; its "
            "missing ranges are fetched and verified at every read that needs them, not kept. Raise "
            "[device] cache_limit or detach images to let it complete",
            blob.digest,
            p.present_units,
            p.total_units,
            p.present_bytes,
            p.size,
            self.root,
            usage,
            self.limit_bytes,
            reserved,
            nbytes,
        )

    def note_uncached(self, nbytes: int) -> None:
        """A read was served with `nbytes` of units the cache had no room to keep."""
        with self._lock:
            self.uncached_reads += 1
            self.uncached_bytes += nbytes

    def limit_partial(self) -> list[Digest]:
        """Open blobs the limit keeps partial now (a gauge: `len` of it)."""
        with self._lock:
            return sorted(self._held)

    def is_held(self, blob: CachedBlob) -> bool:
        return blob.digest in self._held

    def stats(self) -> dict[str, object]:
        """The cache as a whole, for `damselfly devices` (and the metrics: `p2p.nodemetrics`)."""
        with self._lock:
            return {
                "dir": self.root,
                "limit_bytes": self.limit_bytes,
                "usage_bytes": self._total,
                "blobs": len(self._sizes),
                "evictions": self.evictions,
                "evicted_bytes": self.evicted_bytes,
                "limit_partial_blobs": sorted(self._held),
                "limit_partial_total": self.limit_partial_total,
                "uncached_reads": self.uncached_reads,
                "uncached_bytes": self.uncached_bytes,
            }

    # -- eviction ----------------------------------------------------------------------------------

    def evict(self, on_evict: Callable[[Digest], None] | None = None) -> list[Digest]:
        """Remove unused blobs, least recently used first, until usage is within the limit."""
        if not self.limit_bytes:
            return []
        with self._lock:
            evicted = self._evict_locked(self._total + self._reserved - self.limit_bytes)
        if on_evict is not None:
            for d in evicted:
                on_evict(d)
        return evicted

    def _evict_locked(self, need: int) -> list[Digest]:
        """Evict unused blobs, least recently used first, until `need` bytes are freed (or none is
        left). Under the lock: nobody opens a blob while its files go."""
        evicted: list[Digest] = []
        if need <= 0:
            return evicted
        candidates: list[tuple[float, Digest]] = []
        for d in self._sizes:
            if d in self._open:
                continue
            last = self._last_use.get(d)
            if last is None:  # not used by this process: the newest of its files' mtimes
                last = self._mtime(d) - time.time() + time.monotonic()
            candidates.append((last, d))
        for _last, d in sorted(candidates):
            if need <= 0:
                break
            path = self.blob_dir(d)
            for name in ("complete", "bitmap", "data"):  # the marker first: never complete and torn
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(path, name))
            with contextlib.suppress(OSError):
                os.rmdir(path)
            before = self._sizes.pop(d)
            self._total -= before
            left = _allocated_dir(path)  # a stray file nobody knows: it stays, and counts
            if left:
                self._sizes[d] = left
                self._total += left
            freed = before - left
            need -= freed
            self._last_use.pop(d, None)
            self.evictions += 1
            self.evicted_bytes += freed
            self.changes += 1
            evicted.append(d)
            log.info("evicted %s (%d bytes) from the blob cache", d, freed)
        return evicted

    def _mtime(self, d: Digest) -> float:
        path = self.blob_dir(d)
        newest = 0.0
        for name in ("complete", "bitmap", "data"):
            with contextlib.suppress(FileNotFoundError):
                newest = max(newest, os.stat(os.path.join(path, name)).st_mtime)
        return newest
