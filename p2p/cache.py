"""The node blob cache: a sparse copy of each blob plus a persisted presence bitmap over fetch units.

Per blob, in ``<root>/blobs/sha256/<hex>/`` (normative spec: docs/format.md §6)::

    data       sparse file laid out exactly like the blob (byte x of the blob is byte x of the file)
    bitmap     32 B header + one bit per fetch unit (1 = present: verified and durable)  `p2p.bitmap`
    complete   exists once every unit is present and the whole file's SHA-256 equals the blob digest

Everything is root's alone: the cache root and every directory below it are mode 0700 (forced at every
start, whoever created them), the files 0600 — the cache holds the bytes of every image on the node.

This module is the cache as a whole: `BlobCache` opens each blob once however many devices use it
(reference counted), accounts for the space the cache takes, and evicts complete, unused blobs, least
recently used first, when it is over its limit. One blob — how its units are fetched, verified, stored,
sealed and repaired — is `p2p.cachedblob.CachedBlob`.
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

from .cachedblob import CachedBlob, Progress
from .errors import CacheError
from .settings import DEFAULT_UNIT_SIZE

__all__ = ["DEFAULT_UNIT_SIZE", "BlobCache", "CachedBlob", "Progress"]

log = logging.getLogger(__name__)


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
        #: Structures found damaged in the cache (and fetched again), every blob, since this process
        #: started: ``damselfly_corrupt_chunks_total{source="cache"}``.
        self.repairs = 0
        for d in (root, os.path.join(root, "blobs"), os.path.join(root, "blobs", "sha256")):
            private_dir(d)

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
            blob.refs += 1
            self._last_use[d] = time.monotonic()
        if self.limit_bytes:
            self.evict()
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
