"""A cached blob's index is parsed once and shared: the layer reader the device daemon opens over the
cache reuses it, so opening a registry layer reads and verifies the blob's tail once."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from blockformat.chunkindex import ChunkIndex
from blockformat.digest import digest_of
from blockformat.layer import LayerReader, LayerWriter
from blockformat.source import RangeSource
from p2p.cache import BlobCache
from snapshotter.device.manager import DeviceManager

from .test_cache import UNIT, Upstream

VSIZE = 4 << 20


def make_layer() -> tuple[bytes, bytes, str]:
    """(data, layer blob, index digest): 1 MiB of half-compressible data at device offset 0."""
    rng = random.Random(7)
    data = b"".join(rng.randbytes(2048) + b"layer " * 341 + b"xy" for _ in range(256))
    out = io.BytesIO()
    w = LayerWriter(out, VSIZE, chunk_size=16384)
    w.add_data(0, data)
    info = w.close()
    return data, out.getvalue(), info.index_digest


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the source of every `ChunkIndex.load` from now on."""
    seen: list[str] = []
    real = ChunkIndex.load

    def counting(source: RangeSource, expected_index_digest: str | None = None) -> ChunkIndex:
        seen.append(source.name)
        return real(source, expected_index_digest)

    monkeypatch.setattr(ChunkIndex, "load", staticmethod(counting))
    return seen


def tail_requests(up: Upstream) -> list[tuple[int, int]]:
    return [(off, n) for off, n in up.requests if off + n == len(up.blob)]


def test_opening_a_registry_layer_parses_its_tail_once(tmp_path: Path, loads: list[str]) -> None:
    data, blob, idx = make_layer()
    up = Upstream(blob)
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cached = cache.open(digest_of(blob), len(blob), up, idx)
    layer = DeviceManager._open_layer(cached, cached, idx)
    assert loads == [cached.name]
    assert len(tail_requests(up)) == 1
    assert layer.chunks.index is cached.index()
    # Another reader of the same blob (another device with this layer) parses nothing either.
    again = LayerReader(cached, idx, index=cached.index(), verified=cached.sealed)
    assert loads == [cached.name] and len(tail_requests(up)) == 1
    assert layer.read_data(100_000, 5000) == again.read_data(100_000, 5000) == data[100_000:105_000]


def test_a_reopened_cache_parses_the_tail_from_its_own_units(tmp_path: Path, loads: list[str]) -> None:
    _data, blob, idx = make_layer()
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cached = cache.open(digest_of(blob), len(blob), Upstream(blob), idx)
    DeviceManager._open_layer(cached, cached, idx)
    cache.release(cached)
    down = Upstream(blob)
    down.fail = True  # a restart with the registry gone: the tail units are in the cache
    reopened = BlobCache(str(tmp_path), unit_size=UNIT).open(digest_of(blob), len(blob), down, idx)
    DeviceManager._open_layer(reopened, reopened, idx)
    assert len(loads) == 2 and down.requests == []


def test_a_tail_damaged_on_disk_is_fetched_again_when_the_layer_opens(
    tmp_path: Path, loads: list[str]
) -> None:
    data, blob, idx = make_layer()
    cache = BlobCache(str(tmp_path), unit_size=UNIT)
    cached = cache.open(digest_of(blob), len(blob), Upstream(blob), idx)
    DeviceManager._open_layer(cached, cached, idx)
    cache.release(cached)
    with open(os.path.join(cached.dir, "data"), "r+b") as f:  # the index, damaged while no one watched
        f.seek(len(blob) - 200)
        f.write(b"\xff\x00damage")
    up = Upstream(blob)
    reopened = BlobCache(str(tmp_path), unit_size=UNIT).open(digest_of(blob), len(blob), up, idx)
    layer = DeviceManager._open_layer(reopened, reopened, idx)
    assert reopened.repairs == 1
    assert len(tail_requests(up)) == 1  # the tail, fetched again once and verified
    assert layer.chunks.index is reopened.index()
    assert layer.read_data(0, 4096) == data[:4096]
