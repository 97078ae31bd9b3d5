"""Writing a chunk container: stream data in, get header, chunks, index and trailer out.

Layout: `chunklayout` (normative spec: docs/format.md, "Chunk container"). Write order::

    header (32 B) | chunk 0 | chunk 1 | ... | index | trailer (72 B)

Each chunk is compressed alone as it fills; an all-zero chunk is not stored, one that does not shrink
is stored raw. The writer keeps one chunk of buffer plus the index arrays (37 bytes per chunk), never
the blob, and hashes everything it emits, so it may write to a pipe and still report the blob's OCI
digest. With ``workers`` > 1, whole chunks are compressed and hashed by a pool of threads (the codecs
and SHA-256 release the GIL) in batches, and written in order: the same bytes as with one. A crash
mid-way leaves a file without a valid trailer, which no reader accepts; callers that
write files write to a temporary name and rename it when `close` returned (`durable.atomic_write`).
"""

from __future__ import annotations

import hashlib
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from .chunklayout import (
    CRC,
    DEFAULT_CHUNK_SIZE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER,
    HEADER_MAGIC,
    INDEX_ENTRY_SIZE,
    INDEX_HEADER,
    INDEX_MAGIC,
    KIND_COMPRESSED,
    KIND_RAW,
    KIND_ZERO,
    LITTLE_ENDIAN,
    MAX_CHUNKS,
    MAX_INDEX_SIZE,
    TRAILER,
    TRAILER_MAGIC,
    ZERO_CHUNK,
    BlobInfo,
    check_chunk_size,
    crc32,
)
from .codecs import Codec, CodecId, get_codec
from .digest import sha256_digest
from .errors import InvalidArgumentError

#: The digest field of a zero chunk (it has no stored bytes).
NO_DIGEST = bytes(32)
#: Chunks handed to the pool at a time (with `workers` > 1).
_BATCH = 32


