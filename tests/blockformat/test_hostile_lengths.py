"""Hostile lengths: every length a blob declares is bounded before anything is allocated or read by it.

The blobs here are built by code and lie about one length only; trailer CRCs and index digests are
recomputed so the lie reaches the check it is aimed at. Sources refuse any read larger than a bound, so
a reader that trusts a length fails the test instead of allocating gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import pytest

from blockformat import chunkfile, chunkwriter
from blockformat.annotations import KEY_INDEX_DIGEST, KEY_SIZE, KEY_VSIZE, LayerAnnotations
from blockformat.chunkfile import (
    CRC,
    INDEX_HEADER,
    MAX_INDEX_SIZE,
    TAIL_READ,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    ChunkReader,
    ChunkWriter,
)
from blockformat.errors import CorruptBlobError, InvalidArgumentError
from blockformat.layer import EXTENT, LAYER_HEADER, LAYER_MAGIC, LayerReader, LayerWriter
from blockformat.source import BytesSource, RangeSource
from tests.conftest import SampleBlob

#: The largest read a source here serves: opening a blob never needs more than its tail read.
MAX_READ = 2 * TAIL_READ


class SparseSource:
    """A blob of `size` bytes that holds `head` at offset 0 and `tail` at its end, zeros between.

    It stands for a huge (sparse) blob file without allocating it, and fails any read longer than
    MAX_READ: a reader that sizes a read by a hostile length is caught here, not by the OOM killer."""

    def __init__(self, head: bytes, tail: bytes, size: int) -> None:
        self._head = head
        self._tail = tail
        self._size = size
        self.name = "hostile.blob"
        self.reads: list[tuple[int, int]] = []

    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        assert length <= MAX_READ, f"unbounded read of {length} bytes at offset {offset}"
        end = min(offset + length, self._size)
        out = bytearray(max(end - offset, 0))
        for base, data in ((0, self._head), (self._size - len(self._tail), self._tail)):
            lo, hi = max(offset, base), min(end, base + len(data))
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - base : hi - base]
        return bytes(out)


def _trailer(index_offset: int, index_length: int, index: bytes) -> bytes:
    t = TRAILER.pack(TRAILER_MAGIC, 1, 0, 0, index_offset, index_length, hashlib.sha256(index).digest())
    return t + CRC.pack(zlib.crc32(t) & 0xFFFFFFFF)


def _parts(blob: bytes) -> tuple[int, int]:
    _, _, _, _, index_offset, index_length, _ = TRAILER.unpack_from(blob, len(blob) - TRAILER_SIZE)
    return index_offset, index_length


def hostile_index_length(blob: bytes, index_length: int) -> SparseSource:
    """`blob` with only its trailer's index length changed (the blob grows to match, as zeros)."""
    index_offset, real_length = _parts(blob)
    head = blob[: len(blob) - TRAILER_SIZE]
    index = blob[index_offset : index_offset + real_length]
    size = index_offset + index_length + TRAILER_SIZE
    return SparseSource(head, _trailer(index_offset, index_length, index), size)


def _refused(src: RangeSource) -> CorruptBlobError:
    """The error opening `src` raises (it must raise one)."""
    with pytest.raises(CorruptBlobError) as ei:
        ChunkReader(src)
    return ei.value


def test_a_trailer_declaring_a_16_gib_index_is_refused_before_any_index_read(
    sample_blob: SampleBlob,
) -> None:
    src = hostile_index_length(sample_blob.blob, 16 << 30)
    e = _refused(src)
    assert e.what == "trailer index length"
    assert e.offset == src.size() - TRAILER_SIZE
    assert str(16 << 30) in str(e) and str(MAX_INDEX_SIZE) in str(e)
    assert src.reads == [(src.size() - TAIL_READ, TAIL_READ)]  # the tail only


