"""The layer format ("LSMT" layer): a sparse block-level diff over a virtual device, in one blob.

A layer blob is a chunk container (`chunkfile`) whose uncompressed data is the concatenation of the
layer's data extents in device order, and whose index metadata is the extent map (normative spec:
docs/format.md, "Layer")::

    metadata header (32 B)
      0   8  magic        b"DFLYLAYR"
      8   2  major        1
     10   2  minor        0
     12   4  reserved     0
     16   8  vsize        virtual device size in bytes (multiple of 4096)
     24   8  count        number of extent records
    records (24 B each, sorted by device offset, non-overlapping)
      0   8  device offset   multiple of 512
      8   8  length          multiple of 512, > 0
     16   8  data offset     offset in the container's data, or 2**64-1 for a zeroed extent

Because the extent map sits inside the container's index, the one digest the manifest carries (the
index digest) covers the map, the chunk digests and thereby every byte of the layer.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Unpack

from .chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo, ChunkReader, ChunkWriter, Part, ReaderOptions
from .digest import Digest
from .errors import CorruptBlobError, InvalidArgumentError, UnsupportedFormatError
from .extents import ZERO
from .source import RangeSource

LAYER_MAGIC = b"DFLYLAYR"
LAYER_MAJOR = 1
LAYER_MINOR = 0
READABLE_LAYER_MAJORS = (1,)

SECTOR = 512
ALIGNMENT = 4096
MAX_VSIZE = 1 << 50  # 1 PiB: far beyond any image, small enough to keep offsets exact everywhere
DEFAULT_VSIZE = 64 << 30

LAYER_HEADER = struct.Struct("<8sHH4xQQ")
EXTENT = struct.Struct("<QQQ")
ZERO_DATA = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent of a layer: `data_offset` is None for a zeroed (trimmed) extent."""

    offset: int
    length: int
    data_offset: int | None

    @property
    def end(self) -> int:
        return self.offset + self.length


def check_vsize(vsize: int) -> None:
    if vsize <= 0 or vsize % ALIGNMENT or vsize > MAX_VSIZE:
        raise InvalidArgumentError(
            f"virtual size {vsize} must be a positive multiple of {ALIGNMENT} up to {MAX_VSIZE}"
        )


def check_range(offset: int, length: int, vsize: int) -> None:
    """A write or trim must be sector-aligned and inside the device."""
    if offset < 0 or length < 0 or offset % SECTOR or length % SECTOR:
        raise InvalidArgumentError(f"range {offset}+{length} is not aligned to {SECTOR}-byte sectors")
    if offset + length > vsize:
        raise InvalidArgumentError(f"range {offset}+{length} ends beyond the device size {vsize}")


