"""The chunk container: round trips, reader I/O pattern, and that no damaged byte is ever returned.

Every blob here is built by code. Crafted (hostile-writer) blobs are made by `forge` helpers that
recompute digests and CRCs, so they exercise the parser rather than the checksums.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import random
import struct
import zlib
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockformat import chunkfile
from blockformat.chunkfile import (
    CRC,
    HEADER,
    HEADER_SIZE,
    INDEX_HEADER,
    TAIL_READ,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    BlobInfo,
    ChunkReader,
    ChunkWriter,
    check_chunk_size,
    format_digest,
    pack_file,
)
from blockformat.errors import (
    BlockFormatError,
    CorruptBlobError,
    InvalidArgumentError,
    TruncatedBlobError,
    UnsupportedFormatError,
)
from blockformat.source import BytesSource
from tests.conftest import SampleBlob, text_bytes

CODECS = ["lz4", "zstd", "snappy", "none"]
CHUNK_SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]

# -- helpers ---------------------------------------------------------------------------------------


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

# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("codec", CODECS)
def test_pack_then_read_returns_the_exact_input(codec: str, chunk_size: int, shape: str) -> None:
    data = shape_data(shape, chunk_size)
    blob, winfo = pack(data, codec, chunk_size, metadata=b"meta")
    r = open_blob(blob, winfo.index_digest, cache_chunks=8)

    assert r.read(0, len(data)) == data
    assert r.read(0, len(data) + 1000) == data
    # Ranges straddling every chunk boundary, and the very end.
    for k in range(1, r.chunk_count):
        b = k * chunk_size
        assert r.read(b - 1, 2) == data[b - 1 : b + 1]
    assert r.read(max(len(data) - 1, 0), 10) == data[-1:]
    assert r.read(len(data), 10) == b""

    n_chunks = -(-len(data) // chunk_size)
    n_zero = sum(1 for k in range(n_chunks) if not any(data[k * chunk_size : (k + 1) * chunk_size]))
    info = r.verify()
    assert info == r.info()
    assert (info.codec, info.chunk_size, info.uncompressed_size) == (codec, chunk_size, len(data))
    assert (info.chunk_count, info.zero_chunks, info.stored_chunks) == (n_chunks, n_zero, n_chunks - n_zero)
    assert (info.blob_size, info.metadata_size) == (len(blob), 4)
    assert info == dataclasses.replace(winfo, blob_digest=None)
    assert winfo.blob_digest == format_digest(hashlib.sha256(blob).digest())
    assert r.metadata == b"meta"


@pytest.mark.parametrize("piece", [1, 1000, 4095, 4096, 4097, 3 * 4096 + 5])
def test_blob_bytes_do_not_depend_on_how_the_data_was_written(sample_blob: SampleBlob, piece: int) -> None:
    blob, _ = pack(sample_blob.data, "lz4", 4096, metadata=sample_blob.metadata, piece=piece)
    assert blob == sample_blob.blob


def test_pack_file_writes_the_same_blob_as_chunk_writer(sample_blob: SampleBlob) -> None:
    out = io.BytesIO()
    info = pack_file(io.BytesIO(sample_blob.data), out, "lz4", 4096, metadata=sample_blob.metadata)
    assert out.getvalue() == sample_blob.blob
    assert info == sample_blob.info


def test_sample_blob_has_every_chunk_kind(sample_blob: SampleBlob) -> None:
    info = sample_blob.info
    assert (info.chunk_count, info.stored_chunks, info.raw_chunks, info.zero_chunks) == (6, 5, 1, 1)
    assert info.metadata_size == len(sample_blob.metadata)
    assert open_blob(sample_blob.blob).metadata == sample_blob.metadata


def test_zstd_level_is_recorded_and_reported() -> None:
    data = text_bytes(20000, 9)
    blob, winfo = pack(data, "zstd", 4096, level=19)
    r = open_blob(blob)
    assert winfo.level == r.info().level == 19
    assert r.read(0, len(data)) == data


def test_writer_refuses_writes_after_close_and_a_second_close() -> None:
    w = ChunkWriter(io.BytesIO(), "lz4", 4096)
    w.write(b"abc")
    w.close()
    with pytest.raises(InvalidArgumentError):
        w.write(b"more")
    with pytest.raises(InvalidArgumentError):
        w.close()


def test_writer_output_may_be_a_pipe_written_strictly_sequentially(sample_blob: SampleBlob) -> None:
    class SequentialSink(io.RawIOBase):
        def __init__(self) -> None:
            self.buf = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.buf += b
            return len(b)

    sink = SequentialSink()
    w = ChunkWriter(sink, "lz4", 4096)  # type: ignore[arg-type]
    w.write(sample_blob.data)
    w.close(sample_blob.metadata)
    assert bytes(sink.buf) == sample_blob.blob


# -- reader I/O pattern ----------------------------------------------------------------------------


def test_open_reads_only_the_tail() -> None:
    data = random.Random(1).randbytes(1 << 20)  # blob larger than the tail read
    blob, _ = pack(data, "none", 64 << 10)
    src = BytesSource(blob)
    r = ChunkReader(src, cache_chunks=0)
    assert src.reads == [(len(blob) - TAIL_READ, TAIL_READ)]
    src.reads.clear()
    assert r.read(3 * (64 << 10) + 5, 100) == data[3 * (64 << 10) + 5 : 3 * (64 << 10) + 105]
    assert src.reads == [r.chunk_range(3)]


def test_open_reads_the_index_separately_when_the_tail_read_misses_it(
    sample_blob: SampleBlob, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The index's first piece (its header) is read and checked before the rest; no byte is read twice.
    monkeypatch.setattr(chunkfile, "TAIL_READ", 128)
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src)
    size = len(sample_blob.blob)
    tail_start = size - 128
    first_end = r.index_offset + 128
    assert src.reads == [(tail_start, 128), (r.index_offset, 128), (first_end, tail_start - first_end)]
    assert consume(r) == sample_blob.data


def test_a_read_of_one_chunk_reads_exactly_its_stored_range(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src, cache_chunks=0)
    cs = sample_blob.chunk_size
    for i in (0, 1, 2, 4, 5):
        src.reads.clear()
        assert r.read(i * cs + 7, 10) == sample_blob.data[i * cs + 7 : i * cs + 17]
        assert src.reads == [r.chunk_range(i)]
        assert r.chunk_range(i)[1] > 0


def test_a_read_spanning_neighbouring_chunks_is_a_single_source_read(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src, cache_chunks=0)
    cs = sample_blob.chunk_size
    src.reads.clear()
    # chunks 0..5, including the zero chunk 3 in the middle
    assert r.read(100, 5 * cs) == sample_blob.data[100 : 100 + 5 * cs]
    assert src.reads == [r.stored_range(0, 5)]
    src.reads.clear()
    assert r.read(2 * cs - 1, cs + 2) == sample_blob.data[2 * cs - 1 : 3 * cs + 1]
    assert src.reads == [r.stored_range(1, 2)]


def test_coalesced_reads_are_split_at_the_coalescing_limit(
    sample_blob: SampleBlob, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src, cache_chunks=0)
    limit = r.chunk_range(0)[1] + r.chunk_range(1)[1]
    monkeypatch.setattr(chunkfile, "MAX_COALESCED_READ", limit)
    src.reads.clear()
    assert r.read(0, len(sample_blob.data)) == sample_blob.data
    assert src.reads[0] == r.stored_range(0, 1)
    assert all(length <= max(limit, 4096) for _, length in src.reads)
    # The reads tile the stored chunks exactly, in order.
    assert src.reads[0][0] == HEADER_SIZE
    for (o1, l1), (o2, _) in zip(src.reads, src.reads[1:], strict=False):
        assert o1 + l1 == o2
    assert sum(length for _, length in src.reads) == r.index_offset - HEADER_SIZE


def test_cached_chunks_are_not_read_again(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src, cache_chunks=8)
    cs = sample_blob.chunk_size
    assert r.read(cs + 1, 10) == sample_blob.data[cs + 1 : cs + 11]
    src.reads.clear()
    assert r.read(cs + 20, 10) == sample_blob.data[cs + 20 : cs + 30]
    assert src.reads == []
    # A read around the cached chunk 1 fetches only chunks 0 and 2.
    assert r.read(cs - 5, cs + 10) == sample_blob.data[cs - 5 : 2 * cs + 5]
    assert src.reads == [r.chunk_range(0), r.chunk_range(2)]


def test_zero_chunks_take_no_bytes_and_read_back_as_zeros(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    r = ChunkReader(src, cache_chunks=0)
    cs = sample_blob.chunk_size
    assert r.chunk_range(3) == (r.chunk_range(4)[0], 0)
    src.reads.clear()
    assert r.read(3 * cs, cs) == bytes(cs)
    assert src.reads == []

    blob, info = pack(bytes(10 * cs + 1), "zstd", cs)
    assert len(blob) == HEADER_SIZE + INDEX_HEADER.size + 11 * (4 + 1 + 32) + TRAILER_SIZE
    assert (info.zero_chunks, info.stored_chunks) == (11, 0)
    assert open_blob(blob).read(0, 10 * cs + 1) == bytes(10 * cs + 1)


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_incompressible_chunks_are_stored_raw(codec: str) -> None:
    data = random.Random(7).randbytes(4 * 4096 + 100)
    blob, info = pack(data, codec, 4096)
    r = open_blob(blob)
    assert info.raw_chunks == r.info().raw_chunks == 5
    assert [r.chunk_range(i)[1] for i in range(5)] == [4096] * 4 + [100]
    assert r.read(0, len(data)) == data


def test_compressible_chunks_are_stored_compressed(sample_blob: SampleBlob) -> None:
    r = open_blob(sample_blob.blob)
    assert all(r.chunk_range(i)[1] < r.chunk_len(i) for i in (0, 1, 4, 5))
    assert r.chunk_range(2)[1] == 4096


def test_codec_none_stores_every_non_zero_chunk_raw(sample_blob: SampleBlob) -> None:
    blob, info = pack(sample_blob.data, "none", 4096)
    assert (info.raw_chunks, info.zero_chunks) == (5, 1)
    assert open_blob(blob).read(0, len(sample_blob.data)) == sample_blob.data


def test_reads_past_the_end_are_short_or_empty(sample_blob: SampleBlob) -> None:
    r = open_blob(sample_blob.blob)
    n = len(sample_blob.data)
    assert r.read(n - 3, 100) == sample_blob.data[-3:]
    assert r.read(n, 1) == b""
    assert r.read(n + 12345, 10) == b""
    assert r.read(5, 0) == b""


def test_negative_ranges_are_invalid_arguments(sample_blob: SampleBlob) -> None:
    r = open_blob(sample_blob.blob)
    with pytest.raises(InvalidArgumentError):
        r.read(-1, 10)
    with pytest.raises(InvalidArgumentError):
        r.read(0, -1)


def test_verify_reports_the_blob_on_an_intact_blob(sample_blob: SampleBlob) -> None:
    info = open_blob(sample_blob.blob, sample_blob.info.index_digest).verify()
    assert info == dataclasses.replace(sample_blob.info, blob_digest=None)


# -- versions, flags, arguments --------------------------------------------------------------------


def test_the_right_expected_index_digest_is_accepted(sample_blob: SampleBlob) -> None:
    r = open_blob(sample_blob.blob, sample_blob.info.index_digest)
    assert r.index_digest == sample_blob.info.index_digest


def test_a_wrong_expected_index_digest_is_rejected(sample_blob: SampleBlob) -> None:
    wrong = format_digest(hashlib.sha256(b"another layer").digest())
    with pytest.raises(CorruptBlobError) as ei:
        open_blob(sample_blob.blob, wrong)
    assert ei.value.offset == len(sample_blob.blob) - TRAILER_SIZE
    assert "manifest" in str(ei.value) and wrong in str(ei.value)


@pytest.mark.parametrize("digest", ["", "sha256:", "sha256:abc", "md5:" + "0" * 64, "sha256:" + "g" * 64])
def test_a_malformed_expected_index_digest_is_an_invalid_argument(
    sample_blob: SampleBlob, digest: str
) -> None:
    with pytest.raises(InvalidArgumentError):
        open_blob(sample_blob.blob, digest)


def test_a_consistently_forged_index_is_caught_only_by_the_manifest_digest(sample_blob: SampleBlob) -> None:
    # A writer that rewrites the index *and* the trailer's digest passes the blob's own checks;
    # the manifest's index digest is what stops it.
    def rewrite_metadata(index: bytearray) -> bytearray:
        index[-len(sample_blob.metadata) :] = b"X" * len(sample_blob.metadata)
        return index

    forged = rewrite_index(sample_blob.blob, rewrite_metadata)
    assert open_blob(forged).metadata == b"X" * len(sample_blob.metadata)
    with pytest.raises(CorruptBlobError, match="manifest"):
        open_blob(forged, sample_blob.info.index_digest)


def test_an_unsupported_major_version_is_rejected(sample_blob: SampleBlob) -> None:
    with pytest.raises(UnsupportedFormatError, match=r"format 2\.0.*upgrade damselfly"):
        open_blob(rewrite_trailer(sample_blob.blob, major=2))


def test_unknown_trailer_flags_are_rejected(sample_blob: SampleBlob) -> None:
    with pytest.raises(UnsupportedFormatError, match=r"0x4.*upgrade damselfly"):
        open_blob(rewrite_trailer(sample_blob.blob, flags=4))


def test_a_newer_minor_version_of_a_known_major_is_readable(sample_blob: SampleBlob) -> None:
    r = open_blob(rewrite_trailer(sample_blob.blob, minor=7))
    assert r.format_minor == 7
    assert consume(r) == sample_blob.data


def test_a_changed_major_version_without_a_matching_crc_is_corruption_with_a_hint(
    sample_blob: SampleBlob,
) -> None:
    b = bytearray(sample_blob.blob)
    struct.pack_into("<H", b, len(b) - TRAILER_SIZE + 8, 3)
    with pytest.raises(CorruptBlobError, match=r"format version 3\.0"):
        open_blob(bytes(b))


@pytest.mark.parametrize("size", [0, -4096, 3, 2048, 4097, 6144, 2 << 20])
def test_invalid_chunk_sizes_are_rejected(size: int) -> None:
    with pytest.raises(InvalidArgumentError):
        check_chunk_size(size)
    with pytest.raises(InvalidArgumentError):
        ChunkWriter(io.BytesIO(), "lz4", size)


@pytest.mark.parametrize("size", [*CHUNK_SIZES, 8 << 10, 512 << 10])
def test_every_power_of_two_from_4k_to_1m_is_a_valid_chunk_size(size: int) -> None:
    assert 1 << check_chunk_size(size) == size


def test_an_unknown_codec_name_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError, match="brotli"):
        ChunkWriter(io.BytesIO(), "brotli", 4096)


# -- crafted blobs: the parser, not the checksums --------------------------------------------------

# Offsets inside the index header (see INDEX_HEADER).
_I_USIZE, _I_COUNT, _I_CODEC, _I_SHIFT, _I_LEVEL, _I_META = 8, 16, 24, 25, 28, 32
_N = 6  # chunks in the sample blob
_LENGTHS = INDEX_HEADER.size
_KINDS = _LENGTHS + 4 * _N


def _set(fmt: str, at: int, value: int) -> Callable[[bytearray], bytearray]:
    def mutate(index: bytearray) -> bytearray:
        struct.pack_into(fmt, index, at, value)
        return index

    return mutate


def _add(fmt: str, at: int, delta: int) -> Callable[[bytearray], bytearray]:
    def mutate(index: bytearray) -> bytearray:
        (v,) = struct.unpack_from(fmt, index, at)
        struct.pack_into(fmt, index, at, v + delta)
        return index

    return mutate


def _move_length(index: bytearray) -> bytearray:
    # chunk 0 one byte longer, chunk 1 one byte shorter: the sum still matches
    _add("<I", _LENGTHS, 1)(index)
    return _add("<I", _LENGTHS + 4, -1)(index)


CRAFTED_INDEXES: dict[str, tuple[Callable[[bytearray], bytes | bytearray], type[BlockFormatError]]] = {
    "bad magic": (lambda i: b"DFLYZZZZ" + i[8:], CorruptBlobError),
    "unknown codec id": (_set("<B", _I_CODEC, 9), UnsupportedFormatError),
    "chunk shift too large": (_set("<B", _I_SHIFT, 30), CorruptBlobError),
    "chunk shift too small": (_set("<B", _I_SHIFT, 11), CorruptBlobError),
    "chunk count disagrees with size": (_add("<Q", _I_USIZE, 4096), CorruptBlobError),
    "size one byte short": (_add("<Q", _I_USIZE, -1), CorruptBlobError),
    "metadata length too long": (_add("<Q", _I_META, 1), CorruptBlobError),
    "metadata length too short": (_add("<Q", _I_META, -1), CorruptBlobError),
    "unknown chunk kind": (_set("<B", _KINDS + 1, 7), CorruptBlobError),
    "zero chunk marked stored": (_set("<B", _KINDS + 3, 1), CorruptBlobError),
    "stored chunk marked zero": (_set("<B", _KINDS + 0, 0), CorruptBlobError),
    "compressed chunk marked raw": (_set("<B", _KINDS + 0, 2), CorruptBlobError),
    "lengths do not sum to the index offset": (_add("<I", _LENGTHS, 1), CorruptBlobError),
    "lengths moved between chunks": (_move_length, CorruptBlobError),
    "chunk digest swapped": (
        lambda i: i[: _KINDS + _N] + i[_KINDS + _N + 32 : _KINDS + _N + 64] + i[_KINDS + _N + 32 :],
        CorruptBlobError,
    ),
    "index shorter than its header": (lambda i: i[:8], CorruptBlobError),
    "empty index": (lambda i: b"", CorruptBlobError),
}


@pytest.mark.parametrize("case", CRAFTED_INDEXES)
def test_a_crafted_index_is_rejected_with_a_format_error(sample_blob: SampleBlob, case: str) -> None:
    mutate, expected = CRAFTED_INDEXES[case]
    blob = rewrite_index(sample_blob.blob, mutate)
    try:
        got = consume(open_blob(blob))
    except BlockFormatError as e:
        assert type(e) is expected, f"{case}: {e!r}"
        assert "test.blob" in str(e)
    else:
        pytest.fail(f"{case}: read {len(got)} bytes from a crafted index")


def test_the_forge_helpers_rebuild_the_writer_output_byte_for_byte(sample_blob: SampleBlob) -> None:
    header, chunks, index = split_blob(sample_blob.blob)
    assert header == make_header(1, 12)
    assert reassemble(header, chunks, index) == sample_blob.blob


def test_a_header_that_disagrees_with_the_index_fails_verify(sample_blob: SampleBlob) -> None:
    _, chunks, index = split_blob(sample_blob.blob)
    for header in (make_header(2, 12), make_header(1, 13)):
        r = open_blob(reassemble(header, chunks, index))
        assert r.read(0, len(sample_blob.data)) == sample_blob.data  # reads never need the header
        with pytest.raises(CorruptBlobError, match="header") as ei:
            r.verify()
        assert ei.value.offset == 0


def test_a_header_with_the_wrong_magic_fails_verify(sample_blob: SampleBlob) -> None:
    _, chunks, index = split_blob(sample_blob.blob)
    r = open_blob(reassemble(make_header(1, 12, magic=b"NOTABLOB"), chunks, index))
    with pytest.raises(CorruptBlobError, match=r"header.*magic"):
        r.verify()


def test_reserved_bytes_set_by_a_newer_minor_writer_are_ignored(sample_blob: SampleBlob) -> None:
    # docs/format.md, "Versioning rules": readers of 1.0 do not check reserved bytes (a CRC or a digest
    # covers them), so a 1.x writer may give them meaning.
    header, chunks, index = split_blob(sample_blob.blob)
    h = bytearray(header[: HEADER.size])
    h[14:28] = b"\x01" * 14
    header = bytes(h) + CRC.pack(crc32(bytes(h)))
    i = bytearray(index)
    i[26:28] = b"\xff\xff"
    b = bytearray(reassemble(header, chunks, bytes(i), minor=1))
    t = len(b) - TRAILER_SIZE
    b[t + 64 : t + 68] = b"\x05\x06\x07\x08"
    struct.pack_into("<I", b, len(b) - 4, crc32(bytes(b[t : t + 68])))
    r = open_blob(bytes(b))
    assert consume(r) == sample_blob.data


@pytest.mark.parametrize("level", [0, -5, 23])
def test_the_zstd_level_in_the_index_is_informational(level: int) -> None:
    # docs/format.md §1.3: the level is "informational": decompression does not need it, so a blob from
    # a writer that allows other levels (zstd has negative "fast" levels) must still read.
    data = text_bytes(20000, 11)
    blob, _ = pack(data, "zstd", 4096)
    r = open_blob(rewrite_index(blob, _set("<i", _I_LEVEL, level)))
    assert consume(r) == data


# -- corruption: every byte, every truncation ------------------------------------------------------


def _region(r: ChunkReader, size: int, pos: int) -> tuple[str, int]:
    if pos < HEADER_SIZE:
        return "header", 0
    if pos >= size - TRAILER_SIZE:
        return "trailer", size - TRAILER_SIZE
    if pos >= r.index_offset:
        return "index", r.index_offset
    for i in range(r.chunk_count):
        off, length = r.chunk_range(i)
        if off <= pos < off + length:
            return f"chunk {i}", off
    raise AssertionError(pos)


def _try(fn: Callable[[], bytes]) -> bytes | BaseException:
    try:
        return fn()
    except Exception as e:
        return e


@pytest.mark.parametrize(("mask", "with_manifest_digest"), [(0xFF, False), (0xFF, True), (0x01, False)])
def test_flipping_any_byte_is_detected_and_never_returns_wrong_bytes(
    sample_blob: SampleBlob, mask: int, with_manifest_digest: bool
) -> None:
    blob, data, cs = sample_blob.blob, sample_blob.data, sample_blob.chunk_size
    size = len(blob)
    pristine = open_blob(blob)
    expected_digest = sample_blob.info.index_digest if with_manifest_digest else None
    chunk_ranges = [(i * cs, pristine.chunk_len(i)) for i in range(pristine.chunk_count)]
    for pos in range(size):
        region, region_offset = _region(pristine, size, pos)
        where = f"byte {pos} ({region})"
        damaged = flip(blob, pos, mask)
        opened = _try(lambda: open_blob(damaged, expected_digest))  # noqa: B023
        if region in ("index", "trailer"):
            # The reader trusts nothing past the trailer CRC and the index digest: opening fails.
            assert type(opened) is CorruptBlobError, f"{where}: {opened!r}"
            assert opened.offset == region_offset, where
            assert opened.what.startswith(region), where
            continue
        assert isinstance(opened, ChunkReader), f"{where}: {opened!r}"
        r = opened
        err = _try(r.verify)
        assert type(err) is CorruptBlobError, f"{where}: {err!r}"
        assert (err.what, err.offset) == (region, region_offset), f"{where}: {err}"
        for i, (off, length) in enumerate(chunk_ranges):
            got = _try(lambda: r.read(off, length))  # noqa: B023
            if region == f"chunk {i}":
                assert type(got) is CorruptBlobError and got.what == region, f"{where}: {got!r}"
            else:
                assert got == data[off : off + length], f"{where}: chunk {i} read back wrong"
        whole = _try(lambda: r.read(0, len(data)))  # noqa: B023
        if region == "header":
            assert whole == data, where  # reads never touch the header; verify reports it
        else:
            assert isinstance(whole, CorruptBlobError), f"{where}: {whole!r}"


def _assert_clear_corruption(e: BaseException, where: str) -> None:
    # CorruptBlobError includes TruncatedBlobError; never struct.error, IndexError, a bare ValueError.
    assert isinstance(e, CorruptBlobError), f"{where}: {e!r}"
    msg = str(e)
    assert "offset" in msg and ("short.blob" in msg or "test.blob" in msg), f"{where}: {msg}"
    assert "\n" not in msg, where


@pytest.mark.parametrize("tail_read", [TAIL_READ, 256, 100])
def test_truncating_at_every_length_makes_opening_fail_clearly(
    sample_blob: SampleBlob, tail_read: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunkfile, "TAIL_READ", tail_read)
    blob = sample_blob.blob
    for length in range(len(blob)):
        got = _try(lambda: consume(open_blob(blob[:length])))  # noqa: B023
        _assert_clear_corruption(got, f"truncated to {length}")  # type: ignore[arg-type]
        if length < HEADER_SIZE + INDEX_HEADER.size + TRAILER_SIZE:
            assert type(got) is TruncatedBlobError, f"truncated to {length}: {got!r}"
        else:
            assert "truncated" in str(got), f"truncated to {length}: {got}"


@pytest.mark.parametrize("tail_read", ["whole blob", "index and trailer", "trailer only"])
def test_a_source_that_ends_early_never_yields_wrong_bytes(
    sample_blob: SampleBlob, tail_read: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob, data, cs = sample_blob.blob, sample_blob.data, sample_blob.chunk_size
    index_offset = open_blob(blob).index_offset
    tail = {"whole blob": TAIL_READ, "index and trailer": len(blob) - index_offset, "trailer only": 100}
    monkeypatch.setattr(chunkfile, "TAIL_READ", tail[tail_read])
    for cut in range(index_offset):
        where = f"source ends at {cut}"
        try:
            r = ChunkReader(PartialSource(blob, cut, index_offset), cache_chunks=0)
        except Exception as e:
            assert tail_read == "whole blob", f"{where}: {e!r}"
            assert type(e) is TruncatedBlobError, f"{where}: {e!r}"
            _assert_clear_corruption(e, where)
            continue
        for i in range(r.chunk_count):
            got = _try(lambda: r.read(i * cs, cs))  # noqa: B023
            off, length = r.chunk_range(i)
            if length == 0 or off + length <= cut:  # a zero chunk needs no bytes at all
                assert got == data[i * cs : (i + 1) * cs], f"{where}: chunk {i}: {got!r:.80}"
            else:
                assert type(got) is TruncatedBlobError, f"{where}: chunk {i}: {got!r:.80}"
                _assert_clear_corruption(got, where)
        err = _try(r.verify)
        assert type(err) is TruncatedBlobError, f"{where}: {err!r}"
        _assert_clear_corruption(err, where)


# -- property --------------------------------------------------------------------------------------

_segment = st.tuples(st.sampled_from(["zero", "random", "text"]), st.integers(0, 12000), st.integers(0, 1000))


def _build(segments: list[tuple[str, int, int]]) -> bytes:
    out = bytearray()
    for kind, n, seed in segments:
        if kind == "zero":
            out += bytes(n)
        elif kind == "random":
            out += random.Random(seed).randbytes(n)
        else:
            out += text_bytes(n, seed)
    return bytes(out)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=st.lists(_segment, max_size=6),
    codec=st.sampled_from(CODECS),
    chunk_size=st.sampled_from([4096, 8192, 16384]),
    cache_chunks=st.sampled_from([0, 1, 8]),
    data=st.data(),
)
def test_any_range_reads_back_exactly(
    segments: list[tuple[str, int, int]], codec: str, chunk_size: int, cache_chunks: int, data: st.DataObject
) -> None:
    raw = _build(segments)
    blob, _ = pack(raw, codec, chunk_size)
    r = open_blob(blob, cache_chunks=cache_chunks)
    n = len(raw)
    ranges = data.draw(
        st.lists(st.tuples(st.integers(0, n + 10), st.integers(0, n + 10)), min_size=1, max_size=8)
    )
    for offset, length in ranges:
        assert r.read(offset, length) == raw[offset : offset + length]
