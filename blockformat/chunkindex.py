"""The verified geometry of a chunk container: its trailer and index, and where every byte belongs.

Layout (`chunklayout`; normative spec: docs/format.md §1.3-§1.5)::

    offset 32           chunk i at  32 + sum(stored length j, j < i), stored length from the index
    index_offset        index       40 B header | N x u32 length | N x u8 kind | N x SHA-256 | metadata
    size - 72           trailer     magic, version, flags, index offset/length, SHA-256 of the index, CRC32

`ChunkIndex.load` reads the tail of a blob (one ranged read of `TAIL_READ` bytes, one more if the index
is longer) and checks it in the order of docs/format.md §1.5 — sizes, trailer, the index digest the
manifest vouches for, the index header's geometry before the rest is read, the index's SHA-256, then
its entries. What it returns is immutable and knows, for any blob offset, which structure holds it.

One parse per blob: the `ChunkReader` that decodes chunks, the `LayerReader` above it and the node
cache (``p2p``) that stores fetched ranges all share one `ChunkIndex`. The cache uses two pieces of
format knowledge kept here: `verified_span` checks every whole structure in a fetched range and says
which bytes are now vouched for, and `expand` widens a range to whole structures so that all of it can
be checked.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from bisect import bisect_right
from dataclasses import dataclass

from . import chunklayout as layout
from .chunklayout import (
    CRC,
    HEADER,
    HEADER_MAGIC,
    HEADER_SIZE,
    INDEX_ENTRY_SIZE,
    INDEX_HEADER,
    INDEX_MAGIC,
    KIND_RAW,
    KIND_ZERO,
    KINDS,
    LITTLE_ENDIAN,
    MAX_CHUNK_SHIFT,
    MAX_INDEX_SIZE,
    MIN_CHUNK_SHIFT,
    READABLE_MAJORS,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    BlobInfo,
    crc32,
)
from .codecs import Codec, CodecId, get_codec
from .digest import SHA256_ONLY, Digest, digest_bytes, parse_digest, sha256_digest
from .errors import CorruptBlobError, InvalidArgumentError, TruncatedBlobError, UnsupportedFormatError
from .source import RangeSource


@dataclass(frozen=True)
class Trailer:
    """The trailer's fields, checked (`parse_trailer`)."""

    index_offset: int
    index_length: int
    index_digest: bytes
    minor: int


def short_read(name: str, offset: int, length: int, got: int, what: str) -> TruncatedBlobError:
    return TruncatedBlobError(name, offset, what, f"{length} bytes", f"{got} bytes (blob ends early)")


def read_exact(source: RangeSource, offset: int, length: int, what: str) -> bytes:
    """`length` bytes at `offset`, or `TruncatedBlobError`."""
    data = source.read(offset, length)
    if len(data) != length:
        raise short_read(source.name, offset, length, len(data), what)
    return data


def parse_trailer(raw: bytes, at: int, blob_size: int, name: str) -> Trailer:
    """Check the 72 trailer bytes (docs/format.md §1.5 step 3): magic, CRC, version, flags, location."""
    magic, major, minor, flags, index_offset, index_length, index_digest = TRAILER.unpack_from(raw)
    if magic != TRAILER_MAGIC:
        raise CorruptBlobError(
            name,
            at,
            "trailer",
            f"magic {TRAILER_MAGIC!r}",
            f"{magic!r}",
            "this is not a damselfly chunk container, or it is truncated; fetch it again",
        )
    (crc,) = CRC.unpack_from(raw, TRAILER.size)
    if crc != crc32(raw[: TRAILER.size]):
        hint = f" (or format version {major}.{minor}, which this reader does not know)"
        raise CorruptBlobError(
            name,
            at,
            "trailer" + (hint if major not in READABLE_MAJORS else ""),
            f"CRC32 {crc32(raw[: TRAILER.size]):08x}",
            f"{crc:08x}",
        )
    if major not in READABLE_MAJORS:
        raise UnsupportedFormatError(
            f"{name}: chunk container format {major}.{minor} at offset {at}; this damselfly "
            f"reads major version(s) {READABLE_MAJORS}; upgrade damselfly"
        )
    if flags:
        raise UnsupportedFormatError(
            f"{name}: trailer at offset {at} requires features {flags:#x} this reader does not "
            "know; upgrade damselfly"
        )
    if index_offset < HEADER_SIZE or index_offset + index_length + TRAILER_SIZE != blob_size:
        raise CorruptBlobError(
            name,
            at,
            "trailer index location",
            f"index within {HEADER_SIZE}..{blob_size - TRAILER_SIZE}",
            f"offset {index_offset} length {index_length}",
        )
    if not INDEX_HEADER.size <= index_length <= MAX_INDEX_SIZE:
        raise CorruptBlobError(
            name,
            at,
            "trailer index length",
            f"{INDEX_HEADER.size}..{MAX_INDEX_SIZE} bytes",
            f"{index_length} bytes",
        )
    return Trailer(index_offset, index_length, index_digest, minor)


