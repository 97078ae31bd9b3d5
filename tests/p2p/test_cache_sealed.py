"""A cache blob is sealed (readers may skip re-hashing its chunks) only once complete and verified whole
in this process; damage on disk found after a restart is repaired from the upstream, never served."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from blockformat.chunkfile import ChunkReader
from blockformat.errors import CorruptBlobError
from blockformat.source import BytesSource
from p2p.background import BackgroundDownload
from p2p.cache import BlobCache, CachedBlob

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
    # A restart finds the marker with every unit present: complete (no network needed), but not sealed
    # until this process has checked the whole file again: it may have been damaged meanwhile.
    down = Upstream(blob)
    down.fail = True
    again = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), down, idx)
    assert again.complete and not again.sealed()
    assert ChunkReader(again, idx, verified=again.sealed).read(0, len(data)) == data  # chunks checked
    assert again.verify_complete() and again.sealed()
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


def _flip(cb: CachedBlob, offset: int) -> None:
    with open(os.path.join(cb.dir, "data"), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_a_byte_flipped_on_disk_while_down_is_caught_after_a_restart_and_fetched_again(
    tmp_path: Path,
) -> None:
    data, blob, digest, idx = make_blob(size=2 << 20)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    assert cb.verify_complete() and cb.sealed()
    cache.release(cb)
    r = ChunkReader(BytesSource(blob), idx)
    at = r.chunk_range(r.chunk_at(300_000))[0] + 7  # inside a stored chunk
    # The daemon is down; the disk flips a bit of the sealed blob.
    again = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), up := Upstream(blob), idx)
    _flip(again, at)
    assert again.complete and not again.sealed()
    reader = ChunkReader(again, idx, cache_chunks=0, verified=again.sealed)
    with pytest.raises(CorruptBlobError) as caught:
        reader.read(0, len(data))  # never wrong bytes: the chunk check catches it
    assert caught.value.offset == r.chunk_range(r.chunk_at(at))[0]
    again.repair(caught.value.offset)
    assert not again.complete and not again.is_present(at // UNIT)
    assert reader.read(0, len(data)) == data  # the damaged units came from the upstream again
    assert up.requests and all(o <= at < o + n for o, n in up.requests)
    assert again.changed.is_set()  # a finished background download resumes
    assert again.verify_complete() and again.sealed()


def test_the_background_reverification_of_a_damaged_complete_blob_refetches_it(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=2 << 20)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    assert cb.verify_complete()
    cache.release(cb)
    again = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), Upstream(blob), idx)
    _flip(again, 1_000_003)
    bg = BackgroundDownload(again, delay=0).start()
    try:
        assert bg.wait(30)
    finally:
        bg.stop()
    assert again.sealed()
    with open(os.path.join(again.dir, "data"), "rb") as f:
        assert f.read() == blob


def test_cache_directories_and_files_are_roots_alone(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)  # made by someone else, world-readable
    _data, blob, digest, idx = make_blob(size=1 << 20)
    cb = BlobCache(str(root), unit_size=UNIT).open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    assert cb.verify_complete()
    for dirpath, _dirnames, filenames in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for name in filenames:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, name)).st_mode) == 0o600, name
