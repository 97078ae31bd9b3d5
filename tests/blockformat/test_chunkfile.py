"""The chunk container: round trips, reader I/O pattern, and that no damaged byte is ever returned.

Every blob here is built by code (`forge`). Opening a blob — its trailer and index, versions, flags and
crafted indexes — is tested in test_chunkindex.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockformat import chunkfile, chunklayout
from blockformat.chunkfile import (
    HEADER_SIZE,
    INDEX_HEADER,
    TAIL_READ,
    TRAILER_SIZE,
    ChunkReader,
    ChunkWriter,
    check_chunk_size,
    pack_file,
)
from blockformat.digest import sha256_digest
from blockformat.errors import (
    CorruptBlobError,
    InvalidArgumentError,
    TruncatedBlobError,
)
from blockformat.source import BytesSource
from tests.conftest import SampleBlob, text_bytes

from .forge import (
    CHUNK_SIZES,
    CODECS,
    SHAPES,
    PartialSource,
    consume,
    flip,
    open_blob,
    pack,
    shape_data,
)

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
    assert winfo.blob_digest == sha256_digest(hashlib.sha256(blob).digest())
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


@pytest.mark.parametrize("codec", ["lz4", "zstd", "snappy"])
def test_a_pool_of_workers_writes_the_same_blob(sample_blob: SampleBlob, codec: str) -> None:
    data = sample_blob.data * 20  # more chunks than one batch, every kind among them
    one, many = io.BytesIO(), io.BytesIO()
    for out, workers in ((one, 1), (many, 3)):
        w = chunkfile.ChunkWriter(out, codec, 4096, workers=workers)
        for pos in range(0, len(data), 10_000):
            w.write(data[pos : pos + 10_000])
        info = w.close(b"meta")
        assert info.chunk_count == -(-len(data) // 4096)
    assert many.getvalue() == one.getvalue()


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
    monkeypatch.setattr(chunklayout, "TAIL_READ", 128)
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
    monkeypatch.setattr(chunklayout, "TAIL_READ", tail_read)
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
    monkeypatch.setattr(chunklayout, "TAIL_READ", tail[tail_read])
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
