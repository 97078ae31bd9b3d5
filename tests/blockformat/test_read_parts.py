"""Zero-copy reads (`read_parts`), the chunk window around a read, and sources that were verified once."""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockformat.chunkfile import KIND_RAW, ChunkReader, ChunkWriter
from blockformat.errors import CorruptBlobError
from blockformat.layer import LayerReader
from blockformat.source import BytesSource
from blockformat.stack import Stack
from tests.conftest import Extents, layer_blob

VSIZE = 1 << 20
CHUNK = 16384


def _pattern(seed: int, n: int) -> bytes:
    """Compressible but position-dependent bytes: every window of them differs."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(16) * 32 for _ in range(-(-n // 512)))[:n]


def _layer_blob(extents: Extents, chunk_size: int = CHUNK) -> tuple[bytes, str]:
    return layer_blob(extents, VSIZE, chunk_size)


def _stack(readers: Callable[[bytes, str, str], LayerReader] | None = None) -> Stack:
    """Two layers: data extents at unaligned data offsets, a zeroed range in the upper, holes."""
    lower = _layer_blob([(0, _pattern(1, 3 * 4096)), (20480, _pattern(2, 200 * 1024)), (409600, 8192)])
    upper = _layer_blob([(4096, 4096), (61440, _pattern(3, 50 * 1024)), (524288, _pattern(4, 70 * 1024))])
    make = readers or (lambda blob, digest, name: LayerReader(BytesSource(blob, name), digest))
    return Stack([make(*lower, "lower"), make(*upper, "upper")])


ranges = st.tuples(st.integers(0, VSIZE + 4096), st.integers(0, 300 * 1024))


@settings(max_examples=200, deadline=None)
@given(ranges)
def test_read_parts_join_to_exactly_what_read_returns(r: tuple[int, int]) -> None:
    stack = _stack()
    offset, length = r
    parts = stack.read_parts(offset, length)
    assert b"".join(parts) == stack.read(offset, length)
    assert all(len(p) > 0 for p in parts)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, VSIZE // 512 - 1), st.integers(1, 64))
def test_chunk_window_holds_the_range_and_needs_no_chunk_the_range_does_not(sector: int, n: int) -> None:
    offset = sector * 512
    end = min(VSIZE, offset + n * 512)
    stack = _stack()
    lo, hi = stack.chunk_window(offset, end)
    assert lo <= offset and end <= hi <= VSIZE

    def fetched(a: int, b: int) -> list[list[tuple[int, int]]]:
        # Fresh readers without a decoded-chunk cache: every chunk read is a source read.
        sources: list[BytesSource] = []

        def make(blob: bytes, digest: str, name: str) -> LayerReader:
            sources.append(BytesSource(blob, name))
            return LayerReader(sources[-1], digest, cache_chunks=0)

        s = _stack(make)
        for src in sources:
            src.reads.clear()  # the tail read at open
        assert s.read(a, b - a) == stack.read(a, b - a)
        return [sorted(set(src.reads)) for src in sources]

    assert fetched(lo, hi) == fetched(offset, end)


def test_chunk_window_stops_at_holes_zeroed_ranges_and_other_layers() -> None:
    stack = _stack()
    # In the lower layer's second extent, whose data starts 12 KiB into a chunk: the window is the
    # chunk, but no further left than the extent's start.
    assert stack.chunk_window(20480, 20480 + 4096) == (20480, 20480 + CHUNK - 12288)
    # Inside a hole and inside the upper's zeroed range: nothing to add.
    assert stack.chunk_window(1 << 19 | 1 << 18, (1 << 19 | 1 << 18) + 4096) == (786432, 790528)
    assert stack.chunk_window(4096, 8192) == (4096, 8192)
    # The lower's chunk runs on to 72 KiB, but the upper layer's extent at 60 KiB ends the window.
    assert stack.chunk_window(57344, 58368) == (57344, 61440)


def _raw_blob() -> tuple[bytes, bytes, str, int]:
    """Data, a blob of it in incompressible chunks (stored raw), and where chunk 1 is stored."""
    data = random.Random(5).randbytes(3 * 4096)
    out = io.BytesIO()
    w = ChunkWriter(out, "lz4", 4096)
    w.write(data)
    info = w.close()
    r = ChunkReader(BytesSource(out.getvalue()), info.index_digest)
    assert r._kinds[1] == KIND_RAW
    return data, out.getvalue(), info.index_digest, r.chunk_range(1)[0]


def test_a_source_that_is_not_verified_has_every_chunk_checked_on_every_read() -> None:
    _data, blob, digest, at = _raw_blob()
    bad = bytearray(blob)
    bad[at + 100] ^= 1
    for verified in (None, lambda: False):
        r = ChunkReader(BytesSource(bytes(bad)), digest, verified=verified)
        with pytest.raises(CorruptBlobError):
            r.read(4096, 10)
        with pytest.raises(CorruptBlobError):
            r.read_parts(0, 3 * 4096)


def test_a_verified_source_is_not_rehashed_but_verify_still_checks_every_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, blob, digest, at = _raw_blob()
    calls = 0
    real = hashlib.sha256

    def counting(b: bytes | memoryview = b"") -> Any:
        nonlocal calls
        calls += 1
        return real(b)

    r = ChunkReader(BytesSource(blob), digest, cache_chunks=0, verified=lambda: True)
    monkeypatch.setattr(hashlib, "sha256", counting)  # what blockformat.chunkfile calls
    assert r.read(0, 3 * 4096) == data
    assert b"".join(r.read_parts(100, 9000)) == data[100:9100]
    assert calls == 0
    # The reader trusts the source's word: a byte changed behind its back is not noticed by reads ...
    bad = bytearray(blob)
    bad[at + 100] ^= 1
    r = ChunkReader(BytesSource(bytes(bad)), digest, cache_chunks=0, verified=lambda: True)
    assert r.read(4096 + 100, 1) != data[4096 + 100 : 4096 + 101]
    # ... but `verify` (and `iter_chunks`) always check.
    with pytest.raises(CorruptBlobError):
        r.verify()
    assert calls > 0
