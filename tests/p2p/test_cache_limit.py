"""The node cache within its limit: what is on disk never exceeds it, reads stay correct when nothing
more can be kept, unused blobs go least recently used first, and a blob the limit keeps partial is
logged once and counted.

The upstream is the in-memory one of `test_cache`; the device daemon under a limit smaller than its
image, through FUSE, is `tests/snapshotter/test_device_cache_limit.py`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from blockformat.chunkfile import ChunkReader
from p2p.background import BackgroundDownload, State
from p2p.cache import BACKGROUND_SHARE, BlobCache
from p2p.errors import CacheFullError

from .test_cache import UNIT, Upstream, make_blob


def du(path: Path) -> int:
    """What ``du`` counts: allocated bytes of every file and directory below `path`, and its own."""
    total = os.lstat(path).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_reads_of_a_blob_larger_than_the_limit_are_correct_and_the_cache_stays_under_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, blob, digest, idx = make_blob(size=4 << 20)
    limit = 1 << 20  # a quarter of the blob
    cache = BlobCache(str(tmp_path), unit_size=UNIT, limit_bytes=limit)
    up = Upstream(blob)
    cb = cache.open(digest, len(blob), up, idx)
    reader = ChunkReader(cb, idx, cache_chunks=0)
    with caplog.at_level(logging.WARNING, logger="p2p.cache"):
        for _ in range(2):  # the second pass reads what could not be kept from upstream again
            for offset in range(0, len(data), 300_000):
                assert reader.read(offset, 300_000) == data[offset : offset + 300_000]
                assert du(tmp_path) <= limit
    assert reader.read(0, len(data)) == data
    assert du(tmp_path) <= limit
    assert cache.usage() == du(tmp_path)
    assert 0 < cb.present_count() < cb.units
    stats = cache.stats()
    assert stats["limit_partial_blobs"] == [digest]
    assert stats["limit_partial_total"] == 1
    assert isinstance(stats["uncached_bytes"], int) and stats["uncached_bytes"] > len(blob) - limit
    held = [r for r in caplog.records if "stays partial" in r.getMessage()]
    assert len(held) == 1, [r.getMessage() for r in held]  # once per blob, however many reads
    assert digest in held[0].getMessage() and "cache_limit" in held[0].getMessage()
    cache.release(cb)
    assert cache.limit_partial() == []


def test_ensure_raises_cache_full_without_fetching_once_the_cache_is_full(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=4 << 20)
    limit = len(blob) // 4
    cache = BlobCache(str(tmp_path), unit_size=UNIT, limit_bytes=limit)
    up = Upstream(blob)
    cb = cache.open(digest, len(blob), up, idx)
    with pytest.raises(CacheFullError, match="cache_limit"):
        cb.ensure(0, len(blob))  # more than the limit: refused before the network
    assert not up.requests
    with pytest.raises(CacheFullError, match="cache_limit"):
        for offset in range(0, len(blob), UNIT):  # unit by unit until the cache is full
            cb.ensure(offset, UNIT)
    assert 0 < cb.present_count() < cb.units
    assert du(tmp_path) <= limit
    before = len(up.requests)
    missing = cb.missing_units()[-1]
    with pytest.raises(CacheFullError):
        cb.ensure(missing * UNIT, UNIT)  # full: refused before the network
    assert len(up.requests) == before


def test_background_download_stops_at_its_share_of_the_limit_and_resumes_when_room_is_made(
    tmp_path: Path,
) -> None:
    _old, old_blob, old_digest, old_idx = make_blob(size=2 << 20, seed=2)
    data, blob, digest, idx = make_blob(size=2 << 20, seed=3)
    limit = len(old_blob) + len(blob) // 2  # room for one blob and a half
    cache = BlobCache(str(tmp_path), unit_size=UNIT, limit_bytes=limit)
    old = cache.open(old_digest, len(old_blob), Upstream(old_blob), old_idx)
    old.ensure(0, len(old_blob))
    assert old.verify_complete()
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    bg = BackgroundDownload(cb, delay=0).start()
    try:
        deadline = time.monotonic() + 30
        while bg.status().state is not State.CACHE_FULL:
            assert time.monotonic() < deadline, bg.status()
            time.sleep(0.05)
        assert du(tmp_path) <= limit * BACKGROUND_SHARE
        assert not cb.complete and cache.limit_partial() == [digest]
        cache.release(old)  # unused now: the download evicts it, least recently used, and completes
        assert bg.wait(30), bg.status()
        assert bg.status().state is State.COMPLETE
    finally:
        bg.stop()
    assert cache.stats()["evictions"] == 1
    assert not os.path.exists(os.path.join(cache.blob_dir(old_digest), "data"))
    assert du(tmp_path) <= limit
    assert cache.limit_partial() == []
    assert ChunkReader(cb, idx).read(0, len(data)) == data


def test_unused_partial_blobs_are_evicted_least_recently_used_first(tmp_path: Path) -> None:
    blobs = [make_blob(size=1 << 20, seed=10 + i) for i in range(3)]
    _data, blob, digest, idx = make_blob(size=2 << 20, seed=20)
    limit = len(blob) + len(blobs[0][1])  # the new blob and two half blobs, not three
    cache = BlobCache(str(tmp_path), unit_size=UNIT, limit_bytes=limit)
    for _data, blob, digest, idx in blobs:
        cb = cache.open(digest, len(blob), Upstream(blob), idx)
        cb.ensure(0, len(blob) // 2)  # partial
        cache.release(cb)
        time.sleep(0.01)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    gone = [d for _x, _b, d, _i in blobs if not os.path.exists(cache.blob_dir(d))]
    assert gone and gone == [d for _x, _b, d, _i in blobs][: len(gone)]  # the oldest first
    assert len(gone) < 3
    assert cb.complete or cb.present_count() == cb.units
    assert du(tmp_path) <= limit


def test_a_restarted_cache_accounts_for_what_is_on_disk(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=2 << 20)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    cache.release(cb)
    again = BlobCache(str(tmp_path), unit_size=UNIT, limit_bytes=len(blob) // 2)
    assert again.usage() == du(tmp_path)
    assert again.evict() == [digest]  # over the new limit and unused
    assert again.usage() == du(tmp_path) <= len(blob) // 2
