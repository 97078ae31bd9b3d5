"""The chunk container ("zfile"): a seekable, compressed, digest-verified blob — and reading it.

Layout: `chunklayout` (normative spec: docs/format.md, "Chunk container").

The container's code is in four modules: `chunklayout` (the records, versions and bounds),
`chunkwriter` (`ChunkWriter`, `pack_file`), `chunkindex` (`ChunkIndex`: the trailer and index, parsed
and verified once per blob, and where every byte belongs) and this one, `ChunkReader`: random reads of
the data. The names callers use are importable from here.

A reader needs only the trailer (one ranged read of the tail, which usually also covers the index) and
then the exact byte ranges of the chunks it wants; a run of neighbouring chunks is one read. Every chunk
is checked against its SHA-256 before it is decompressed, the index against the trailer's SHA-256, and
that against the digest the image manifest carries (``expected_index_digest``), so no byte is returned
that the manifest does not vouch for.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TypedDict, Unpack, cast

from .chunkindex import ChunkIndex, read_exact, short_read
from .chunklayout import (
    CRC,
    DEFAULT_CHUNK_SIZE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER,
    HEADER_SIZE,
    INDEX_HEADER,
    KIND_COMPRESSED,
    KIND_RAW,
    KIND_ZERO,
    MAX_BLOB_SIZE,
    MAX_CHUNK_SHIFT,
    MAX_CHUNKS,
    MAX_INDEX_SIZE,
    MIN_CHUNK_SHIFT,
    READABLE_MAJORS,
    TAIL_READ,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    ZERO_CHUNK,
    BlobInfo,
    check_chunk_size,
)
from .chunkwriter import ChunkWriter, pack_file
from .codecs import Codec, CodecError
from .digest import Digest, sha256_digest
from .errors import CorruptBlobError, InvalidArgumentError
from .source import RangeSource

__all__ = [
    "CRC",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "HEADER",
    "HEADER_SIZE",
    "INDEX_HEADER",
    "KIND_COMPRESSED",
    "KIND_RAW",
    "KIND_ZERO",
    "MAX_BLOB_SIZE",
    "MAX_CHUNKS",
    "MAX_CHUNK_SHIFT",
    "MAX_COALESCED_READ",
    "MAX_INDEX_SIZE",
    "MIN_CHUNK_SHIFT",
    "READABLE_MAJORS",
    "TAIL_READ",
    "TRAILER",
    "TRAILER_MAGIC",
    "TRAILER_SIZE",
    "BlobInfo",
    "ChunkIndex",
    "ChunkReader",
    "ChunkWriter",
    "Part",
    "check_chunk_size",
    "join_parts",
    "pack_file",
]

#: Upper bound on one coalesced read, so a large request does not buffer unbounded memory.
MAX_COALESCED_READ = 8 * 1024 * 1024

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


class ReaderOptions(TypedDict, total=False):
    """How a `ChunkReader` (and a `LayerReader`, which passes them on) reads its blob."""

    cache_chunks: int  # decoded chunks kept (LRU); default 8
    verified: Callable[[], bool] | None  # True while the source's bytes are all verified already
    index: ChunkIndex | None  # the blob's geometry, parsed and verified once elsewhere


class ChunkReader:
    """Random access to a chunk container over a range source.

    Opening reads the tail once (trailer + index, verified: `ChunkIndex.load`) — unless the caller
    passes the blob's `index`, already loaded and verified (the node cache keeps one per blob); then it
    reads nothing. ``read(offset, length)`` then fetches only the stored ranges of the chunks it needs
    — a run of neighbouring chunks in one source read — verifies each chunk's SHA-256, decompresses it
    and checks its size. A small LRU of decompressed chunks serves small sequential reads without
    decompressing a chunk twice. ``read_parts`` returns the same bytes as pieces of the decoded chunks,
    without copying them (the device daemon writes its replies from them).

    ``verified``, if given, is asked before each read: True means the source's bytes were all checked
    against the blob's digest already and cannot change (a sealed cache blob), so reads skip the chunk
    SHA-256 — decompression and the length check stay. `verify` and `iter_chunks` always check.
    """

    def __init__(
        self, source: RangeSource, expected_index_digest: str | None = None, **options: Unpack[ReaderOptions]
    ) -> None:
        cache_chunks = options.get("cache_chunks", 8)
        verified = options.get("verified")
        index = options.get("index")
        self.source = source
        self.name = source.name
        if index is None:
            index = ChunkIndex.load(source, expected_index_digest)
        else:
            if index.blob_size != source.size():
                raise InvalidArgumentError(
                    f"{source.name}: the index given is of a blob of {index.blob_size} bytes, "
                    f"not {source.size()}"
                )
            index.check_index_digest(expected_index_digest)
        self.index = index
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_max = cache_chunks
        # `verified()` is True while every byte `source` returns has already been checked against the
        # blob's digest and cannot change any more (p2p.cachedblob.CachedBlob.sealed says when that
        # holds). Reads then skip the per-chunk SHA-256; the chunk's length is still checked after
        # decompression. Whoever passes it vouches for that: the reader cannot tell.
        self._verified = verified
        # The facts of the index, and its tables, as attributes of the reader: the read path uses them
        # on every call.
        self.codec: Codec = index.codec
        self.level: int = index.level
        self.size: int = index.size
        self.chunk_size: int = index.chunk_size
        self.chunk_shift: int = index.chunk_shift
        self.chunk_count: int = index.chunk_count
        self.metadata: bytes = index.metadata
        self.metadata_offset: int = index.metadata_offset
        self.index_digest: Digest = index.index_digest
        self.index_offset: int = index.index_offset
        self.format_minor: int = index.format_minor
        self._offsets = index.offsets
        self._lengths = index.lengths
        self._kinds = index.kinds
        self._digests = index.digests
        self._decompress = index.codec.decompress

    # -- facts (the index's) ---------------------------------------------------------------------

    @property
    def blob_size(self) -> int:
        return self.index.blob_size

    def info(self) -> BlobInfo:
        return self.index.info()

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(blob offset, stored length) of chunk i."""
        return self.index.chunk_range(i)

    def stored_range(self, first: int, last: int) -> tuple[int, int]:
        """(blob offset, length) of the stored bytes of chunks first..last inclusive."""
        return self.index.stored_range(first, last)

    def chunk_len(self, i: int) -> int:
        """Uncompressed length of chunk i (the last one may be short)."""
        return self.index.chunk_len(i)

    def chunk_at(self, blob_offset: int) -> int:
        """The chunk whose stored bytes hold `blob_offset` (which must be in the chunk area)."""
        return self.index.chunk_at(blob_offset)

    def check_header(self, raw: bytes) -> None:
        """Check the 32 header bytes: magic, CRC32, and agreement with the index."""
        self.index.check_header(raw)

    def check_stored(self, i: int, stored: bytes | memoryview) -> None:
        """Check chunk i's stored bytes against its SHA-256 without decompressing them."""
        self.index.check_stored(i, stored)

    def check_tail(self, offset: int, data: bytes | memoryview) -> None:
        """Check bytes of the index/trailer region against the ones verified when the blob was opened."""
        self.index.check_tail(offset, data)

    # -- reading ---------------------------------------------------------------------------------

    def decode_chunk(self, i: int, stored: bytes | memoryview, at: int | None = None) -> bytes:
        """Verify and decompress chunk i from its stored bytes; raise CorruptBlobError if they are wrong."""
        return self._decode(i, stored, at, True)

    def _decode(self, i: int, stored: bytes | memoryview, at: int | None, check: bool) -> bytes:
        """Decompress chunk i; `check` says whether its SHA-256 must be checked first (it must, unless
        the source's bytes were verified already: `_check_needed`)."""
        ulen = min(self.chunk_size, self.size - (i << self.chunk_shift))
        kind = self._kinds[i]
        if kind == KIND_ZERO:
            return ZERO_CHUNK[:ulen]
        where = self._offsets[i] if at is None else at
        if check:
            got = hashlib.sha256(stored).digest()
            want = self._digests[32 * i : 32 * i + 32]
            if got != want:
                raise CorruptBlobError(
                    self.name, where, f"chunk {i}", sha256_digest(want), sha256_digest(got)
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
            blob = read_exact(self.source, start, length, f"chunks {i}..{j}") if length else b""
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
                    raise short_read(self.name, start, n, len(stored), f"chunk {first}")
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

    def verify(self) -> BlobInfo:
        """Check header, every chunk and the index; raise the first problem found."""
        self.check_header(read_exact(self.source, 0, HEADER_SIZE, "header"))
        for _ in self.iter_chunks():
            pass
        return self.info()