def check_index_header(head: bytes, t: Trailer, name: str) -> None:
    """Check the index header's geometry against the trailer's index length (docs/format.md §1.5 step 5).

    Run before the index is read and verified: its fields say how long the index must be, and the
    trailer's length was bounded, so this also bounds the chunk count and the metadata length."""
    at = t.index_offset
    magic, usize, n, _codec, shift, _level, meta_len = INDEX_HEADER.unpack_from(head)
    if magic != INDEX_MAGIC:
        raise CorruptBlobError(name, at, "index header", f"magic {INDEX_MAGIC!r}", repr(magic))
    if not MIN_CHUNK_SHIFT <= shift <= MAX_CHUNK_SHIFT:
        raise CorruptBlobError(name, at, "index chunk shift", "12..20", shift)
    cs = 1 << shift
    if n != (usize + cs - 1) // cs:
        raise CorruptBlobError(name, at, "index chunk count", (usize + cs - 1) // cs, n)
    want_len = INDEX_HEADER.size + INDEX_ENTRY_SIZE * n + meta_len
    if want_len != t.index_length:
        raise CorruptBlobError(
            name,
            at,
            f"index length (header: {n} chunks, {meta_len} bytes of metadata)",
            f"{want_len} bytes",
            f"{t.index_length} bytes (the trailer's)",
        )


def _read_index(source: RangeSource, tail: bytes, t: Trailer, blob_size: int) -> bytes:
    """The index bytes (not yet verified), its header checked against the trailer first."""
    tail_start = blob_size - len(tail)
    in_tail = tail[max(0, t.index_offset - tail_start) : -TRAILER_SIZE]
    if t.index_offset >= tail_start:
        check_index_header(in_tail, t, source.name)
        return in_tail
    first = read_exact(source, t.index_offset, min(layout.TAIL_READ, tail_start - t.index_offset), "index")
    # `first` stops at the tail, so a header that straddles it ends in `in_tail`.
    check_index_header(first[: INDEX_HEADER.size] + in_tail[: INDEX_HEADER.size], t, source.name)
    rest_at = t.index_offset + len(first)
    rest = read_exact(source, rest_at, tail_start - rest_at, "index") if rest_at < tail_start else b""
    return b"".join((first, rest, in_tail))


class ChunkIndex:
    """A blob's trailer and index, verified: chunk lookup, stored ranges and the checks of its bytes.

    Build one with `load`. Attributes (read-only): `size` (uncompressed data bytes), `chunk_size`,
    `chunk_shift`, `chunk_count`, `codec`, `level`, `metadata` (with `metadata_offset`, where it starts
    in the blob), `index_digest`, `index_offset`, `blob_size`, `format_minor`; per chunk `offsets`
    (N + 1 entries: the last is `index_offset`), `lengths`, `kinds` and `digests` (32 bytes each).
    """

    def __init__(
        self, name: str, blob_size: int, trailer: Trailer, index: bytes, trailer_bytes: bytes
    ) -> None:
        """Parse `index` (its digest already checked against `trailer`); use `load` to open a blob."""
        self.name = name
        self.blob_size = blob_size
        self.index_offset = trailer.index_offset
        self.index_digest: Digest = sha256_digest(trailer.index_digest)
        self.format_minor = trailer.minor
        self._parse(index, trailer)
        self._tail = index + trailer_bytes  # verified: index by digest, trailer by CRC
        #: Where the index metadata starts in the blob (for messages about it).
        self.metadata_offset = trailer.index_offset + trailer.index_length - len(self.metadata)

    @classmethod
    def load(cls, source: RangeSource, expected_index_digest: str | None = None) -> ChunkIndex:
        """Read and verify the tail of the blob `source` holds (docs/format.md §1.5, steps 1-7).

        `expected_index_digest` comes from a place the caller trusts (the manifest annotation); the
        trailer must carry it."""
        name = source.name
        size = source.size()
        least = HEADER_SIZE + TRAILER_SIZE + INDEX_HEADER.size
        if size < least:
            raise TruncatedBlobError(name, size, "blob", f"at least {least} bytes", f"{size} bytes")
        if size > layout.MAX_BLOB_SIZE:
            raise CorruptBlobError(
                name, 0, "blob size", f"at most {layout.MAX_BLOB_SIZE} bytes", f"{size} bytes"
            )
        want = None if expected_index_digest is None else parse_digest(expected_index_digest, SHA256_ONLY)
        tail_len = min(size, layout.TAIL_READ)
        tail = read_exact(source, size - tail_len, tail_len, "tail")
        t_at = size - TRAILER_SIZE
        t = parse_trailer(tail[-TRAILER_SIZE:], t_at, size, name)
        if want is not None and digest_bytes(want) != t.index_digest:
            raise _wrong_index_digest(name, t_at, want, sha256_digest(t.index_digest))
        index = _read_index(source, tail, t, size)
        got = hashlib.sha256(index).digest()
        if got != t.index_digest:
            raise CorruptBlobError(
                name, t.index_offset, "index", sha256_digest(t.index_digest), sha256_digest(got)
            )
        return cls(name, size, t, index, tail[-TRAILER_SIZE:])

    def check_index_digest(self, expected_index_digest: str | None) -> None:
        """Raise `CorruptBlobError` unless this index has the digest the caller trusts (if it has one)."""
        if expected_index_digest is not None and expected_index_digest != self.index_digest:
            want = parse_digest(expected_index_digest, SHA256_ONLY)  # a malformed one is the caller's error
            raise _wrong_index_digest(self.name, self.blob_size - TRAILER_SIZE, want, self.index_digest)

    def _parse(self, index: bytes, t: Trailer) -> None:
        # The index is covered by a digest the caller trusts, so a mismatch below is a writer bug or a
        # hostile writer, not bit rot; still it is rejected with a precise message, never trusted. Its
        # header's geometry was checked by `check_index_header` before it was read.
        at = t.index_offset
        _magic, usize, n, codec_id, shift, level, _meta_len = INDEX_HEADER.unpack_from(index)
        try:
            cid = CodecId(codec_id)
        except ValueError:
            raise UnsupportedFormatError(
                f"{self.name}: unknown codec id {codec_id} in the index at offset {at}; upgrade damselfly"
            ) from None
        # The level only matters to compressors; a reader keeps it for `info` and never rejects it.
        self.codec: Codec = get_codec(cid)
        self.level: int = level
        cs = 1 << shift
        p = INDEX_HEADER.size
        lengths = array("I")
        lengths.frombytes(index[p : p + 4 * n])
        if not LITTLE_ENDIAN:
            lengths.byteswap()
        p += 4 * n
        kinds = index[p : p + n]
        p += n
        self.digests: bytes = index[p : p + 32 * n]
        p += 32 * n
        self.metadata: bytes = index[p:]
        if any(k not in KINDS for k in set(kinds)):
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
            if (kinds[i] == KIND_ZERO) != (lengths[i] == 0):
                raise CorruptBlobError(self.name, at, f"index entry of chunk {i}", "length 0 iff zero kind")
        self.lengths = lengths
        self.kinds = kinds
        self.offsets = offsets
        self.chunk_shift: int = shift
        self.chunk_size: int = cs
        self.size: int = usize
        self.chunk_count: int = n

    # -- facts -----------------------------------------------------------------------------------

    def info(self) -> BlobInfo:
        zero = self.kinds.count(KIND_ZERO)
        return BlobInfo(
            codec=self.codec.name,
            level=self.level,
            chunk_size=self.chunk_size,
            uncompressed_size=self.size,
            chunk_count=self.chunk_count,
            stored_chunks=self.chunk_count - zero,
            raw_chunks=self.kinds.count(KIND_RAW),
            zero_chunks=zero,
            blob_size=self.blob_size,
            index_digest=self.index_digest,
            metadata_size=len(self.metadata),
        )

    def chunk_range(self, i: int) -> tuple[int, int]:
        """(blob offset, stored length) of chunk i."""
        return self.offsets[i], self.lengths[i]

    def stored_range(self, first: int, last: int) -> tuple[int, int]:
        """(blob offset, length) of the stored bytes of chunks first..last inclusive."""
        start = self.offsets[first]
        return start, self.offsets[last + 1] - start

    def chunk_len(self, i: int) -> int:
        """Uncompressed length of chunk i (the last one may be short)."""
        return min(self.chunk_size, self.size - (i << self.chunk_shift))

    def chunk_at(self, blob_offset: int) -> int:
        """The chunk whose stored bytes hold `blob_offset` (which must be in the chunk area)."""
        if not HEADER_SIZE <= blob_offset < self.index_offset:
            raise InvalidArgumentError(f"blob offset {blob_offset} is not in the chunk area")
        return bisect_right(self.offsets, blob_offset) - 1

    # -- checks of the blob's bytes --------------------------------------------------------------

    def check_header(self, raw: bytes) -> None:
        """Check the 32 header bytes: magic, CRC32, and agreement with the index."""
        if len(raw) != HEADER_SIZE:
            raise short_read(self.name, 0, HEADER_SIZE, len(raw), "header")
        magic, _major, _minor, codec_id, shift = HEADER.unpack_from(raw)
        if magic != HEADER_MAGIC:
            raise CorruptBlobError(self.name, 0, "header", f"magic {HEADER_MAGIC!r}", repr(magic))
        (crc,) = CRC.unpack_from(raw, HEADER.size)
        if crc != crc32(raw[: HEADER.size]):
            raise CorruptBlobError(
                self.name, 0, "header", f"CRC32 {crc32(raw[: HEADER.size]):08x}", f"{crc:08x}"
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
        """Check chunk i's stored bytes against its length and SHA-256 without decompressing them."""
        if len(stored) != self.lengths[i]:
            raise short_read(self.name, self.offsets[i], self.lengths[i], len(stored), f"chunk {i}")
        if self.kinds[i] == KIND_ZERO:
            return
        got = hashlib.sha256(stored).digest()
        want = self.digests[32 * i : 32 * i + 32]
        if got != want:
            raise CorruptBlobError(
                self.name, self.offsets[i], f"chunk {i}", sha256_digest(want), sha256_digest(got)
            )

    def check_tail(self, offset: int, data: bytes | memoryview) -> None:
        """Check bytes of the index/trailer region against the ones verified when the blob was opened."""
        rel = offset - self.index_offset
        if rel < 0 or rel + len(data) > len(self._tail):
            raise InvalidArgumentError(f"{offset}+{len(data)} is not inside the index and trailer")
        if self._tail[rel : rel + len(data)] != data:
            raise CorruptBlobError(self.name, offset, "index or trailer bytes (not the verified ones)")

    # -- ranges of whole structures (the node cache's view) --------------------------------------

    def verified_span(self, a: int, data: bytes | memoryview) -> tuple[int, int]:
        """Check every whole structure in the blob range [a, a+len(data)) that `data` holds; return the
        span [v0, v1) they cover (empty when there is none).

        The header, each chunk and the index/trailer region are checked as above; a chunk cut by
        either end of the range cannot be checked and is left out of the span. Raises
        `CorruptBlobError` for the first structure that fails its check."""
        b = a + len(data)
        idx = self.index_offset
        mv = memoryview(data)
        # Start: the first structure that begins at or after a.
        if a == 0:
            v0 = 0
            if b < HEADER_SIZE:
                return 0, 0
            self.check_header(bytes(mv[:HEADER_SIZE]))
            pos = HEADER_SIZE
        elif a < HEADER_SIZE:
            pos = v0 = HEADER_SIZE
        else:
            pos = v0 = a
        if pos < idx:
            i = self.chunk_at(pos)
            if self.offsets[i] < pos:  # a chunk cut by the start of the range cannot be checked: skip it
                i += 1
                pos = v0 = self.offsets[i] if i < self.chunk_count else idx
            while i < self.chunk_count:
                start, n = self.offsets[i], self.lengths[i]
                if start + n > b:
                    return v0, start
                self.check_stored(i, mv[start - a : start - a + n])
                i += 1
            pos = idx
        if pos >= b:
            return v0, b
        self.check_tail(pos, mv[pos - a :])
        return v0, b

    def expand(self, a: int, b: int) -> tuple[int, int]:
        """Widen the blob range [a, b) to whole structures, so that every byte of it can be verified:
        a start inside the header goes back to 0, one inside a chunk to the chunk's start, an end inside
        a chunk forward to its end (the index and trailer are checked piecewise: no widening there)."""
        idx = self.index_offset
        if a < HEADER_SIZE:
            a = 0
        elif a < idx:
            a = self.offsets[self.chunk_at(a)]
        if HEADER_SIZE < b <= idx:
            i = self.chunk_at(b - 1)
            b = self.offsets[i] + self.lengths[i]
        return a, b


def _wrong_index_digest(name: str, at: int, want: Digest, got: Digest) -> CorruptBlobError:
    return CorruptBlobError(
        name,
        at,
        "index digest (the manifest's annotation disagrees with the blob's trailer)",
        want,
        got,
        "the blob is damaged or is not the layer the manifest names; fetch it again",
    )
