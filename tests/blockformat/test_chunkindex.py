"""The chunk index: opening a blob (trailer, index, versions, flags, the expected digest, crafted
indexes), one verified parse shared by readers, and the whole-structure ranges a cache verifies
fetched bytes with (`verified_span`, `expand`)."""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable

import pytest

from blockformat.chunkfile import (
    CRC,
    HEADER,
    HEADER_SIZE,
    INDEX_HEADER,
    TRAILER_SIZE,
    ChunkReader,
)
from blockformat.chunkindex import ChunkIndex
from blockformat.digest import digest_of, sha256_digest
from blockformat.errors import (
    BlockFormatError,
    CorruptBlobError,
    InvalidArgumentError,
    InvalidDigestError,
    UnsupportedFormatError,
)
from blockformat.layer import LayerReader, LayerWriter
from blockformat.source import BytesSource
from tests.conftest import SampleBlob, text_bytes

from .forge import (
    consume,
    crc32,
    flip,
    make_header,
    open_blob,
    pack,
    reassemble,
    rewrite_index,
    rewrite_trailer,
    split_blob,
)


def test_a_reader_given_the_index_reads_nothing_to_open(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    index = ChunkIndex.load(src, sample_blob.info.index_digest)
    assert len(src.reads) == 1  # the tail, once
    src.reads.clear()
    r = ChunkReader(src, sample_blob.info.index_digest, index=index)
    assert src.reads == []
    assert r.index is index and r.info() == index.info()
    assert r.read(0, len(sample_blob.data)) == sample_blob.data
    assert r.verify().index_digest == sample_blob.info.index_digest


def test_a_given_index_is_checked_against_the_expected_digest(sample_blob: SampleBlob) -> None:
    src = BytesSource(sample_blob.blob)
    index = ChunkIndex.load(src)
    with pytest.raises(CorruptBlobError, match="index digest"):
        ChunkReader(src, digest_of(b"another layer"), index=index)
    with pytest.raises(InvalidDigestError):
        ChunkReader(src, "sha256:nope", index=index)


def test_the_index_of_another_blob_is_refused(sample_blob: SampleBlob) -> None:
    index = ChunkIndex.load(BytesSource(sample_blob.blob))
    with pytest.raises(InvalidArgumentError, match="blob of"):
        ChunkReader(BytesSource(sample_blob.blob + b"\0"), index=index)


def test_a_layer_reader_shares_the_index_it_is_given() -> None:
    out = io.BytesIO()
    w = LayerWriter(out, 1 << 20, chunk_size=4096)
    w.add_data(8192, b"x" * 8192)
    info = w.close()
    src = BytesSource(out.getvalue())
    index = ChunkIndex.load(src, info.index_digest)
    src.reads.clear()
    layer = LayerReader(src, info.index_digest, index=index)
    assert src.reads == [] and layer.chunks.index is index
    assert layer.read_data(0, 8192) == b"x" * 8192


def test_verified_span_of_the_whole_blob_is_the_whole_blob(sample_blob: SampleBlob) -> None:
    blob = sample_blob.blob
    index = ChunkIndex.load(BytesSource(blob))
    assert index.verified_span(0, blob) == (0, len(blob))


def test_verified_span_leaves_out_chunks_cut_by_either_end(sample_blob: SampleBlob) -> None:
    blob = sample_blob.blob
    g = ChunkIndex.load(BytesSource(blob))
    c0, n0 = g.chunk_range(0)
    c1, n1 = g.chunk_range(1)
    c2, _ = g.chunk_range(2)
    # From inside chunk 0 to inside chunk 2: only chunk 1 is whole.
    a, b = c0 + 1, c2 + 1
    assert g.verified_span(a, blob[a:b]) == (c1, c1 + n1)
    # Inside one chunk: nothing (an empty span).
    v0, v1 = g.verified_span(c0 + 1, blob[c0 + 1 : c0 + n0 - 1])
    assert v1 <= v0
    # Starting in the header (not at 0): the header cannot be checked, the chunks after it can.
    assert g.verified_span(5, blob[5:c2]) == (HEADER_SIZE, c2)
    # The tail is checked piecewise against the verified bytes: any piece of it counts.
    t = len(blob) - TRAILER_SIZE - 7
    assert g.verified_span(t, blob[t:]) == (t, len(blob))


@pytest.mark.parametrize("where", ["header", "chunk", "index", "trailer"])
def test_verified_span_refuses_a_flipped_byte_of_every_structure(sample_blob: SampleBlob, where: str) -> None:
    blob = sample_blob.blob
    g = ChunkIndex.load(BytesSource(blob))
    pos = {
        "header": 3,
        "chunk": g.chunk_range(1)[0] + 10,
        "index": g.index_offset + 50,
        "trailer": len(blob) - 20,
    }[where]
    with pytest.raises(CorruptBlobError):
        g.verified_span(0, flip(blob, pos))


def test_expand_makes_every_range_verifiable_whole(sample_blob: SampleBlob) -> None:
    blob = sample_blob.blob
    g = ChunkIndex.load(BytesSource(blob))
    size = len(blob)
    for a in range(0, size - 1, 211):
        for b in range(max(a + 1, HEADER_SIZE + 1), size + 1, 223):
            ea, eb = g.expand(a, b)
            assert ea <= a and eb >= b
            v0, v1 = g.verified_span(ea, blob[ea:eb])
            assert v0 <= a and v1 >= b, (a, b, ea, eb, v0, v1)


def test_chunk_lookup_and_ranges_agree(sample_blob: SampleBlob) -> None:
    g = ChunkIndex.load(BytesSource(sample_blob.blob))
    for i in range(g.chunk_count):
        start, n = g.chunk_range(i)
        assert g.stored_range(i, i) == (start, n)
        if n:
            assert g.chunk_at(start) == g.chunk_at(start + n - 1) == i
    assert g.stored_range(0, g.chunk_count - 1) == (HEADER_SIZE, g.index_offset - HEADER_SIZE)
    with pytest.raises(InvalidArgumentError):
        g.chunk_at(g.index_offset)


# -- versions, flags, the expected digest -------------------------------------------------------------------


def test_the_right_expected_index_digest_is_accepted(sample_blob: SampleBlob) -> None:
    r = open_blob(sample_blob.blob, sample_blob.info.index_digest)
    assert r.index_digest == sample_blob.info.index_digest


def test_a_wrong_expected_index_digest_is_rejected(sample_blob: SampleBlob) -> None:
    wrong = sha256_digest(hashlib.sha256(b"another layer").digest())
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
