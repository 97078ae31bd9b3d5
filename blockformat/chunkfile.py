"""The chunk container ("zfile"): a seekable, compressed, digest-verified blob.

Layout (normative spec: docs/format.md, "Chunk container")::

    offset 0            header      32 B   magic "DFLYBLOB", version, codec, chunk shift, CRC32
    offset 32           chunk 0 .. chunk N-1, stored back to back (all-zero chunks take 0 bytes)
    index_offset        index       40 B header + N x u32 stored length + N x u8 kind
                                    + N x 32 B SHA-256 of the stored bytes + M B metadata
    size - 72           trailer     72 B   magic "DFLYTAIL", version, flags, index offset/length,
                                           SHA-256 of the index, CRC32

Write order: header, chunks as they are compressed, index, trailer. A reader needs only the trailer
(one ranged read of the tail, which usually also covers the index) and then the exact byte ranges of
the chunks it wants; a run of neighbouring chunks is one read. Every chunk is checked against its
SHA-256 before it is decompressed, the index against the trailer's SHA-256, and that against the digest
the image manifest carries (``expected_index_digest``), so no byte is returned that the manifest does not
vouch for.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

from .codecs import Codec, CodecError, CodecId, get_codec
from .errors import (
    CorruptBlobError,
    InvalidArgumentError,
    TruncatedBlobError,
    UnsupportedFormatError,
)
from .source import RangeSource

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
_KINDS = (KIND_ZERO, KIND_COMPRESSED, KIND_RAW)

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
#: Upper bound on one coalesced read, so a large request does not buffer unbounded memory.
MAX_COALESCED_READ = 8 * 1024 * 1024

_ZEROS = bytes(1 << MAX_CHUNK_SHIFT)
_NO_DIGEST = bytes(32)

#: A piece of a read: a whole decoded chunk, or a read-only view into one.
Part = bytes | memoryview


def join_parts(parts: list[Part]) -> bytes:
    """The bytes of `read_parts`' pieces (no copy for a single ``bytes`` piece)."""
    if len(parts) == 1:
        part = parts[0]
        return part if isinstance(part, bytes) else bytes(part)
    return b"".join(parts)


def _cut(data: bytes, lo: int, hi: int) -> Part:
    """data[lo:hi] without copying (the whole object when it is all of it)."""
    if lo == 0 and hi >= len(data):
        return data
    return memoryview(data)[lo:hi]


def _crc32(data: bytes) -> int:
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


def format_digest(raw: bytes) -> str:
    return "sha256:" + raw.hex()


