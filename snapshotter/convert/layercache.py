"""The converter's layer cache: converted layer blobs by (source chain, options).

A converted layer is determined by the chain of source layers under and including it (their
diff_ids, as containerd's chain IDs are) and by the options that shape the bytes; `LayerCache.key`
hashes both, so a second image on the same base converts only its new layers. Files, under a
directory only root may enter (they are images' files)::

    <root>/blobs/<hex>          a converted layer blob, named by its digest
    <root>/layers/<key>.json    `CachedLayer`: where the blob is, its digests and sizes

    <root>/lock                 flock: shared by every conversion while it runs, exclusive to evict

A blob is renamed into ``blobs/`` (fsynced first, the directory after) before its entry is written
(`blockformat.durable.write_file_atomic`), so an entry never names a missing or partial blob; an entry
whose blob has the wrong size is a miss.

**Bounded** (`limit_bytes`, ``--cache-limit``, default `DEFAULT_LIMIT`; 0: none): the bytes ``blobs/``
and ``layers/`` take on disk. A use of an entry (a hit, or the entry written) touches its file, so its
mtime is its last use; `trim` removes entries least recently used first, and a blob once no entry names
it, until the cache is within its limit. Only *unused* entries go: a conversion holds the lock shared
for its whole run (`in_use`) — the later layers of an image are built over the earlier ones' blobs —
and `trim` runs only under the lock held exclusively, taken without waiting when a conversion ends
(not when it starts: the layers it is about to reuse would be the first to go). So the cache may exceed
its limit while conversions run, by what they add, and is brought back within it by the last one to
end. Blobs no entry names (a crash between the rename and the entry)
go first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from blockformat.chunkfile import BlobInfo
from blockformat.durable import fsync_dir, private_dir, write_file_atomic

log = logging.getLogger(__name__)

#: An entry is a few hundred bytes; a larger file is not one (it fails to parse: a miss).
_MAX_ENTRY = 1 << 16
#: The cache's default limit: 10 GiB, a few images' converted layers (the demo's 1.1 GB image converts
#: into 565 MB of blobs) on a CI runner's disk; the same default as a node's blob cache.
DEFAULT_LIMIT = 10 << 30


def _allocated(path: str) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


@dataclass(frozen=True)
class CachedLayer:
    path: str
    digest: str
    size: int
    index_digest: str
    uncompressed_size: int  # bytes of the source layer's tar
    data_size: int  # bytes of layer data in the blob (the annotation's size)


class LayerCache:
    """Converted layer blobs by (source chain, options). Files: ``blobs/<hex>``, ``layers/<key>.json``."""

    def __init__(self, root: str, limit_bytes: int = DEFAULT_LIMIT) -> None:
        self.root = root
        self.limit_bytes = limit_bytes
        self.blobs = os.path.join(root, "blobs")
        self.layers = os.path.join(root, "layers")
        self.lock_path = os.path.join(root, "lock")
        # Root's alone: converted layers are images' files, and the work directories under it hold
        # the layer being built, mounted.
        for d in (root, self.blobs, self.layers):
            private_dir(d)

    @staticmethod
    def key(chain: list[str], options: Mapping[str, Any]) -> str:
        """The cache key of the layer on top of `chain` (diff_ids, bottom first) made with `options`."""
        doc = json.dumps({"chain": chain, **options}, sort_keys=True).encode()
        return hashlib.sha256(doc).hexdigest()

    def get(self, key: str) -> CachedLayer | None:
        try:
            with open(os.path.join(self.layers, key + ".json"), "rb") as f:
                entry = CachedLayer(**json.loads(f.read(_MAX_ENTRY)))
        except (OSError, ValueError, TypeError):
            return None
        try:
            if os.path.getsize(entry.path) != entry.size:
                return None
        except OSError:
            return None
        with contextlib.suppress(OSError):
            os.utime(os.path.join(self.layers, key + ".json"))  # used now: last to be evicted
        return entry

    def put(self, key: str, blob: str, info: BlobInfo, tar_size: int) -> CachedLayer:
        assert info.blob_digest is not None
        path = os.path.join(self.blobs, info.blob_digest.partition(":")[2])
        if not (os.path.exists(path) and os.path.getsize(path) == info.blob_size):
            with open(blob, "rb") as f:  # the device daemon wrote it; make it durable before the rename
                os.fsync(f.fileno())
            os.replace(blob, path)
            fsync_dir(self.blobs)
        entry = CachedLayer(
            path, info.blob_digest, info.blob_size, info.index_digest, tar_size, info.uncompressed_size
        )
        write_file_atomic(os.path.join(self.layers, key + ".json"), json.dumps(asdict(entry)).encode(), 0o600)
        return entry

    # -- the limit ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the cache for a conversion: nothing is evicted while it runs. Trims the cache when it
        ends, if no other conversion runs then."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for another process's trim
            yield
            if self._try_exclusive(fd):
                self.trim()
        finally:
            os.close(fd)

    @staticmethod
    def _try_exclusive(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def usage(self) -> int:
        """Bytes ``blobs/`` and ``layers/`` take on disk (the directories and their files)."""
        total = 0
        for d in (self.blobs, self.layers):
            total += _allocated(d)
            with contextlib.suppress(FileNotFoundError):
                total += sum(_allocated(os.path.join(d, name)) for name in os.listdir(d))
        return total

    def trim(self) -> list[str]:
        """Evict unused entries, least recently used first (and blobs no entry names), until the
        cache is within `limit_bytes`; the keys evicted. The caller holds the lock exclusively."""
        if not self.limit_bytes:
            return []
        usage = self.usage()
        if usage <= self.limit_bytes:
            return []
        entries: list[tuple[float, str, str | None]] = []  # (last use, key, the blob it names)
        for name in os.listdir(self.layers):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.layers, name)
            try:
                with open(path, "rb") as f:
                    blob: str | None = CachedLayer(**json.loads(f.read(_MAX_ENTRY))).path
                used = os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError):
                blob, used = None, 0.0  # unreadable: a miss anyway, evicted first
            entries.append((used, name.removesuffix(".json"), blob))
        named: dict[str, int] = {}
        for _u, _k, blob in entries:
            if blob is not None:
                named[blob] = named.get(blob, 0) + 1
        for name in os.listdir(self.blobs):
            path = os.path.join(self.blobs, name)
            if path not in named:  # no entry names it: nothing can use it
                usage -= self._remove(path)
        evicted: list[str] = []
        for _used, key, blob in sorted(entries, key=lambda e: e[0]):
            if usage <= self.limit_bytes:
                break
            usage -= self._remove(os.path.join(self.layers, key + ".json"))
            if blob is not None:
                named[blob] -= 1
                if named[blob] == 0:
                    usage -= self._remove(blob)
            evicted.append(key)
            log.info("evicted converted layer %s from the convert cache %s", key, self.root)
        return evicted

    def _remove(self, path: str) -> int:
        """Remove `path` (a file of this cache's); the bytes it took."""
        if os.path.dirname(path) not in (self.blobs, self.layers):
            return 0  # an entry naming a file elsewhere (another cache directory's): not ours to remove
        size = _allocated(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size
