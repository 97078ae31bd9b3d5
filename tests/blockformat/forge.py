"""Building chunk containers for tests: packing, and forging blobs that lie consistently.

The `forge` helpers (`reassemble`, `rewrite_trailer`, `rewrite_index`) recompute the index digest, the
index location and the trailer CRC, so a crafted blob exercises the parser rather than the checksums.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import zlib
from collections.abc import Callable

from blockformat.chunkfile import (
    CRC,
    HEADER,
    HEADER_SIZE,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    BlobInfo,
    ChunkReader,
    ChunkWriter,
)
from blockformat.source import BytesSource
from tests.conftest import text_bytes

CODECS = ["lz4", "zstd", "snappy", "none"]
CHUNK_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def pack(
    data: bytes,
    codec: str = "lz4",
    chunk_size: int = 4096,
    level: int | None = None,
    metadata: bytes = b"",
    piece: int | None = None,
) -> tuple[bytes, BlobInfo]:
    """Pack `data` with ChunkWriter, in one write or in writes of `piece` bytes."""
    out = io.BytesIO()
    w = ChunkWriter(out, codec, chunk_size, level)
    if piece is None:
        w.write(data)
    else:
        for off in range(0, len(data), piece):
            w.write(data[off : off + piece])
    info = w.close(metadata)
    return out.getvalue(), info


def open_blob(blob: bytes, expected: str | None = None, cache_chunks: int = 0) -> ChunkReader:
    return ChunkReader(BytesSource(blob, name="test.blob"), expected, cache_chunks=cache_chunks)


def flip(blob: bytes, pos: int, mask: int = 0xFF) -> bytes:
    b = bytearray(blob)
    b[pos] ^= mask
    return bytes(b)


def split_blob(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, stored chunks, index) of a well-formed blob."""
    _, _, _, _, index_offset, index_length, _ = TRAILER.unpack_from(blob, len(blob) - TRAILER_SIZE)
    return (
        blob[:HEADER_SIZE],
        blob[HEADER_SIZE:index_offset],
        blob[index_offset : index_offset + index_length],
    )


def make_trailer(index_offset: int, index: bytes, major: int = 1, minor: int = 0, flags: int = 0) -> bytes:
    t = TRAILER.pack(
        TRAILER_MAGIC, major, minor, flags, index_offset, len(index), hashlib.sha256(index).digest()
    )
    return t + CRC.pack(crc32(t))


def make_header(
    codec_id: int, shift: int, major: int = 1, minor: int = 0, magic: bytes = b"DFLYBLOB"
) -> bytes:
    h = HEADER.pack(magic, major, minor, codec_id, shift)
    return h + CRC.pack(crc32(h))


def reassemble(header: bytes, chunks: bytes, index: bytes, **trailer: int) -> bytes:
    """A blob whose index digest, index location and trailer CRC are all consistent again."""
    return header + chunks + index + make_trailer(len(header) + len(chunks), index, **trailer)


def rewrite_trailer(blob: bytes, major: int = 1, minor: int = 0, flags: int = 0) -> bytes:
    header, chunks, index = split_blob(blob)
    return reassemble(header, chunks, index, major=major, minor=minor, flags=flags)


def rewrite_index(blob: bytes, mutate: Callable[[bytearray], bytes | bytearray]) -> bytes:
    header, chunks, index = split_blob(blob)
    return reassemble(header, chunks, bytes(mutate(bytearray(index))))


def consume(reader: ChunkReader) -> bytes:
    """Everything a reader can be asked: the whole data, and a full verify."""
    data = reader.read(0, reader.size)
    reader.verify()
    return data


class PartialSource:
    """A partly fetched blob: it holds [0, cut) and the tail [tail_from, size); a read stops at the first
    byte it does not hold, like a cache whose background fetch has not got that far yet."""

    def __init__(self, blob: bytes, cut: int, tail_from: int) -> None:
        self._blob = blob
        self._cut = cut
        self._tail_from = tail_from
        self.name = "short.blob"

    def size(self) -> int:
        return len(self._blob)

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length if offset >= self._tail_from else min(offset + length, self._cut)
        return self._blob[offset:end]


@functools.cache
def shape_data(shape: str, cs: int) -> bytes:
    rng = random.Random(cs)
    if shape == "empty":
        return b""
    if shape == "one_byte":
        return b"\x2a"
    if shape == "not_a_multiple":
        return text_bytes(2 * cs + cs // 3 + 1, cs)
    if shape == "all_zeros":
        return bytes(3 * cs)
    if shape == "zeros_not_a_multiple":
        return bytes(cs + 17)
    if shape == "random":
        return rng.randbytes(2 * cs + 123)
    if shape == "mixed":
        return text_bytes(cs, 1) + bytes(cs) + rng.randbytes(cs) + text_bytes(cs // 2 + 3, 2)
    raise AssertionError(shape)


SHAPES = ["empty", "one_byte", "not_a_multiple", "all_zeros", "zeros_not_a_multiple", "random", "mixed"]