def parse_digest(digest: str) -> bytes:
    """``sha256:<64 hex>`` -> 32 raw bytes."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64:
        raise InvalidArgumentError(f"{digest!r} is not a sha256:<64 hex digits> digest")
    try:
        return bytes.fromhex(hexpart)
    except ValueError:
        raise InvalidArgumentError(f"{digest!r} is not a sha256:<64 hex digits> digest") from None


@dataclass(frozen=True)
class BlobInfo:
    """What a writer produced (and what `ChunkReader.info` reports)."""

    codec: str
    level: int
    chunk_size: int
    uncompressed_size: int
    chunk_count: int
    stored_chunks: int
    raw_chunks: int
    zero_chunks: int
    blob_size: int
    index_digest: str
    metadata_size: int
    blob_digest: str | None = None  # sha256 of the whole blob, known to writers (OCI layer digest)

    @property
    def ratio(self) -> float:
        """Uncompressed bytes per blob byte (higher is better)."""
        return self.uncompressed_size / self.blob_size if self.blob_size else 0.0


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
        header = HEADER.pack(HEADER_MAGIC, FORMAT_MAJOR, FORMAT_MINOR, self._codec.id, self._shift)
        self._emit(header + CRC.pack(_crc32(header)))

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

    def _put_chunk(self, chunk: bytes) -> None:
        if len(self._lengths) >= MAX_CHUNKS:
            raise InvalidArgumentError(
                f"more than {MAX_CHUNKS} chunks of {self._chunk_size} bytes do not fit in an index of at "
                f"most {MAX_INDEX_SIZE} bytes; use a larger chunk size"
            )
        if chunk == _ZEROS[: len(chunk)]:
            self._lengths.append(0)
            self._kinds.append(KIND_ZERO)
            self._digests += _NO_DIGEST
            return
        stored = self._codec.compress(chunk) if self._codec.id != CodecId.NONE else chunk
        kind = KIND_COMPRESSED
        if self._codec.id == CodecId.NONE or len(stored) >= len(chunk):
            stored, kind = chunk, KIND_RAW
        self._lengths.append(len(stored))
        self._kinds.append(kind)
        self._digests += hashlib.sha256(stored).digest()
        self._emit(stored)

    def close(self, metadata: bytes = b"") -> BlobInfo:
        """Flush the last chunk, write index and trailer; return what was written."""
        if self._closed:
            raise InvalidArgumentError("ChunkWriter closed twice")
        if self._buf:
            self._put_chunk(bytes(self._buf))
            self._buf = bytearray()
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
        lengths = self._lengths.tobytes() if _LITTLE else _swapped(self._lengths)
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
        self._emit(trailer + CRC.pack(_crc32(trailer)))
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
            index_digest=format_digest(index_digest),
            metadata_size=len(metadata),
            blob_digest=format_digest(self._blob_hash.digest()),
        )


_LITTLE = array("I", [1]).tobytes() == b"\x01\x00\x00\x00"


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


@dataclass(frozen=True)
class _Trailer:
    index_offset: int
    index_length: int
    index_digest: bytes
    minor: int


class ChunkReader:
    """Random access to a chunk container over a range source.

    Opening reads the tail once (trailer + index, verified). ``read(offset, length)`` then fetches only
    the stored ranges of the chunks it needs — a run of neighbouring chunks in one source read — verifies
    each chunk's SHA-256, decompresses it and checks its size. A small LRU of decompressed chunks serves
    small sequential reads without decompressing a chunk twice. ``read_parts`` returns the same bytes as
    pieces of the decoded chunks, without copying them (the device daemon writes its replies from them).

    ``verified``, if given, is asked before each read: True means the source's bytes were all checked
    against the blob's digest already and cannot change (a sealed cache blob), so reads skip the chunk
    SHA-256 — decompression and the length check stay. `verify` and `iter_chunks` always check.
    """

    def __init__(
        self,
        source: RangeSource,
        expected_index_digest: str | None = None,
        cache_chunks: int = 8,
        *,
        verified: Callable[[], bool] | None = None,
    ) -> None:
        self.source = source
        self.name = source.name
        self._blob_size = source.size()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_max = cache_chunks
        # `verified()` is True while every byte `source` returns has already been checked against the
        # blob's digest and cannot change any more (p2p.cache.CachedBlob.sealed says when that holds).
        # Reads then skip the per-chunk SHA-256; the chunk's length is still checked after decompression.
        # Whoever passes it vouches for that: the reader cannot tell.
        self._verified = verified
        self._load_tail(expected_index_digest)

    # -- opening ---------------------------------------------------------------------------------

    def _short_read(self, offset: int, length: int, got: int, what: str) -> TruncatedBlobError:
        return TruncatedBlobError(
            self.name, offset, what, f"{length} bytes", f"{got} bytes (blob ends early)"
        )

    def _read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = self.source.read(offset, length)
        if len(data) != length:
            raise self._short_read(offset, length, len(data), what)
        return data

    def _parse_trailer(self, raw: bytes, at: int) -> _Trailer:
        magic, major, minor, flags, index_offset, index_length, index_digest = TRAILER.unpack_from(raw)
        if magic != TRAILER_MAGIC:
            raise CorruptBlobError(
                self.name,
                at,
                "trailer",
                f"magic {TRAILER_MAGIC!r}",
                f"{magic!r}",
                "this is not a damselfly chunk container, or it is truncated; fetch it again",
            )
        (crc,) = CRC.unpack_from(raw, TRAILER.size)
        if crc != _crc32(raw[: TRAILER.size]):
            hint = f" (or format version {major}.{minor}, which this reader does not know)"
            raise CorruptBlobError(
                self.name,
                at,
                "trailer" + (hint if major not in READABLE_MAJORS else ""),
                f"CRC32 {_crc32(raw[: TRAILER.size]):08x}",
                f"{crc:08x}",
            )
        if major not in READABLE_MAJORS:
            raise UnsupportedFormatError(
                f"{self.name}: chunk container format {major}.{minor} at offset {at}; this damselfly "
                f"reads major version(s) {READABLE_MAJORS}; upgrade damselfly"
            )
        if flags:
            raise UnsupportedFormatError(
                f"{self.name}: trailer at offset {at} requires features {flags:#x} this reader does not "
                "know; upgrade damselfly"
            )
        if index_offset < HEADER_SIZE or index_offset + index_length + TRAILER_SIZE != self._blob_size:
            raise CorruptBlobError(
                self.name,
                at,
                "trailer index location",
                f"index within {HEADER_SIZE}..{self._blob_size - TRAILER_SIZE}",
                f"offset {index_offset} length {index_length}",
            )
        if not INDEX_HEADER.size <= index_length <= MAX_INDEX_SIZE:
            raise CorruptBlobError(
                self.name,
                at,
                "trailer index length",
                f"{INDEX_HEADER.size}..{MAX_INDEX_SIZE} bytes",
                f"{index_length} bytes",
            )
        return _Trailer(index_offset, index_length, index_digest, minor)

    def _load_tail(self, expected_index_digest: str | None) -> None:
        size = self._blob_size
        if size < HEADER_SIZE + TRAILER_SIZE + INDEX_HEADER.size:
            raise TruncatedBlobError(
                self.name,
                size,
                "blob",
                f"at least {HEADER_SIZE + TRAILER_SIZE + INDEX_HEADER.size} bytes",
                f"{size} bytes",
            )
        if size > MAX_BLOB_SIZE:
            raise CorruptBlobError(
                self.name, 0, "blob size", f"at most {MAX_BLOB_SIZE} bytes", f"{size} bytes"
            )
        tail_len = min(size, TAIL_READ)
        tail = self._read_exact(size - tail_len, tail_len, "tail")
        t_at = size - TRAILER_SIZE
        t = self._parse_trailer(tail[-TRAILER_SIZE:], t_at)
        if expected_index_digest is not None:
            want = parse_digest(expected_index_digest)
            if want != t.index_digest:
                raise CorruptBlobError(
                    self.name,
                    t_at,
                    "index digest (the manifest's annotation disagrees with the blob's trailer)",
                    expected_index_digest,
                    format_digest(t.index_digest),
                    "the blob is damaged or is not the layer the manifest names; fetch it again",
                )
        index = self._read_index(tail, t)
        got = hashlib.sha256(index).digest()
        if got != t.index_digest:
            raise CorruptBlobError(
                self.name, t.index_offset, "index", format_digest(t.index_digest), format_digest(got)
            )
        self._parse_index(index, t)
        self._tail = index + tail[-TRAILER_SIZE:]  # verified: index by digest, trailer by CRC
        self.index_digest = format_digest(t.index_digest)
        self.index_offset = t.index_offset
        #: Where the index metadata starts in the blob (for messages about it).
        self.metadata_offset = t.index_offset + t.index_length - len(self.metadata)
        self.format_minor = t.minor

    def _read_index(self, tail: bytes, t: _Trailer) -> bytes:
        """The index bytes (not yet verified), its header checked against the trailer first.

        The trailer's length is bounded (MAX_INDEX_SIZE), but a reader still reads no index byte past
        the tail before the index header agrees with it: one small read, then the rest. An index that
        lies inside the tail (most blobs) costs no read at all.
        """
        tail_start = self._blob_size - len(tail)
        in_tail = tail[max(t.index_offset - tail_start, 0) : len(tail) - TRAILER_SIZE]
        if t.index_offset >= tail_start:
            self._check_index_header(in_tail, t)
            return in_tail
        first = self._read_exact(t.index_offset, min(TAIL_READ, tail_start - t.index_offset), "index")
        # `first` stops at the tail, so a header that straddles it ends in `in_tail`.
        self._check_index_header(first[: INDEX_HEADER.size] + in_tail[: INDEX_HEADER.size], t)
        rest_at = t.index_offset + len(first)
        rest = self._read_exact(rest_at, tail_start - rest_at, "index") if rest_at < tail_start else b""
        return b"".join((first, rest, in_tail))

    def _check_index_header(self, head: bytes, t: _Trailer) -> None:
        """Check the index header's geometry against the trailer's index length (docs/format.md §1.5).

        Run before the index is read and verified: its fields say how long the index must be, and the
        trailer's length was bounded, so this also bounds the chunk count and the metadata length."""
        at = t.index_offset
        magic, usize, n, _codec, shift, _level, meta_len = INDEX_HEADER.unpack_from(head)
        if magic != INDEX_MAGIC:
            raise CorruptBlobError(self.name, at, "index header", f"magic {INDEX_MAGIC!r}", repr(magic))
        if not MIN_CHUNK_SHIFT <= shift <= MAX_CHUNK_SHIFT:
            raise CorruptBlobError(self.name, at, "index chunk shift", "12..20", shift)
        cs = 1 << shift
        if n != (usize + cs - 1) // cs:
            raise CorruptBlobError(self.name, at, "index chunk count", (usize + cs - 1) // cs, n)
        want_len = INDEX_HEADER.size + INDEX_ENTRY_SIZE * n + meta_len
        if want_len != t.index_length:
            raise CorruptBlobError(
                self.name,
                at,
                f"index length (header: {n} chunks, {meta_len} bytes of metadata)",
                f"{want_len} bytes",
                f"{t.index_length} bytes (the trailer's)",
            )

    def _parse_index(self, index: bytes, t: _Trailer) -> None:
        # The index is covered by a digest the caller trusts, so a mismatch below is a writer bug or a
        # hostile writer, not bit rot; still it is rejected with a precise message, never trusted. Its
        # header's geometry was checked by `_check_index_header` before it was read.
        at = t.index_offset
        _magic, usize, n, codec_id, shift, level, _meta_len = INDEX_HEADER.unpack_from(index)
        try:
            cid = CodecId(codec_id)
        except ValueError:
            raise UnsupportedFormatError(
                f"{self.name}: unknown codec id {codec_id} in the index at offset {at}; upgrade damselfly"
            ) from None
        # The level only matters to compressors; a reader keeps it for `info` and never rejects it.
        self.codec = get_codec(cid)
        self.level: int = level
        cs = 1 << shift
        p = INDEX_HEADER.size
        lengths = array("I")
        lengths.frombytes(index[p : p + 4 * n])
        if not _LITTLE:
            lengths.byteswap()
        p += 4 * n
        kinds = index[p : p + n]
        p += n
        self._digests = index[p : p + 32 * n]
        p += 32 * n
        self.metadata = index[p:]
        if any(k not in _KINDS for k in set(kinds)):
            raise CorruptBlobError(self.name, at, "index chunk kinds", "0, 1 or 2", sorted(set(kinds)))
        # A stored chunk is never longer than a chunk (one that does not compress is stored raw), so
        # no read of one chunk is larger than the chunk size, whatever the index says.
        if n and max(lengths) > cs:
            raise CorruptBlobError(self.name, at, "index chunk lengths", f"at most {cs}", max(lengths))
        offsets = array("Q", itertools.accumulate(lengths, initial=HEADER_SIZE))
        if offsets[-1] != t.index_offset:
            raise CorruptBlobError(
                self.name, at, "index (sum of chunk lengths)", t.index_offset - HEADER_SIZE, offsets[-1]
            )
        for i in range(n):
            k = kinds[i]
            if (k == KIND_ZERO) != (lengths[i] == 0):
                raise CorruptBlobError(self.name, at, f"index entry of chunk {i}", "length 0 iff zero kind")
        self._lengths = lengths
        self._kinds = kinds
        self._decompress = self.codec.decompress
        self._offsets = offsets
        self.chunk_shift: int = shift
        self.chunk_size: int = cs
        self.size: int = usize
        self.chunk_count: int = n

    # -- facts -----------------------------------------------------------------------------------

    @property
    def blob_size(self) -> int:
        return self._blob_size

    def info(self) -> BlobInfo:
        zero = self._kinds.count(KIND_ZERO)
        return BlobInfo(
            codec=self.codec.name,
            level=self.level,
            chunk_size=self.chunk_size,
            uncompressed_size=self.size,
            chunk_count=self.chunk_count,
            stored_chunks=self.chunk_count - zero,
            raw_chunks=self._kinds.count(KIND_RAW),
            zero_chunks=zero,
            blob_size=self._blob_size,
            index_digest=self.index_digest,
            metadata_size=len(self.metadata),
        )

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(blob offset, stored length) of chunk i."""
        return self._offsets[i], self._lengths[i]

    def stored_range(self, first: int, last: int) -> tuple[int, int]:
        """(blob offset, length) of the stored bytes of chunks first..last inclusive."""
        start = self._offsets[first]
        return start, self._offsets[last + 1] - start

    def chunk_len(self, i: int) -> int:
        """Uncompressed length of chunk i (the last one may be short)."""
        return min(self.chunk_size, self.size - (i << self.chunk_shift))

    # -- reading ---------------------------------------------------------------------------------

    def decode_chunk(self, i: int, stored: bytes | memoryview, at: int | None = None) -> bytes:
        """Verify and decompress chunk i from its stored bytes; raise CorruptBlobError if they are wrong."""
        return self._decode(i, stored, at, True)

    def _decode(self, i: int, stored: bytes | memoryview, at: int | None, check: bool) -> bytes:
        """Decompress chunk i; `check` says whether its SHA-256 must be checked first (it must, unless
        the source's bytes were verified already: `_check_needed`)."""
        ulen = self.chunk_len(i)
        kind = self._kinds[i]
        if kind == KIND_ZERO:
            return _ZEROS[:ulen]
        where = self._offsets[i] if at is None else at
        if check:
            got = hashlib.sha256(stored).digest()
            want = self._digests[32 * i : 32 * i + 32]
            if got != want:
                raise CorruptBlobError(
                    self.name, where, f"chunk {i}", format_digest(want), format_digest(got)
                )
        if kind == KIND_RAW:
            data = stored if isinstance(stored, bytes) else bytes(stored)
        else:
            try:
                data = self._decompress(stored, ulen)
            except CodecError as e:
                raise CorruptBlobError(self.name, where, f"chunk {i} ({e})") from None
        if len(data) != ulen:
            raise CorruptBlobError(self.name, where, f"chunk {i} length", ulen, len(data))
        return data

    def _check_needed(self) -> bool:
        return self._verified is None or not self._verified()

    def _fetch_chunks(self, first: int, last: int, check: bool = True) -> Iterator[tuple[int, bytes]]:
        """Yield (i, data) for chunks first..last, reading neighbouring stored chunks together."""
        i = first
        while i <= last:
            j = i
            start = self._offsets[i]
            while j < last and self._offsets[j + 2] - start <= MAX_COALESCED_READ:
                j += 1
            length = self._offsets[j + 1] - start
            blob = self._read_exact(start, length, f"chunks {i}..{j}") if length else b""
            mv = memoryview(blob)
            for k in range(i, j + 1):
                off = self._offsets[k] - start
                yield k, self._decode(k, mv[off : off + self._lengths[k]], None, check)
            i = j + 1

    def read(self, offset: int, length: int) -> bytes:
        """Uncompressed bytes [offset, offset+length), short only at the end of the data."""
        return join_parts(self.read_parts(offset, length))

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """The bytes of `read` as pieces that share memory with the decoded chunks (no copy).

        Every piece comes from a chunk checked like `read`'s; the pieces are read-only."""
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"negative range {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        shift = self.chunk_shift
        first, last = offset >> shift, (end - 1) >> shift
        check = self._check_needed()
        if first == last:
            # The common case (a small read): one chunk, no generator.
            data = self._cache_get(first)
            if data is None:
                start, n = self._offsets[first], self._lengths[first]
                stored = self.source.read(start, n) if n else b""
                if len(stored) != n:
                    raise self._short_read(start, n, len(stored), f"chunk {first}")
                data = self._decode(first, stored, None, check)
                self._cache_put(first, data)
            return [_cut(data, offset - (first << shift), end - (first << shift))]
        # Chunks already in the cache split the request; the rest is fetched in coalesced runs.
        got = self._cache_get_run(first, last)
        i = first
        while i <= last:
            if got[i - first] is not None:
                i += 1
                continue
            j = i
            while j < last and got[j + 1 - first] is None:
                j += 1
            for k, data in self._fetch_chunks(i, j, check):
                got[k - first] = data
                # A long read's inner chunks are not read again soon; its edges are (by the reads
                # around it), so only those take room in the small cache.
                if k in (first, last):
                    self._cache_put(k, data)
            i = j + 1
        chunks = cast(list[bytes], got)
        base = first << shift
        parts: list[Part] = [_cut(chunks[0], offset - base, 1 << shift)]
        parts += chunks[1:-1]
        parts.append(_cut(chunks[-1], 0, end - (last << shift)))
        return parts

    # The decoded-chunk cache is shared by every thread reading through this reader (the device
    # daemon's read pool), so each access holds the lock; decoding happens outside it.

    def _cache_get(self, i: int) -> bytes | None:
        if not self._cache_max:
            return None
        with self._cache_lock:
            data = self._cache.get(i)
            if data is not None:
                self._cache.move_to_end(i)
            return data

    def _cache_get_run(self, first: int, last: int) -> list[bytes | None]:
        """The cached chunks of first..last (None where not cached), under one lock."""
        if not self._cache_max:
            return [None] * (last - first + 1)
        with self._cache_lock:
            got = [self._cache.get(i) for i in range(first, last + 1)]
            for i, data in enumerate(got, first):
                if data is not None:
                    self._cache.move_to_end(i)
        return got

    def _cache_put(self, i: int, data: bytes) -> None:
        if not self._cache_max:
            return
        with self._cache_lock:
            self._cache[i] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)

    def iter_chunks(self) -> Iterator[tuple[int, bytes]]:
        """Every chunk in order, verified (used by verify and cat of whole blobs)."""
        if self.chunk_count:
            yield from self._fetch_chunks(0, self.chunk_count - 1)

    def check_header(self, raw: bytes) -> None:
        """Check the 32 header bytes: magic, CRC32, and agreement with the index."""
        if len(raw) != HEADER_SIZE:
            raise self._short_read(0, HEADER_SIZE, len(raw), "header")
        magic, _major, _minor, codec_id, shift = HEADER.unpack_from(raw)
        if magic != HEADER_MAGIC:
            raise CorruptBlobError(self.name, 0, "header", f"magic {HEADER_MAGIC!r}", repr(magic))
        (crc,) = CRC.unpack_from(raw, HEADER.size)
        if crc != _crc32(raw[: HEADER.size]):
            raise CorruptBlobError(
                self.name, 0, "header", f"CRC32 {_crc32(raw[: HEADER.size]):08x}", f"{crc:08x}"
            )
        if (codec_id, shift) != (self.codec.id, self.chunk_shift):
            raise CorruptBlobError(
                self.name,
                0,
                "header (disagrees with the index)",
                f"codec {int(self.codec.id)} shift {self.chunk_shift}",
                f"codec {codec_id} shift {shift}",
            )

    def check_stored(self, i: int, stored: bytes | memoryview) -> None:
        """Check chunk i's stored bytes against its SHA-256 without decompressing them."""
        if len(stored) != self._lengths[i]:
            raise self._short_read(self._offsets[i], self._lengths[i], len(stored), f"chunk {i}")
        if self._kinds[i] == KIND_ZERO:
            return
        got = hashlib.sha256(stored).digest()
        want = self._digests[32 * i : 32 * i + 32]
        if got != want:
            raise CorruptBlobError(
                self.name, self._offsets[i], f"chunk {i}", format_digest(want), format_digest(got)
            )

    def check_tail(self, offset: int, data: bytes | memoryview) -> None:
        """Check bytes of the index/trailer region against the ones verified when the blob was opened."""
        rel = offset - self.index_offset
        if rel < 0 or rel + len(data) > len(self._tail):
            raise InvalidArgumentError(f"{offset}+{len(data)} is not inside the index and trailer")
        if self._tail[rel : rel + len(data)] != data:
            raise CorruptBlobError(self.name, offset, "index or trailer bytes (not the verified ones)")

    def chunk_at(self, blob_offset: int) -> int:
        """The chunk whose stored bytes hold `blob_offset` (which must be in the chunk area)."""
        if not HEADER_SIZE <= blob_offset < self.index_offset:
            raise InvalidArgumentError(f"blob offset {blob_offset} is not in the chunk area")
        return bisect_right(self._offsets, blob_offset) - 1

    def verify(self) -> BlobInfo:
        """Check header, every chunk and the index; raise the first problem found."""
        self.check_header(self._read_exact(0, HEADER_SIZE, "header"))
        for _ in self.iter_chunks():
            pass
        return self.info()