def test_an_index_just_over_the_bound_is_refused_and_one_at_the_bound_is_read(
    sample_blob: SampleBlob,
) -> None:
    with pytest.raises(CorruptBlobError, match="trailer index length"):
        ChunkReader(hostile_index_length(sample_blob.blob, MAX_INDEX_SIZE + 1))
    # At the bound the length is admitted, and it is the index header that disagrees with it: the rest
    # of the index (256 MiB of it) is never read.
    src = hostile_index_length(sample_blob.blob, MAX_INDEX_SIZE)
    e = _refused(src)
    assert e.what.startswith("index length (header: 6 chunks")
    assert e.offset == _parts(sample_blob.blob)[0]
    assert all(length <= TAIL_READ for _, length in src.reads), src.reads


def test_the_index_header_is_checked_before_the_rest_of_a_large_index_is_read(
    sample_blob: SampleBlob,
) -> None:
    # A trailer that says 64 MiB, over an index whose header says 6 chunks and 60 bytes of metadata.
    src = hostile_index_length(sample_blob.blob, 64 << 20)
    e = _refused(src)
    assert "index length" in e.what
    assert e.expected == f"{_parts(sample_blob.blob)[1]} bytes"
    index_offset = _parts(sample_blob.blob)[0]
    assert src.reads == [(src.size() - TAIL_READ, TAIL_READ), (index_offset, TAIL_READ)]


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        (16, (1 << 64) - 1, "index chunk count"),  # N, disagreeing with the size
        (32, (1 << 64) - 1, "index length"),  # M: a metadata length no index can hold
        (8, 1 << 62, "index length"),  # size (with N to match): more chunks than the bound admits
    ],
)
def test_index_header_counts_beyond_the_trailer_length_are_refused_before_the_index_is_read(
    sample_blob: SampleBlob, field: int, value: int, what: str
) -> None:
    # The trailer admits 64 MiB of index; the header's own fields, not the rest of the index, say no.
    index_offset, index_length = _parts(sample_blob.blob)
    index = bytearray(sample_blob.blob[index_offset : index_offset + index_length])
    struct.pack_into("<Q", index, field, value)
    if field == 8:
        struct.pack_into("<Q", index, 16, (value + 4095) // 4096)
    hostile_length = 64 << 20
    src = SparseSource(
        sample_blob.blob[:index_offset] + bytes(index),
        _trailer(index_offset, hostile_length, bytes(index)),
        index_offset + hostile_length + TRAILER_SIZE,
    )
    e = _refused(src)
    assert e.what.startswith(what)
    assert e.offset == index_offset
    assert all(length <= TAIL_READ for _, length in src.reads), src.reads


def test_a_stored_chunk_longer_than_a_chunk_is_refused_when_the_blob_is_opened(
    sample_blob: SampleBlob,
) -> None:
    # Chunk 0 claims chunk size + 1 stored bytes; the chunk area grows by as much, so the lengths still
    # sum to the index offset and the index digest is right: only the bound catches it.
    index_offset, index_length = _parts(sample_blob.blob)
    index = bytearray(sample_blob.blob[index_offset : index_offset + index_length])
    (first,) = struct.unpack_from("<I", index, INDEX_HEADER.size)
    grow = sample_blob.chunk_size + 1 - first
    struct.pack_into("<I", index, INDEX_HEADER.size, first + grow)
    chunks = sample_blob.blob[:index_offset]
    chunks = chunks[: 32 + first] + bytes(grow) + chunks[32 + first :]
    new_offset = index_offset + grow
    blob = chunks + bytes(index) + _trailer(new_offset, index_length, bytes(index))
    e = _refused(BytesSource(blob, "test.blob"))
    assert e.what == "index chunk lengths"
    assert e.got == sample_blob.chunk_size + 1


def test_a_blob_larger_than_any_valid_one_is_refused_before_its_tail_is_read() -> None:
    src = SparseSource(b"", b"", chunkfile.MAX_BLOB_SIZE + 1)
    with pytest.raises(CorruptBlobError, match="blob size"):
        ChunkReader(src)
    assert src.reads == []


def test_the_writer_refuses_more_chunks_than_an_index_may_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkwriter, "MAX_CHUNKS", 3)
    w = ChunkWriter(io.BytesIO(), "lz4", 4096)
    w.write(b"x" * 3 * 4096)
    with pytest.raises(InvalidArgumentError, match="larger chunk size"):
        w.write(b"x" * 4096)


