"""The byte layout of the chunk container ("zfile"): its records, versions and bounds.

Normative spec: docs/format.md, "Chunk container". All integers little-endian::

    offset 0            header      32 B   magic "DFLYBLOB", version, codec, chunk shift, CRC32
    offset 32           chunk 0 .. chunk N-1, stored back to back (all-zero chunks take 0 bytes)
    index_offset        index       40 B header + N x u32 stored length + N x u8 kind
                                    + N x 32 B SHA-256 of the stored bytes + M B metadata
    size - 72           trailer     72 B   magic "DFLYTAIL", version, flags, index offset/length,
                                           SHA-256 of the index, CRC32

    header   0 magic | 8 u16 major | 10 u16 minor | 12 u8 codec | 13 u8 shift | 14 14x | 28 u32 CRC32
    index    0 magic | 8 u64 size | 16 u64 N | 24 u8 codec | 25 u8 shift | 26 2x | 28 i32 level
             | 32 u64 M | 40 lengths | 40+4N kinds | 40+5N digests | 40+37N metadata
    trailer  0 magic | 8 u16 major | 10 u16 minor | 12 u32 flags | 16 u64 index offset
             | 24 u64 index length | 32 SHA-256 of the index | 64 4x | 68 u32 CRC32

One `struct.Struct` per record; the CRC32 that closes the header and the trailer is packed separately
(`CRC`) because it covers the bytes before it. The modules that use this layout: `chunkwriter` writes
it, `chunkindex` parses and verifies the tail (trailer + index) and knows where every chunk lies,
`chunkfile` reads chunks through that index.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from dataclasses import dataclass

from .digest import Digest
from .errors import InvalidArgumentError

FORMAT_MAJOR = 1
FORMAT_MINOR = 0
#: Major versions this reader accepts. A higher minor version of an accepted major is readable: minor
#: versions only add meaning to fields that v1.0 writers set to zero and v1.0 readers ignore.
READABLE_MAJORS = (1,)

MIN_CHUNK_SHIFT = 12  # 4 KiB
MAX_CHUNK_SHIFT = 20  # 1 MiB
DEFAULT_CHUNK_SIZE = 64 * 1024  # chosen by scripts/bench_blockformat.py; see docs/format.md

HEADER_MAGIC = b"DFLYBLOB"
INDEX_MAGIC = b"DFLYINDX"
TRAILER_MAGIC = b"DFLYTAIL"

# magic, major, minor, codec, chunk shift, reserved(2), reserved(12); then CRC32 of the 28 bytes before it
HEADER = struct.Struct("<8sHHBB2x12x")
HEADER_SIZE = HEADER.size + 4  # 32
# magic, uncompressed size, chunk count, codec, chunk shift, reserved(2), level, metadata length
INDEX_HEADER = struct.Struct("<8sQQBB2xiQ")  # 40 bytes
# magic, major, minor, flags, index offset, index length, index sha256, reserved(4); then CRC32
TRAILER = struct.Struct("<8sHHIQQ32s4x")
TRAILER_SIZE = TRAILER.size + 4  # 72
CRC = struct.Struct("<I")

KIND_ZERO = 0  # all-zero chunk, not stored (stored length 0, digest all zero)
KIND_COMPRESSED = 1  # stored compressed with the blob's codec
KIND_RAW = 2  # stored uncompressed: compression did not make it smaller
KINDS = (KIND_ZERO, KIND_COMPRESSED, KIND_RAW)

#: The first read of a blob fetches this much of its tail: the trailer and, for most blobs, the index.
TAIL_READ = 256 * 1024
#: The longest index a reader accepts (and a writer writes). The trailer's ``index_length`` comes from
#: the blob, so without a bound a hostile or damaged trailer makes a reader allocate whatever it
#: declares before any digest could refuse the bytes. 256 MiB holds 7.2 million chunks (37 bytes each):
#: a layer of 442 GiB at the default 64 KiB chunk, 27 GiB at 4 KiB, 6.9 TiB at 1 MiB — beyond any real
#: image layer — while opening a blob with the largest index peaks at about 3.5 times this in memory
#: (870 MB measured: the index, its parsed tables and the copy kept for `check_tail`).
MAX_INDEX_SIZE = 256 * 1024 * 1024
#: Index bytes per chunk: stored length (u32), kind (u8), SHA-256 of the stored bytes.
INDEX_ENTRY_SIZE = 4 + 1 + 32
#: Chunks in the longest index (no metadata): what MAX_INDEX_SIZE admits.
MAX_CHUNKS = (MAX_INDEX_SIZE - INDEX_HEADER.size) // INDEX_ENTRY_SIZE
#: The largest blob that can be valid: every chunk stored at the largest chunk size (a stored chunk is
#: never longer than a chunk: one that does not compress is stored raw), plus the longest index.
#: Callers that size something by a blob's declared size (a cache's presence bitmap) check it first.
MAX_BLOB_SIZE = HEADER_SIZE + MAX_CHUNKS * (1 << MAX_CHUNK_SHIFT) + MAX_INDEX_SIZE + TRAILER_SIZE

#: A chunk of zeros, at the largest chunk size (sliced for smaller ones).
ZERO_CHUNK = bytes(1 << MAX_CHUNK_SHIFT)

#: Whether this machine stores an ``array("I")`` little-endian (the index's byte order).
LITTLE_ENDIAN = array("I", [1]).tobytes() == b"\x01\x00\x00\x00"


def crc32(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def check_chunk_size(chunk_size: int) -> int:
    """Return log2(chunk_size), or raise if it is not a power of two in 4 KiB..1 MiB."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise InvalidArgumentError(f"chunk size {chunk_size} is not a power of two")
    shift = chunk_size.bit_length() - 1
    if not MIN_CHUNK_SHIFT <= shift <= MAX_CHUNK_SHIFT:
        raise InvalidArgumentError(
            f"chunk size {chunk_size} is outside {1 << MIN_CHUNK_SHIFT}..{1 << MAX_CHUNK_SHIFT} bytes"
        )
    return shift


@dataclass(frozen=True)
class BlobInfo:
    """What a writer produced (and what `ChunkIndex.info` reports)."""

    codec: str
    level: int
    chunk_size: int
    uncompressed_size: int
    chunk_count: int
    stored_chunks: int
    raw_chunks: int
    zero_chunks: int
    blob_size: int
    index_digest: Digest
    metadata_size: int
    blob_digest: Digest | None = None  # sha256 of the whole blob, known to writers (OCI layer digest)

    @property
    def ratio(self) -> float:
        """Uncompressed bytes per blob byte (higher is better)."""
        return self.uncompressed_size / self.blob_size if self.blob_size else 0.0
