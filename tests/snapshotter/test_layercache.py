"""The converter's layer cache within its limit: least recently used entries go first, a blob goes
once no entry names it, and nothing is evicted while a conversion holds the cache.

Blobs are packed by code (the conversion itself is not the point; `test_convert` runs it under a
limit end to end)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
import time
from pathlib import Path

from blockformat.chunkfile import pack_file
from snapshotter.convert.layercache import CachedLayer, LayerCache


def _put(cache: LayerCache, key: str, seed: int, size: int = 256 << 10) -> CachedLayer:
    """A layer blob of `size` random bytes (incompressible) put under `key`."""
    blob = Path(cache.root) / f"new-{key}.blob"
    data = random.Random(seed).randbytes(size)
    with open(blob, "wb") as out:
        info = pack_file(io.BytesIO(data), out, "lz4", 65536)
    entry = cache.put(key, str(blob), info, size)
    time.sleep(0.01)  # distinct mtimes: the order of use
    return entry


def test_trim_evicts_least_recently_used_entries_until_within_the_limit(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "c"), limit_bytes=0)
    entries = [_put(cache, f"k{i}", seed=i) for i in range(4)]
    one = cache.usage() // 4
    assert cache.get("k0") is not None  # k0 used again: now the most recent
    cache.limit_bytes = int(2.5 * one)
    assert cache.trim() == ["k1", "k2"]
    assert cache.usage() <= cache.limit_bytes
    assert cache.get("k1") is None and cache.get("k2") is None
    assert cache.get("k0") is not None and cache.get("k3") is not None
    assert not os.path.exists(entries[1].path) and os.path.exists(entries[0].path)


def test_a_blob_named_by_two_entries_stays_until_both_are_evicted(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "c"), limit_bytes=0)
    shared = _put(cache, "a", seed=1)
    again = _put(cache, "b", seed=1)  # other options, the same bytes: one blob, two entries
    assert again.path == shared.path
    _put(cache, "c", seed=2)
    cache.limit_bytes = cache.usage() - 1
    assert cache.trim() == ["a"]
    assert os.path.exists(shared.path) and os.path.exists(Path(cache.layers) / "b.json")
    cache.limit_bytes = 1
    assert cache.trim() == ["b", "c"]
    assert not os.path.exists(shared.path)


def test_blobs_no_entry_names_go_first(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "c"), limit_bytes=0)
    _put(cache, "a", seed=1)
    orphan = Path(cache.blobs) / ("0" * 64)  # a crash between the rename and the entry
    orphan.write_bytes(os.urandom(64 << 10))
    cache.limit_bytes = cache.usage() - 1
    assert cache.trim() == []
    assert not orphan.exists() and cache.get("a") is not None


def test_nothing_is_evicted_while_another_conversion_holds_the_cache(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    cache = LayerCache(root, limit_bytes=0)
    for i in range(3):
        _put(cache, f"k{i}", seed=i)
    running = LayerCache(root, limit_bytes=0)
    ending = LayerCache(root, limit_bytes=1)
    with running.in_use():  # another conversion's whole run
        with ending.in_use():
            pass  # this one ends while the other runs: it may not evict what the other builds on
        assert all(ending.get(f"k{i}") is not None for i in range(3))
    with ending.in_use():  # alone now: trimmed when it ends
        pass
    assert all(ending.get(f"k{i}") is None for i in range(3))
    assert ending.usage() <= 2 * 4096  # the two empty directories


def test_no_limit_keeps_everything(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "c"), limit_bytes=0)
    for i in range(3):
        _put(cache, f"k{i}", seed=i)
    with cache.in_use():
        pass
    assert all(cache.get(f"k{i}") is not None for i in range(3))


def test_puts_of_the_same_layer_at_once_leave_one_whole_blob_and_one_entry(tmp_path: Path) -> None:
    # Two platforms converted side by side (`convert --jobs`) on the same bottom layers build the same
    # layer, byte for byte, and put it under the same key at about the same time, each from its own
    # work directory: either may win each rename, and any of them is the whole blob.
    cache = LayerCache(str(tmp_path / "c"), limit_bytes=0)
    data = random.Random(7).randbytes(1 << 20)
    n = 8
    blobs = []
    for i in range(n):
        blob = tmp_path / f"work-{i}.blob"
        with open(blob, "wb") as out:
            info = pack_file(io.BytesIO(data), out, "lz4", 65536)
        blobs.append((blob, info))
    start = threading.Barrier(n, timeout=10)
    entries: list[CachedLayer] = []

    def put(i: int) -> None:
        start.wait()
        entries.append(cache.put("shared", str(blobs[i][0]), blobs[i][1], len(data)))

    threads = [threading.Thread(target=put, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(entries) == n and len(set(entries)) == 1
    assert os.listdir(cache.blobs) == [entries[0].digest.partition(":")[2]]
    assert os.listdir(cache.layers) == ["shared.json"]  # no temp file left
    assert cache.get("shared") == entries[0]
    with open(entries[0].path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == entries[0].digest.partition(":")[2]
