"""A cache blob is sealed (readers may skip re-hashing its chunks) exactly while it is complete."""

from __future__ import annotations

import os
from pathlib import Path

from blockformat.chunkfile import ChunkReader
from p2p.cache import BlobCache

from .test_cache import UNIT, Upstream, make_blob


def test_a_blob_is_sealed_only_once_complete_and_whole_blob_verified(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob(size=2 << 20)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    reader = ChunkReader(cb, idx, cache_chunks=0, verified=cb.sealed)
    assert not cb.sealed()
    assert reader.read(100_000, 4096) == data[100_000:104_096]  # lazily, every chunk checked
    assert not cb.sealed()
    cb.ensure(0, len(blob))
    assert not cb.sealed()  # every unit present, but the whole blob is not checked yet
    assert cb.verify_complete()
    assert cb.sealed()
    assert reader.read(0, len(data)) == data
    cache.release(cb)
    # A restart finds the marker with every unit present: still sealed, and no network needed.
    down = Upstream(blob)
    down.fail = True
    again = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), down, idx)
    assert again.sealed()
    assert ChunkReader(again, idx, verified=again.sealed).read(0, len(data)) == data
    assert down.requests == []


def test_a_blob_that_fails_the_whole_blob_check_is_not_sealed(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=2 << 20)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    with open(os.path.join(cb.dir, "data"), "r+b") as f:
        f.seek(5 * UNIT)
        f.write(b"\x00damage")
    assert not cb.verify_complete()
    assert not cb.sealed()