class ChunkWriter:
    """Streams data into a chunk container. Memory is O(index): one chunk buffer plus the index arrays.

    ``write`` any number of times, then ``close(metadata)``; the output is written sequentially, so it may
    be a pipe. The SHA-256 of everything written is computed on the way (``BlobInfo.blob_digest``).
    """

    def __init__(
        self,
        out: BinaryIO,
        codec: str | CodecId = "lz4",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        level: int | None = None,
        workers: int = 1,
    ) -> None:
        self._shift = check_chunk_size(chunk_size)
        self._chunk_size = chunk_size
        self._codec: Codec = get_codec(codec, level)
        self._out = out
        self._buf = bytearray()
        self._lengths = array("I")
        self._kinds = bytearray()
        self._digests = bytearray()
        self._size = 0
        self._offset = 0
        self._blob_hash = hashlib.sha256()
        self._closed = False
        self._pool = ThreadPoolExecutor(workers, "damselfly-chunks") if workers > 1 else None
        self._pending: list[bytes] = []
        self._in_flight: list[Future[tuple[int, bytes, bytes]]] = []
        header = HEADER.pack(HEADER_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, self._codec.id, self._shift)
        self._emit(header + CRC.pack(crc32(header)))

    def _emit(self, data: bytes | memoryview) -> None:
        self._out.write(data)
        self._blob_hash.update(data)
        self._offset += len(data)

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def uncompressed_size(self) -> int:
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise InvalidArgumentError("write to a closed ChunkWriter")
        self._size += len(data)
        cs = self._chunk_size
        if not self._buf and len(data) >= cs:
            # Fast path: whole chunks straight from the caller's buffer.
            mv = memoryview(data)
            whole = len(mv) - len(mv) % cs
            for off in range(0, whole, cs):
                self._put_chunk(bytes(mv[off : off + cs]))
            self._buf += mv[whole:]
            return
        self._buf += data
        if len(self._buf) >= cs:
            mv = memoryview(self._buf)
            whole = len(mv) - len(mv) % cs
            for off in range(0, whole, cs):
                self._put_chunk(bytes(mv[off : off + cs]))
            rest = bytes(mv[whole:])
            mv.release()
            self._buf = bytearray(rest)

    def _encode(self, chunk: bytes) -> tuple[int, bytes]:
        """(kind, stored bytes) of one chunk."""
        if chunk == ZERO_CHUNK[: len(chunk)]:
            return KIND_ZERO, b""
        if self._codec.id == CodecId.NONE:
            return KIND_RAW, chunk
        stored = self._codec.compress(chunk)
        if len(stored) >= len(chunk):
            return KIND_RAW, chunk
        return KIND_COMPRESSED, stored

    def _encode_hashed(self, chunk: bytes) -> tuple[int, bytes, bytes]:
        kind, stored = self._encode(chunk)
        return kind, stored, (hashlib.sha256(stored).digest() if kind != KIND_ZERO else NO_DIGEST)

    def _put_chunk(self, chunk: bytes) -> None:
        if len(self._lengths) + len(self._in_flight) + len(self._pending) >= MAX_CHUNKS:
            raise InvalidArgumentError(
                f"more than {MAX_CHUNKS} chunks of {self._chunk_size} bytes do not fit in an index of at "
                f"most {MAX_INDEX_SIZE} bytes; use a larger chunk size"
            )
        if self._pool is not None:
            self._pending.append(chunk)
            if len(self._pending) >= _BATCH:
                self._drain()
            return
        self._record(*self._encode_hashed(chunk))

    def _drain(self, final: bool = False) -> None:
        """Hand the pending chunks to the pool, then record the previous batch (whose writing and
        hashing overlap this batch's compression); with `final`, record everything."""
        assert self._pool is not None
        pending, self._pending = self._pending, []
        previous, self._in_flight = (
            self._in_flight,
            [self._pool.submit(self._encode_hashed, c) for c in pending],
        )
        for future in previous:
            self._record(*future.result())
        if final:
            current, self._in_flight = self._in_flight, []
            for future in current:
                self._record(*future.result())

    def _record(self, kind: int, stored: bytes, digest: bytes) -> None:
        self._lengths.append(len(stored))
        self._kinds.append(kind)
        self._digests += digest
        if stored:
            self._emit(stored)

    def close(self, metadata: bytes = b"") -> BlobInfo:
        """Flush the last chunk, write index and trailer; return what was written."""
        if self._closed:
            raise InvalidArgumentError("ChunkWriter closed twice")
        if self._buf:
            self._put_chunk(bytes(self._buf))
            self._buf = bytearray()
        if self._pool is not None:
            self._drain(final=True)
            self._pool.shutdown()
        self._closed = True
        n = len(self._lengths)
        if INDEX_HEADER.size + INDEX_ENTRY_SIZE * n + len(metadata) > MAX_INDEX_SIZE:
            raise InvalidArgumentError(
                f"an index of {n} chunks and {len(metadata)} bytes of metadata is longer than "
                f"{MAX_INDEX_SIZE} bytes, the most a reader accepts"
            )
        index_offset = self._offset
        ih = INDEX_HEADER.pack(
            INDEX_MAGIC, self._size, n, self._codec.id, self._shift, self._codec.level, len(metadata)
        )
        index_hash = hashlib.sha256()
        lengths = self._lengths.tobytes() if LITTLE_ENDIAN else _swapped(self._lengths)
        parts = (ih, lengths, bytes(self._kinds), bytes(self._digests), metadata)
        index_length = 0
        for part in parts:
            index_hash.update(part)
            index_length += len(part)
            self._emit(part)
        index_digest = index_hash.digest()
        trailer = TRAILER.pack(
            TRAILER_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, index_offset, index_length, index_digest
        )
        self._emit(trailer + CRC.pack(crc32(trailer)))
        self._out.flush()
        zero = self._kinds.count(KIND_ZERO)
        raw = self._kinds.count(KIND_RAW)
        return BlobInfo(
            codec=self._codec.name,
            level=self._codec.level,
            chunk_size=self._chunk_size,
            uncompressed_size=self._size,
            chunk_count=n,
            stored_chunks=n - zero,
            raw_chunks=raw,
            zero_chunks=zero,
            blob_size=self._offset,
            index_digest=sha256_digest(index_digest),
            metadata_size=len(metadata),
            blob_digest=sha256_digest(self._blob_hash.digest()),
        )


def _swapped(a: array[int]) -> bytes:
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def pack_file(
    src: BinaryIO,
    out: BinaryIO,
    codec: str = "lz4",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    metadata: bytes = b"",
) -> BlobInfo:
    """Pack everything readable from ``src`` into a chunk container written to ``out``."""
    w = ChunkWriter(out, codec, chunk_size, level)
    while True:
        data = src.read(4 * 1024 * 1024)
        if not data:
            break
        w.write(data)
    return w.close(metadata)
