"""Chunk codecs: stable ids, round trips, and that a bad chunk only ever raises CodecError."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import lz4.block
import pytest
import snappy
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from blockformat.codecs import CODEC_NAMES, DEFAULT_ZSTD_LEVEL, CodecError, CodecId, get_codec
from blockformat.errors import InvalidArgumentError
from tests.conftest import text_bytes

CODECS = ["lz4", "zstd", "snappy", "none"]
COMPRESSING = ["lz4", "zstd", "snappy"]


def test_codec_ids_are_the_on_disk_values() -> None:
    # These numbers are written into every blob's index and header; changing one breaks old blobs.
    assert {c.name: int(c) for c in CodecId} == {"NONE": 0, "LZ4": 1, "ZSTD": 2, "SNAPPY": 3}
    assert CODEC_NAMES == {
        "none": CodecId.NONE,
        "lz4": CodecId.LZ4,
        "zstd": CodecId.ZSTD,
        "snappy": CodecId.SNAPPY,
    }


@pytest.mark.parametrize("name", CODECS)
def test_a_codec_is_found_by_name_in_any_case_and_by_id(name: str) -> None:
    by_name = get_codec(name)
    assert by_name.name == name
    assert get_codec(name.upper()).id == by_name.id == CODEC_NAMES[name]
    assert get_codec(CODEC_NAMES[name]).id == by_name.id
    assert get_codec(int(CODEC_NAMES[name])).id == by_name.id  # type: ignore[arg-type]


def test_an_unknown_codec_name_is_an_invalid_argument_listing_the_choices() -> None:
    with pytest.raises(InvalidArgumentError, match="lz4, zstd, snappy") as ei:
        get_codec("gzip")
    assert isinstance(ei.value, ValueError)


def test_zstd_level_defaults_and_is_kept() -> None:
    assert get_codec("zstd").level == DEFAULT_ZSTD_LEVEL == 3
    assert get_codec("zstd", 1).level == 1
    assert get_codec("zstd", 22).level == 22


@pytest.mark.parametrize("level", [0, -1, 23, 100])
def test_zstd_levels_outside_1_to_22_are_rejected(level: int) -> None:
    with pytest.raises(InvalidArgumentError, match="zstd level"):
        get_codec("zstd", level)


@pytest.mark.parametrize("name", ["lz4", "snappy", "none"])
def test_codecs_without_levels_report_level_zero(name: str) -> None:
    assert get_codec(name).level == 0
    assert get_codec(name, 9).level == 0


SAMPLES = {
    "one byte": b"\x00",
    "text": text_bytes(4096, 1),
    "random": random.Random(1).randbytes(4096),
    "zeros": bytes(65536),
    "short tail": text_bytes(1000, 2),
    "1 MiB text": text_bytes(1 << 20, 3),
}


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("name", CODECS)
def test_decompress_of_compress_is_the_input(name: str, sample: str) -> None:
    codec = get_codec(name)
    data = SAMPLES[sample]
    assert codec.decompress(codec.compress(data), len(data)) == data


@pytest.mark.parametrize("name", COMPRESSING)
def test_compressible_data_gets_smaller(name: str) -> None:
    data = text_bytes(65536, 4)
    assert len(get_codec(name).compress(data)) < len(data) * 3 // 4


def test_none_codec_is_the_identity() -> None:
    data = random.Random(2).randbytes(1000)
    assert get_codec("none").compress(data) == data


def test_lz4_chunks_are_bare_blocks_without_a_size_prefix() -> None:
    # The index, not the chunk, carries the uncompressed size (docs/format.md, "Codec ids").
    data = text_bytes(4096, 5)
    stored = get_codec("lz4").compress(data)
    assert stored == lz4.block.compress(data, store_size=False)
    assert lz4.block.decompress(stored, uncompressed_size=len(data)) == data


def test_zstd_chunks_are_frames_without_content_size_or_checksum() -> None:
    stored = get_codec("zstd", 5).compress(text_bytes(4096, 6))
    params = zstandard.get_frame_parameters(stored)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert not params.has_checksum


def test_snappy_chunks_are_raw_snappy_blocks() -> None:
    data = text_bytes(4096, 7)
    assert snappy.uncompress(get_codec("snappy").compress(data)) == data


@pytest.mark.parametrize("name", COMPRESSING)
def test_a_truncated_chunk_raises_codec_error(name: str) -> None:
    codec = get_codec(name)
    data = text_bytes(8192, 8)
    stored = codec.compress(data)
    for cut in (0, 1, len(stored) // 2, len(stored) - 1):
        with pytest.raises(CodecError, match=name):
            codec.decompress(stored[:cut], len(data))


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_a_chunk_longer_than_its_declared_size_raises_codec_error(name: str) -> None:
    codec = get_codec(name)
    data = text_bytes(8192, 9)
    with pytest.raises(CodecError, match=name):
        codec.decompress(codec.compress(data), len(data) - 1)


@pytest.mark.parametrize("name", COMPRESSING)
def test_decompression_never_produces_more_than_the_declared_size(name: str) -> None:
    # A chunk that passes its SHA-256 check can still come from a hostile writer. Told the chunk is
    # 4 KiB, a codec must not inflate it into 8 MiB first (a decompression bomb: with a 4 GiB
    # declared size one chunk would exhaust a node's memory); the reader's length check comes too late.
    bomb = {
        "lz4": lz4.block.compress(bytes(8 << 20), store_size=False),
        "zstd": zstandard.ZstdCompressor().compress(bytes(8 << 20)),  # frame declares its content size
        "snappy": snappy.compress(bytes(8 << 20)),  # the block's preamble declares its size
    }[name]
    codec = get_codec(name)
    try:
        out = codec.decompress(bomb, 4096)
    except CodecError:
        return
    pytest.fail(f"{name} decompressed a chunk declared as 4096 bytes into {len(out)} bytes")


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(CODECS), data=st.binary(min_size=1, max_size=20000))
def test_any_bytes_round_trip(name: str, data: bytes) -> None:
    codec = get_codec(name)
    assert codec.decompress(codec.compress(data), len(data)) == data


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(COMPRESSING), garbage=st.binary(max_size=200), size=st.integers(1, 1 << 16))
def test_garbage_only_ever_raises_codec_error(name: str, garbage: bytes, size: int) -> None:
    try:
        out = get_codec(name).decompress(garbage, size)
    except CodecError:
        return
    assert isinstance(out, bytes)


@pytest.mark.parametrize("name", ["lz4", "zstd", "snappy"])
def test_one_codec_decompresses_correctly_from_many_threads_at_once(name: str) -> None:
    # The device daemon decodes chunks on a pool of threads with one codec object per blob.
    codec = get_codec(name)
    chunks = [text_bytes(65536, seed) for seed in range(16)]
    packed = [codec.compress(c) for c in chunks]

    def work(i: int) -> bool:
        return all(codec.decompress(packed[k % 16], 65536) == chunks[k % 16] for k in range(i, i + 200))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))