def test_the_writer_refuses_an_index_longer_than_a_reader_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkwriter, "MAX_INDEX_SIZE", INDEX_HEADER.size + 37 * 2 + 10)
    w = ChunkWriter(io.BytesIO(), "lz4", 4096)
    w.write(b"x" * 2 * 4096)
    with pytest.raises(InvalidArgumentError, match="longer than"):
        w.close(b"m" * 11)
    w = ChunkWriter(io.BytesIO(), "lz4", 4096)
    w.write(b"x" * 2 * 4096)
    w.close(b"m" * 10)  # exactly at the bound


# -- layer metadata ----------------------------------------------------------------------------------


def test_a_hostile_extent_count_is_refused_at_the_metadata_without_allocating() -> None:
    out = io.BytesIO()
    meta = LAYER_HEADER.pack(LAYER_MAGIC, 1, 0, 1 << 20, 1 << 60) + EXTENT.pack(0, 4096, 0)
    w = ChunkWriter(out, "lz4", 4096)
    w.write(b"d" * 4096)
    info = w.close(meta)
    with pytest.raises(CorruptBlobError) as ei:
        LayerReader(BytesSource(out.getvalue(), "layer.blob"), info.index_digest)
    e = ei.value
    assert e.what == f"layer extent table length ({1 << 60} extents)"
    assert (e.expected, e.got) == (LAYER_HEADER.size + (1 << 60) * EXTENT.size, len(meta))
    # The offset is the metadata's own (the end of the index minus its length), not the index's.
    assert e.offset == len(out.getvalue()) - TRAILER_SIZE - len(meta)


def test_a_well_formed_layer_reports_its_metadata_offset() -> None:
    out = io.BytesIO()
    w = LayerWriter(out, 1 << 20, "lz4", 4096)
    w.add_data(0, b"a" * 4096)
    info = w.close()
    r = LayerReader(BytesSource(out.getvalue()), info.index_digest)
    meta_len = LAYER_HEADER.size + EXTENT.size
    assert r.chunks.metadata_offset == len(out.getvalue()) - TRAILER_SIZE - meta_len


# -- annotations -------------------------------------------------------------------------------------

_GOOD = {KEY_INDEX_DIGEST: "sha256:" + "a" * 64, KEY_SIZE: "4096", KEY_VSIZE: str(64 << 30)}


@pytest.mark.parametrize(
    "change",
    [
        {KEY_VSIZE: str((1 << 50) + 4096)},  # beyond the largest device
        {KEY_VSIZE: "4097"},  # not a multiple of 4096
        {KEY_VSIZE: "0"},
        {KEY_SIZE: "-1"},
        {KEY_SIZE: " 12"},
        {KEY_SIZE: "1_000"},
        {KEY_SIZE: "9" * 21},  # more digits than any u64
        {KEY_SIZE: str((64 << 30) + 1)},  # more data than the device holds
    ],
)
def test_annotation_numbers_outside_their_bounds_are_refused(change: dict[str, str]) -> None:
    with pytest.raises(InvalidArgumentError) as ei:
        LayerAnnotations.from_dict({**_GOOD, **change})
    assert len(str(ei.value)) < 300  # a hostile value is not echoed whole


def test_annotations_within_their_bounds_are_read() -> None:
    ann = LayerAnnotations.from_dict(_GOOD)
    assert ann is not None and (ann.size, ann.vsize) == (4096, 64 << 30)
