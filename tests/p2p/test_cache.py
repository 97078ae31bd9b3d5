"""The node blob cache: verified units only, restart survival, coalescing, completion, eviction.

The upstream here is an in-memory range source (the registry is not the point of these tests; the
registry-backed tests live beside them)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
from pathlib import Path

import pytest

from blockformat.chunkfile import ChunkReader, pack_file
from blockformat.errors import BlockFormatError, SourceError
from p2p import deadline
from p2p.background import BackgroundDownload, State
from p2p.cache import BlobCache, CachedBlob
from p2p.errors import CoolingDownError, DeadlineExceededError

UNIT = 64 * 1024


class Upstream:
    """An in-memory blob that counts requests and can lie, fail or stall."""

    def __init__(self, blob: bytes, delay: float = 0.0) -> None:
        self.blob = bytearray(blob)
        self.delay = delay
        self.requests: list[tuple[int, int]] = []
        self.fail = False
        self.lock = threading.Lock()

    @property
    def name(self) -> str:
        return "upstream"

    def size(self) -> int:
        return len(self.blob)

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            self.requests.append((offset, length))
        if self.fail:
            raise SourceError("upstream", offset, length, "network is down")
        if self.delay:
            time.sleep(self.delay)
        return bytes(self.blob[offset : offset + length])


def make_blob(size: int = 8 << 20, chunk_size: int = 16384, seed: int = 1) -> tuple[bytes, bytes, str, str]:
    """(data, blob, blob digest, index digest): half random, half compressible, some zeros."""
    rnd = random.Random(seed).randbytes(size // 2)
    data = bytearray(size)
    data[: size // 2] = rnd[: size // 2]
    data[size // 2 : size - size // 8] = b"compressible text " * ((size // 2 - size // 8) // 18) + bytes(
        (size // 2 - size // 8) % 18
    )
    out = io.BytesIO()
    info = pack_file(io.BytesIO(bytes(data)), out, "lz4", chunk_size)
    blob = out.getvalue()
    return bytes(data), blob, "sha256:" + hashlib.sha256(blob).hexdigest(), info.index_digest


def open_reader(cache: BlobCache, up: Upstream, digest: str, index_digest: str) -> ChunkReader:
    blob = cache.open(digest, len(up.blob), up, index_digest)
    return ChunkReader(blob, index_digest, cache_chunks=0)


def test_lazy_read_fetches_only_the_units_it_needs(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob()
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    r = open_reader(cache, up, digest, idx)
    opened = sum(n for _, n in up.requests)
    assert r.read(1_000_000, 4096) == data[1_000_000:1_004_096]
    fetched = sum(n for _, n in up.requests) - opened
    # One 4 KiB read needs at most the units around one chunk (plus chunk-edge widening).
    assert 0 < fetched <= 2 * UNIT + 2 * 16384
    before = len(up.requests)
    assert r.read(1_000_000, 4096) == data[1_000_000:1_004_096]
    assert len(up.requests) == before, "a present unit touched the network"


def test_wrong_bytes_from_upstream_are_never_marked_present(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob()
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    r = open_reader(cache, up, digest, idx)
    cb = cache.open(digest, len(blob), up, idx)
    target = 20 * UNIT + 100
    up.blob[target] ^= 0xFF
    # Any read whose units include the damaged byte fails, and the unit stays missing.
    with pytest.raises(BlockFormatError, match="wrong bytes"):
        cb.read(target, 1)
    assert not cb.is_present(target // UNIT)
    up.blob[target] ^= 0xFF  # the upstream heals
    assert r.read(0, len(data)) == data
    assert cb.is_present(target // UNIT)


def test_a_restarted_cache_serves_present_units_without_network(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob()
    up = Upstream(blob)
    r = open_reader(BlobCache(str(tmp_path), unit_size=UNIT), up, digest, idx)
    assert r.read(0, 500_000) == data[:500_000]
    # A new process: same root, an upstream that is down.
    down = Upstream(blob)
    down.fail = True
    cache2 = BlobCache(str(tmp_path), unit_size=UNIT)
    r2 = open_reader(cache2, down, digest, idx)
    assert r2.read(0, 500_000) == data[:500_000]
    assert down.requests == []
    with pytest.raises(BlockFormatError, match="network is down"):
        r2.read(2_500_000, 4096)
    # Back online, only the missing units are fetched.
    down.fail = False
    assert r2.read(2_500_000, 4096) == data[2_500_000:2_504_096]
    assert down.requests and all(off >= 400_000 for off, _ in down.requests)


def test_concurrent_reads_of_a_missing_unit_make_one_request(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob()
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), up, idx)
    cb.index()
    up.requests.clear()
    up.delay = 0.2
    results: list[bytes] = []

    def reader() -> None:
        results.append(cb.read(10 * UNIT + 10, 100))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8 and len(set(results)) == 1
    assert results[0] == blob[10 * UNIT + 10 : 10 * UNIT + 110]
    assert len(up.requests) == 1


def _all_present(tmp_path: Path) -> tuple[bytes, bytes, str, str, BlobCache, CachedBlob]:
    """(data, blob, digest, index digest, cache, cached blob) with every unit of the blob fetched."""
    data, blob, digest, idx = make_blob()
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, len(blob))
    return data, blob, digest, idx, cache, cb


def test_complete_blob_is_digest_checked_then_needs_no_network(tmp_path: Path) -> None:
    data, blob, digest, idx, cache, cb = _all_present(tmp_path)
    assert cb.progress().present_units == cb.units
    assert cb.verify_complete()
    assert os.path.exists(os.path.join(cb.dir, "complete"))
    cache.release(cb)
    down = Upstream(blob)
    down.fail = True
    r = open_reader(BlobCache(str(tmp_path), unit_size=UNIT), down, digest, idx)
    assert r.read(0, len(data)) == data
    assert down.requests == []


def test_whole_blob_digest_mismatch_discards_and_refetches(tmp_path: Path) -> None:
    _data, blob, _digest, _idx, _cache, cb = _all_present(tmp_path)
    # Damage the cached copy on disk behind the cache's back.
    with open(os.path.join(cb.dir, "data"), "r+b") as f:
        f.seek(40 * UNIT)
        f.write(b"\x00garbage")
    assert not cb.verify_complete()
    assert cb.progress().present_units == 0
    cb.ensure(0, len(blob))
    assert cb.verify_complete()


def test_eviction_removes_only_complete_unused_blobs_lru(tmp_path: Path) -> None:
    blobs = [make_blob(size=1 << 20, seed=i) for i in range(3)]
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    opened = []
    for _data, blob, digest, idx in blobs:
        cb = cache.open(digest, len(blob), Upstream(blob), idx)
        cb.ensure(0, len(blob))
        assert cb.verify_complete()
        opened.append(cb)
    cache.release(opened[0])
    cache.release(opened[1])  # blob 2 stays in use
    one = cache.usage() // 3
    cache.limit_bytes = int(one * 1.5)
    evicted = cache.evict()
    assert evicted == [blobs[0][2], blobs[1][2]]
    assert os.path.exists(os.path.join(opened[2].dir, "data"))
    assert cache.usage() <= 2 * one


def test_units_cut_by_a_torn_bitmap_or_size_change_start_afresh(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob()
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.ensure(0, 4 * UNIT)
    cache.release(cb)
    with open(os.path.join(cb.dir, "bitmap"), "r+b") as f:
        f.seek(17)
        f.write(b"\xff")  # damages the header (blob size)
    cb2 = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), Upstream(blob), idx)
    assert cb2.progress().present_units == 0


def test_background_download_completes_at_a_bounded_rate_then_serves_offline(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob(size=2 << 20)
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), up, idx)
    rate = 4 << 20  # bytes per second
    t0 = time.monotonic()
    bg = BackgroundDownload(cb, delay=0.1, rate_bytes_per_second=rate, concurrency=2, batch_units=1).start()
    assert bg.wait(30)
    elapsed = time.monotonic() - t0
    assert bg.status().state is State.COMPLETE
    assert elapsed >= 0.1 + (len(blob) - 2 * UNIT) / rate * 0.8, "the rate limit was not applied"
    bg.stop()
    up.fail = True
    r = ChunkReader(cb, idx)
    assert r.read(0, len(data)) == data


def test_background_download_retries_through_an_outage(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=1 << 20)
    up = Upstream(blob)
    cb = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), up, idx)
    cb.index()
    up.fail = True
    bg = BackgroundDownload(cb, delay=0, max_backoff=0.2).start()
    time.sleep(0.5)
    st = bg.status()
    assert st.state is State.DOWNLOADING and st.failures > 0 and "network is down" in (st.error or "")
    up.fail = False
    assert bg.wait(30)
    assert bg.status().state is State.COMPLETE
    bg.stop()


def test_stopping_a_background_download_joins_its_threads(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob(size=1 << 20)
    cb = BlobCache(str(tmp_path), unit_size=UNIT).open(digest, len(blob), Upstream(blob), idx)
    before = threading.active_count()
    bg = BackgroundDownload(cb, delay=60).start()
    bg.stop(timeout=5)
    assert bg.status().state is State.STOPPED
    assert threading.active_count() == before


# -- bounded reads: cool-down after a failure, deadlines -------------------------------------------


def test_a_unit_whose_fetch_failed_fails_again_at_once_until_its_cooldown_ends(tmp_path: Path) -> None:
    data, blob, digest, idx = make_blob()
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT, fail_cooldown=0.5)
    r = open_reader(cache, up, digest, idx)
    assert r.read(0, 4096) == data[:4096]
    up.fail = True
    with pytest.raises(SourceError):
        r.read(3_000_000, 4096)
    up.fail = False  # the upstream is back, but the unit cools down: no request, an error at once
    asked = len(up.requests)
    t0 = time.monotonic()
    with pytest.raises(SourceError) as caught:
        r.read(3_000_000, 4096)
    assert time.monotonic() - t0 < 0.1
    assert isinstance(caught.value.__cause__, CoolingDownError)
    assert len(up.requests) == asked
    assert r.read(0, 4096) == data[:4096]  # present units read as ever
    time.sleep(0.6)
    assert r.read(3_000_000, 4096) == data[3_000_000:3_004_096]


def test_a_reader_waiting_for_another_readers_fetch_gives_up_at_its_own_deadline(tmp_path: Path) -> None:
    _data, blob, digest, idx = make_blob()
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cb = cache.open(digest, len(blob), Upstream(blob), idx)
    cb.index()
    cb.upstream = slow = Upstream(blob, delay=2.0)  # the next fetch takes 2 s
    first = threading.Thread(target=cb.ensure, args=(1_000_000, 4096))
    first.start()
    try:
        while not slow.requests:
            time.sleep(0.01)
        t0 = time.monotonic()
        with deadline.scope(t0 + 0.3), pytest.raises(SourceError) as caught:
            cb.ensure(1_000_000, 4096)  # the same unit: it waits for the first reader's fetch...
        waited = time.monotonic() - t0
        assert 0.25 < waited < 1.0, waited  # ... but only until its own deadline
        assert isinstance(caught.value.__cause__, DeadlineExceededError)
    finally:
        first.join()
    assert cb.units_present(1_000_000, 4096)  # the first reader's fetch completed all the same
