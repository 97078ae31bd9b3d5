"""A stack of layers (bottom to top) read as one virtual block device; `flatten` merges it into a layer.

The layers' extent maps are merged once, when the stack is built, into one sorted map whose segments
record which layer serves each range (docs/format.md, "Stack"). A read is a binary search into that
map plus chunk reads from the layers it names; ranges no layer covers, and zeroed extents, read as
zeros. A real image's merged map is small (DADI reports <= 4.5K segments), so it lives in memory.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import BinaryIO, Protocol

from .chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo, Part, join_parts
from .errors import InvalidArgumentError
from .extents import ZERO, ExtentMap
from .layer import Extent, LayerWriter

MAX_LAYERS = 255
_PIECE = 4 * 1024 * 1024
#: Zeros for holes and zeroed ranges in `read_parts`, shared (read-only).
_ZERO_VIEW = memoryview(bytes(1 << 20))


class Layer(Protocol):
    """What a stack needs of a layer (`LayerReader` provides it)."""

    name: str
    vsize: int
    extents: list[Extent]

    @property
    def chunk_size(self) -> int: ...

    def read_data(self, data_offset: int, length: int) -> bytes: ...

    def read_data_parts(self, data_offset: int, length: int) -> list[Part]: ...


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
        # The merged map never changes after this, so reads search flat copies of it (no Segment
        # objects or generators per read: a 4 KiB read is on the device's hot path).
        segs = list(self.map)
        self._starts = [seg.start for seg in segs]
        self._ends = [seg.end for seg in segs]
        self._srcs = [seg.source for seg in segs]
        self._doffs = [seg.data_offset for seg in segs]

    @property
    def vsize(self) -> int:
        return self._vsize

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the device, short only at its end."""
        return join_parts(self.read_parts(offset, length))

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """The bytes of `read` as read-only pieces that share memory with the layers' decoded chunks."""
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"negative range {offset}+{length}")
        end = min(offset + length, self._vsize)
        if offset >= end:
            return []
        starts, ends, srcs, doffs = self._starts, self._ends, self._srcs, self._doffs
        parts: list[Part] = []
        pos = offset
        i = bisect_right(starts, pos) - 1
        if i < 0 or ends[i] <= pos:
            i += 1
        while pos < end:
            if i < len(starts) and starts[i] <= pos:
                stop = min(ends[i], end)
                src = srcs[i]
                if src >= 0:
                    parts += self.layers[src].read_data_parts(doffs[i] + (pos - starts[i]), stop - pos)
                else:
                    parts.append(_zeros(stop - pos))
                i += 1
            else:  # a hole up to the next segment
                stop = min(starts[i], end) if i < len(starts) else end
                parts.append(_zeros(stop - pos))
            pos = stop
        return parts

    def layer_ranges(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(layer index, data offset, length) of every piece of layer data that [offset, offset+length)
        of the device reads; holes and zeroed ranges read no layer and yield nothing."""
        end = min(offset + length, self._vsize)
        if offset < 0 or offset >= end:
            return
        starts, ends, srcs, doffs = self._starts, self._ends, self._srcs, self._doffs
        i = max(0, bisect_right(starts, offset) - 1)
        while i < len(starts) and starts[i] < end:
            lo, hi = max(starts[i], offset), min(ends[i], end)
            if lo < hi and srcs[i] >= 0:
                yield srcs[i], doffs[i] + (lo - starts[i]), hi - lo
            i += 1

    def chunk_window(self, offset: int, end: int) -> tuple[int, int]:
        """The device range around [offset, end) held by the same decoded chunks as [offset, end).

        Reading the window costs no more decompression and checking than reading [offset, end): it
        adds the rest of the first and the last chunk, as far as the same layer serves the device there
        (holes, zeroed ranges and other layers' extents end it). Used to hand the kernel the bytes a
        small read decoded anyway."""
        end = min(end, self._vsize)
        if not 0 <= offset < end:
            return offset, max(offset, end)
        starts, ends, srcs, doffs = self._starts, self._ends, self._srcs, self._doffs
        lo, hi = offset, end
        i = bisect_right(starts, offset) - 1
        if i >= 0 and offset < ends[i] and srcs[i] >= 0:
            doff = doffs[i] + (offset - starts[i])
            lo = max(starts[i], offset - doff % self.layers[srcs[i]].chunk_size)
        j = bisect_right(starts, end - 1) - 1
        if j >= 0 and end - 1 < ends[j] and srcs[j] >= 0:
            doff = doffs[j] + (end - 1 - starts[j])
            size = self.layers[srcs[j]].chunk_size
            hi = min(ends[j], end + size - 1 - doff % size)
        return lo, hi


def _zeros(n: int) -> Part:
    return _ZERO_VIEW[:n] if n <= len(_ZERO_VIEW) else bytes(n)


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
