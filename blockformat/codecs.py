"""Chunk codecs: how one chunk's bytes are compressed in a chunk container.

The codec id is stored in the container's index header (see docs/format.md, "Codec ids"). Each codec
compresses one chunk independently; decompression is told the exact uncompressed size and must produce
exactly that many bytes, or the chunk is corrupt.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cramjam
import lz4.block
import snappy
import zstandard

from .errors import InvalidArgumentError


class CodecId(enum.IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2
    SNAPPY = 3


CODEC_NAMES: dict[str, CodecId] = {
    "none": CodecId.NONE,
    "lz4": CodecId.LZ4,
    "zstd": CodecId.ZSTD,
    "snappy": CodecId.SNAPPY,
}

DEFAULT_ZSTD_LEVEL = 3


class CodecError(Exception):
    """The codec library rejected a chunk (mapped to CorruptBlobError by the reader)."""


@dataclass(frozen=True)
class Codec:
    id: CodecId
    level: int
    compress: Callable[[bytes], bytes]
    # decompress(data, uncompressed_size) -> bytes; raises CodecError on malformed input.
    decompress: Callable[[bytes | memoryview, int], bytes]

    @property
    def name(self) -> str:
        return self.id.name.lower()


def _lz4_decompress(data: bytes | memoryview, size: int) -> bytes:
    try:
        out: bytes = lz4.block.decompress(data, uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise CodecError(f"lz4: {e}") from None
    return out


def _zstd_codec(level: int) -> Codec:
    # zstandard's compressor and decompressor objects must not be used by two threads at once (its
    # docs; sharing one between the device daemon's read threads corrupted output and crashed), so
    # every thread gets its own pair.
    local = threading.local()

    def contexts() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx = getattr(local, "ctx", None)
        if ctx is None:
            ctx = local.ctx = (
                zstandard.ZstdCompressor(level=level, write_content_size=False, write_checksum=False),
                zstandard.ZstdDecompressor(),
            )
        return ctx

    def compress(data: bytes) -> bytes:
        out: bytes = contexts()[0].compress(data)
        return out

    def decompress(data: bytes | memoryview, size: int) -> bytes:
        # A frame may declare its content size, and then zstandard trusts it over max_output_size:
        # refuse a declared size above the chunk's before anything is allocated (decompression bomb).
        try:
            declared = zstandard.frame_content_size(data)
            if declared > size:
                raise CodecError(f"zstd: frame declares {declared} bytes, the chunk holds {size}")
            out: bytes = contexts()[1].decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd: {e}") from None
        return out

    return Codec(CodecId.ZSTD, level, compress, decompress)


def _snappy_decompress(data: bytes | memoryview, size: int) -> bytes:
    # The block's preamble declares its uncompressed length; check it before decompressing.
    try:
        declared = cramjam.snappy.decompress_raw_len(data)
    except Exception as e:  # cramjam raises its own error types
        raise CodecError(f"snappy: {e}") from None
    if declared > size:
        raise CodecError(f"snappy: block declares {declared} bytes, the chunk holds {size}")
    try:
        out: bytes = snappy.uncompress(data)
    except Exception as e:  # python-snappy raises several unrelated types
        raise CodecError(f"snappy: {e}") from None
    return out


def _identity(data: bytes) -> bytes:
    return data


def _identity_decompress(data: bytes | memoryview, size: int) -> bytes:
    return bytes(data)


def _lz4_compress(data: bytes) -> bytes:
    out: bytes = lz4.block.compress(data, store_size=False)
    return out


def _snappy_compress(data: bytes) -> bytes:
    out: bytes = snappy.compress(data)
    return out


def get_codec(codec: CodecId | str, level: int | None = None) -> Codec:
    """Return the codec for an id or a name (``lz4``, ``zstd``, ``snappy``, ``none``)."""
    if isinstance(codec, str):
        try:
            cid = CODEC_NAMES[codec.lower()]
        except KeyError:
            raise InvalidArgumentError(
                f"unknown codec {codec!r}; choose one of {', '.join(CODEC_NAMES)}"
            ) from None
    else:
        cid = CodecId(codec)
    if cid is CodecId.LZ4:
        return Codec(cid, 0, _lz4_compress, _lz4_decompress)
    if cid is CodecId.ZSTD:
        lvl = DEFAULT_ZSTD_LEVEL if level is None else level
        if not 1 <= lvl <= 22:
            raise InvalidArgumentError(f"zstd level {lvl} is outside 1..22")
        return _zstd_codec(lvl)
    if cid is CodecId.SNAPPY:
        return Codec(cid, 0, _snappy_compress, _snappy_decompress)
    return Codec(CodecId.NONE, 0, _identity, _identity_decompress)