class LayerWriter:
    """Writes a layer blob from extents given in increasing device order.

    ``add_data`` may be called several times for one contiguous run (the pieces are coalesced into one
    extent); ``add_zero`` records a trimmed range. Memory is O(extents + index).
    """

    def __init__(
        self,
        out: BinaryIO,
        vsize: int,
        codec: str = "lz4",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        level: int | None = None,
        workers: int = 1,
    ) -> None:
        check_vsize(vsize)
        self.vsize = vsize
        self._w = ChunkWriter(out, codec, chunk_size, level, workers)
        self._extents: list[Extent] = []
        self._pos = 0  # end of the last extent
        self._data = 0  # bytes of data written

    def _append(self, offset: int, length: int, zero: bool) -> None:
        check_range(offset, length, self.vsize)
        if offset < self._pos:
            raise InvalidArgumentError(f"extent at {offset} overlaps or precedes the previous one")
        if not length:
            return
        last = self._extents[-1] if self._extents else None
        if last is not None and last.end == offset and (last.data_offset is None) == zero:
            # Data extents are contiguous in the data stream too, so a touching one simply grows.
            self._extents[-1] = Extent(last.offset, last.length + length, last.data_offset)
        else:
            self._extents.append(Extent(offset, length, None if zero else self._data))
        self._pos = offset + length

    def add_data(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._append(offset, len(data), zero=False)
        self._w.write(data)
        self._data += len(data)

    def add_zero(self, offset: int, length: int) -> None:
        self._append(offset, length, zero=True)

    def close(self) -> BlobInfo:
        meta = bytearray(
            LAYER_HEADER.pack(LAYER_MAGIC, LAYER_MAJOR, LAYER_MINOR, self.vsize, len(self._extents))
        )
        for e in self._extents:
            meta += EXTENT.pack(e.offset, e.length, ZERO_DATA if e.data_offset is None else e.data_offset)
        return self._w.close(bytes(meta))


class LayerReader:
    """A layer blob opened for reading: its extent map plus random access to its data.

    `options` are the `ChunkReader`'s: `index`, when given, is the blob's `ChunkIndex`, already loaded and
    verified (the node cache keeps one per blob), so opening reads nothing; it is checked against
    `expected_index_digest` all the same."""

    def __init__(
        self, source: RangeSource, expected_index_digest: str | None = None, **options: Unpack[ReaderOptions]
    ) -> None:
        self.chunks = ChunkReader(source, expected_index_digest, **options)
        self.name = source.name
        self.vsize, self.extents = parse_layer_metadata(
            self.chunks.metadata, self.chunks.size, self.name, self.chunks.metadata_offset
        )

    @property
    def index_digest(self) -> Digest:
        return self.chunks.index_digest

    @property
    def chunk_size(self) -> int:
        """Uncompressed bytes per chunk: what one decode costs and yields."""
        return self.chunks.chunk_size

    def read_data(self, data_offset: int, length: int) -> bytes:
        data = self.chunks.read(data_offset, length)
        if len(data) != length:
            raise CorruptBlobError(
                self.name, data_offset, "layer data (extent beyond the data)", length, len(data)
            )
        return data

    def read_data_parts(self, data_offset: int, length: int) -> list[Part]:
        """`read_data` as pieces sharing memory with the decoded chunks (`ChunkReader.read_parts`)."""
        parts = self.chunks.read_parts(data_offset, length)
        got = sum(len(p) for p in parts)
        if got != length:
            raise CorruptBlobError(self.name, data_offset, "layer data (extent beyond the data)", length, got)
        return parts

    def segments(self) -> Iterator[tuple[int, int, int, int]]:
        """(start, end, source marker, data offset) with source 0 for data and ZERO for zeroed extents."""
        for e in self.extents:
            if e.data_offset is None:
                yield e.offset, e.end, ZERO, 0
            else:
                yield e.offset, e.end, 0, e.data_offset


def parse_layer_metadata(meta: bytes, data_size: int, blob: str, at: int) -> tuple[int, list[Extent]]:
    """Parse and validate a layer's extent map (the container metadata); `at` locates it for messages."""
    if len(meta) < LAYER_HEADER.size:
        raise CorruptBlobError(blob, at, "layer metadata", f">= {LAYER_HEADER.size} bytes", len(meta))
    magic, major, minor, vsize, count = LAYER_HEADER.unpack_from(meta)
    if magic != LAYER_MAGIC:
        raise CorruptBlobError(
            blob,
            at,
            "layer metadata",
            f"magic {LAYER_MAGIC!r}",
            repr(magic),
            "this chunk container is not a damselfly layer",
        )
    if major not in READABLE_LAYER_MAJORS:
        raise UnsupportedFormatError(
            f"{blob}: layer format {major}.{minor}; this damselfly reads major version(s) "
            f"{READABLE_LAYER_MAJORS}; upgrade damselfly"
        )
    # The count is checked against the bytes present before any record is read, so a hostile count
    # allocates nothing: the extent list never outgrows the (bounded, digest-checked) metadata.
    if len(meta) != LAYER_HEADER.size + count * EXTENT.size:
        raise CorruptBlobError(
            blob,
            at,
            f"layer extent table length ({count} extents)",
            LAYER_HEADER.size + count * EXTENT.size,
            len(meta),
        )
    if vsize <= 0 or vsize % ALIGNMENT or vsize > MAX_VSIZE:
        raise CorruptBlobError(
            blob, at, "layer virtual size", f"a multiple of {ALIGNMENT} up to {MAX_VSIZE}", vsize
        )
    extents: list[Extent] = []
    pos = 0
    records = EXTENT.iter_unpack(memoryview(meta)[LAYER_HEADER.size :])
    for i, (off, length, doff) in enumerate(records):
        bad = None
        if off % SECTOR or length % SECTOR or length == 0:
            bad = "not sector-aligned or empty"
        elif off < pos:
            bad = "overlaps or precedes the previous extent"
        elif off + length > vsize:
            bad = f"ends beyond the virtual size {vsize}"
        elif doff != ZERO_DATA and doff + length > data_size:
            bad = f"points beyond the layer data ({data_size} bytes)"
        if bad:
            raise CorruptBlobError(blob, at, f"layer extent {i} ({off}+{length}: {bad})")
        extents.append(Extent(off, length, None if doff == ZERO_DATA else doff))
        pos = off + length
    return vsize, extents
