"""The converter's layer cache: converted layer blobs by (source chain, options).

A converted layer is determined by the chain of source layers under and including it (their
diff_ids, as containerd's chain IDs are) and by the options that shape the bytes; `LayerCache.key`
hashes both, so a second image on the same base converts only its new layers. Files, under a
directory only root may enter (they are images' files)::

    <root>/blobs/<hex>          a converted layer blob, named by its digest
    <root>/layers/<key>.json    `CachedLayer`: where the blob is, its digests and sizes

A blob is renamed into ``blobs/`` (fsynced first, the directory after) before its entry is written
(`blockformat.durable.write_file_atomic`), so an entry never names a missing or partial blob; an entry
whose blob has the wrong size is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from blockformat.chunkfile import BlobInfo
from blockformat.durable import fsync_dir, private_dir, write_file_atomic

#: An entry is a few hundred bytes; a larger file is not one (it fails to parse: a miss).
_MAX_ENTRY = 1 << 16


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

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.layers = os.path.join(root, "layers")
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
