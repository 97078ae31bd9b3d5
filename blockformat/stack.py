"""A stack of layers (bottom to top) read as one virtual block device; `flatten` merges it into a layer.

The layers' extent maps are merged once, when the stack is built, into one sorted map whose segments
record which layer serves each range (docs/format.md, "Stack"). A read is a binary search into that
map plus chunk reads from the layers it names; ranges no layer covers, and zeroed extents, read as
zeros. A real image's merged map is small (DADI reports <= 4.5K segments), so it lives in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO, Protocol

from .chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo
from .errors import InvalidArgumentError
from .extents import HOLE, ZERO, ExtentMap
from .layer import Extent, LayerWriter

MAX_LAYERS = 255
_PIECE = 4 * 1024 * 1024


class Layer(Protocol):
    """What a stack needs of a layer (`LayerReader` provides it)."""

    name: str
    vsize: int
    extents: list[Extent]

    def read_data(self, data_offset: int, length: int) -> bytes: ...


class BlockReader(Protocol):
    """A readable virtual block device: the stack, or an upper over a stack."""

    @property
    def vsize(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class Stack:
    def __init__(self, layers: Sequence[Layer], vsize: int | None = None) -> None:
        if len(layers) > MAX_LAYERS:
            raise InvalidArgumentError(f"a stack holds at most {MAX_LAYERS} layers, got {len(layers)}")
        if not layers and vsize is None:
            raise InvalidArgumentError("an empty stack needs an explicit virtual size")
        sizes = {layer.vsize for layer in layers}
        if len(sizes) > 1:
            raise InvalidArgumentError(
                f"layers of one stack must share one virtual size, got {sorted(sizes)}"
            )
        self._vsize = vsize if vsize is not None else sizes.pop()
        if sizes and self._vsize not in sizes and layers:
            raise InvalidArgumentError(
                f"virtual size {self._vsize} differs from the layers' {layers[0].vsize}"
            )
        self.layers = list(layers)
        self.map = ExtentMap()
        # Painting bottom-up is the same as merging top-down: an upper extent replaces what it covers.
        for idx, layer in enumerate(self.layers):
            for e in layer.extents:
                if e.data_offset is None:
                    self.map.paint(e.offset, e.end, ZERO)
                else:
                    self.map.paint(e.offset, e.end, idx, e.data_offset)

    @property
    def vsize(self) -> int:
        return self._vsize

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the device, short only at its end."""
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"negative range {offset}+{length}")
        end = min(offset + length, self._vsize)
        if offset >= end:
            return b""
        parts: list[bytes] = []
        for seg in self.map.pieces(offset, end):
            if seg.source in (HOLE, ZERO):
                parts.append(bytes(seg.length))
            else:
                parts.append(self.layers[seg.source].read_data(seg.data_offset, seg.length))
        return parts[0] if len(parts) == 1 else b"".join(parts)


def flatten(
    stack: Stack,
    out: BinaryIO,
    codec: str = "lz4",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
) -> BlobInfo:
    """Write one layer equivalent to the whole stack (zeroed ranges kept, so it can replace the stack
    anywhere it is used, also above other layers)."""
    w = LayerWriter(out, stack.vsize, codec, chunk_size, level)
    for seg in stack.map:
        if seg.source == ZERO:
            w.add_zero(seg.start, seg.length)
            continue
        layer = stack.layers[seg.source]
        for pos in range(0, seg.length, _PIECE):
            n = min(_PIECE, seg.length - pos)
            w.add_data(seg.start + pos, layer.read_data(seg.data_offset + pos, n))
    return w.close()
