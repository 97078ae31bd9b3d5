"""Layers, stacks and flatten: extent maps, validation, and the 255-layer limit."""

from __future__ import annotations

import io

import pytest

from blockformat.chunkfile import ChunkWriter
from blockformat.errors import CorruptBlobError, InvalidArgumentError
from blockformat.extents import ZERO, ExtentMap
from blockformat.layer import EXTENT, LAYER_HEADER, LAYER_MAGIC, LayerReader, LayerWriter
from blockformat.source import BytesSource
from blockformat.stack import MAX_LAYERS, Stack, flatten
from tests.conftest import Extents, layer_reader

VSIZE = 1 << 20


def make_layer(extents: Extents, vsize: int = VSIZE, chunk_size: int = 4096) -> LayerReader:
    return layer_reader(extents, vsize, chunk_size)


def test_layer_round_trip_keeps_data_and_zeroed_extents() -> None:
    a, b = b"A" * 8192, bytes(range(256)) * 16
    layer = make_layer([(0, a), (8192, b), (65536, 4096), (131072, b"C" * 512)])
    # (0, a) and (8192, b) touch, so they coalesce into one extent.
    assert [(e.offset, e.length, e.data_offset) for e in layer.extents] == [
        (0, 12288, 0),
        (65536, 4096, None),
        (131072, 512, 12288),
    ]
    stack = Stack([layer])
    assert stack.read(0, 12288) == a + b
    assert stack.read(131072, 1024) == b"C" * 512 + bytes(512)
    assert stack.read(VSIZE - 10, 100) == bytes(10)  # short at the end of the device


def test_upper_layer_zeroed_extent_hides_lower_data() -> None:
    lower = make_layer([(0, b"L" * 16384)])
    upper = make_layer([(4096, 4096), (12288, b"U" * 512)])
    dev = Stack([lower, upper])
    want = b"L" * 4096 + bytes(4096) + b"L" * 4096 + b"U" * 512 + b"L" * 3584
    assert dev.read(0, 16384) == want
    out = io.BytesIO()
    info = flatten(dev, out)
    flat = LayerReader(BytesSource(out.getvalue()), info.index_digest)
    assert Stack([flat]).read(0, 16384) == want
    # The flattened layer keeps the zeroed range, so it can also replace the stack above other layers.
    below = make_layer([(0, b"B" * 32768)])
    assert Stack([below, flat]).read(0, 16384) == want


@pytest.mark.parametrize(
    ("offset", "length"),
    [(1, 512), (512, 100), (VSIZE, 512), (VSIZE - 512, 1024), (-512, 512)],
)
def test_unaligned_or_out_of_range_extents_are_refused(offset: int, length: int) -> None:
    w = LayerWriter(io.BytesIO(), VSIZE)
    with pytest.raises(InvalidArgumentError):
        w.add_data(offset, b"x" * length)


def test_extents_must_come_in_increasing_order() -> None:
    w = LayerWriter(io.BytesIO(), VSIZE)
    w.add_data(8192, b"x" * 512)
    with pytest.raises(InvalidArgumentError, match="overlaps or precedes"):
        w.add_zero(4096, 512)


@pytest.mark.parametrize("vsize", [0, 1000, 4097])
def test_bad_virtual_size_is_refused(vsize: int) -> None:
    with pytest.raises(InvalidArgumentError):
        LayerWriter(io.BytesIO(), vsize)


def _container_with_metadata(meta: bytes, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    w = ChunkWriter(out, "lz4", 4096)
    w.write(data)
    w.close(meta)
    return out.getvalue()


def test_plain_chunk_container_is_not_a_layer() -> None:
    blob = _container_with_metadata(b"")
    with pytest.raises(CorruptBlobError, match="layer metadata"):
        LayerReader(BytesSource(blob, "plain.blob"))


@pytest.mark.parametrize(
    ("extents", "message"),
    [
        ([(0, 1000, 0)], "not sector-aligned"),
        ([(4096, 512, 0), (0, 512, 512)], "overlaps or precedes"),
        ([(VSIZE - 512, 1024, 0)], "beyond the virtual size"),
        ([(0, 8192, 0)], "beyond the layer data"),
    ],
)
def test_invalid_extent_tables_are_rejected_with_the_extent_named(
    extents: list[tuple[int, int, int]], message: str
) -> None:
    meta = LAYER_HEADER.pack(LAYER_MAGIC, 1, 0, VSIZE, len(extents))
    meta += b"".join(EXTENT.pack(*e) for e in extents)
    blob = _container_with_metadata(meta, b"d" * 4096)
    with pytest.raises(CorruptBlobError, match=message) as ei:
        LayerReader(BytesSource(blob, "bad.layer"))
    assert "bad.layer" in str(ei.value)
    assert "layer extent" in str(ei.value)


def test_stack_holds_up_to_255_layers() -> None:
    layers = [make_layer([(i * 4096, bytes([i % 256]) * 4096)]) for i in range(MAX_LAYERS)]
    dev = Stack(layers)
    assert dev.read(254 * 4096, 4096) == bytes([254]) * 4096
    assert len(dev.map) == MAX_LAYERS
    with pytest.raises(InvalidArgumentError, match="at most 255"):
        Stack([*layers, layers[0]])


def test_layers_of_different_sizes_do_not_stack() -> None:
    with pytest.raises(InvalidArgumentError, match="share one virtual size"):
        Stack([make_layer([], VSIZE), make_layer([], 2 * VSIZE)])


def test_extent_map_merges_contiguous_writes_and_splits_on_overwrite() -> None:
    m = ExtentMap()
    m.paint(0, 4096, 0, 0)
    m.paint(4096, 8192, 0, 4096)  # continues the same data: one segment
    assert [(s.start, s.end, s.data_offset) for s in m] == [(0, 8192, 0)]
    m.paint(1024, 2048, ZERO)
    assert [(s.start, s.end, s.source, s.data_offset) for s in m] == [
        (0, 1024, 0, 0),
        (1024, 2048, ZERO, 0),
        (2048, 8192, 0, 2048),
    ]
    assert [(s.start, s.end) for s in m.pieces(0, 10000)][-1] == (8192, 10000)
