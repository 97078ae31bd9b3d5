"""`damselfly blob`: pack/cat round trips, info/verify, and exit codes and messages on bad blobs.

Most cases run in-process through click's CliRunner; a representative sample runs the installed
`damselfly` command in a subprocess (with a timeout, so a hang fails) to check what a user really sees:
exit code, one line on stderr, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from blockformat.chunkfile import TRAILER_SIZE, ChunkReader
from blockformat.source import BytesSource
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_CORRUPT, EXIT_ERROR, EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE
from tests.conftest import SampleBlob, text_bytes

DAMSELFLY = Path(sys.executable).with_name("damselfly")
CODECS = ["lz4", "zstd", "snappy", "none"]
CHUNK_SIZES = {"4K": 4 << 10, "16K": 16 << 10, "64KiB": 64 << 10, "256k": 256 << 10, "1M": 1 << 20}


def invoke(*args: str, input: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def damselfly(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([DAMSELFLY, *map(str, args)], capture_output=True, timeout=60, check=False)


def shape_data(shape: str, cs: int) -> bytes:
    return {
        "empty": lambda: b"",
        "one_byte": lambda: b"\x07",
        "not_a_multiple": lambda: text_bytes(2 * cs + 7, cs),
        "all_zeros": lambda: bytes(2 * cs),
        "random": lambda: random.Random(cs).randbytes(cs + cs // 2),
    }[shape]()


def write_sample(tmp_path: Path, sample: SampleBlob, blob: bytes | None = None) -> Path:
    path = tmp_path / "sample.dfly"
    path.write_bytes(sample.blob if blob is None else blob)
    return path


def assert_one_line_error(stderr: str, *needles: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("damselfly: error: "), stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["empty", "one_byte", "not_a_multiple", "all_zeros", "random"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("codec", CODECS)
def test_pack_then_cat_returns_the_exact_input(
    tmp_path: Path, codec: str, chunk_size: str, shape: str
) -> None:
    data = shape_data(shape, CHUNK_SIZES[chunk_size])
    src, dst = tmp_path / "in", tmp_path / "out.dfly"
    src.write_bytes(data)
    packed = invoke("blob", "pack", "--codec", codec, "--chunk-size", chunk_size, str(src), str(dst))
    assert packed.exit_code == EXIT_OK, packed.output
    cat = invoke("blob", "cat", str(dst))
    assert cat.exit_code == EXIT_OK, cat.stderr
    assert cat.stdout_bytes == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out.dfly"]  # no temporary file left


@pytest.mark.parametrize("codec", CODECS)
def test_the_installed_command_packs_cats_and_verifies(tmp_path: Path, codec: str) -> None:
    data = text_bytes(40000, 1) + bytes(20000) + random.Random(2).randbytes(9000)
    src, dst = tmp_path / "in", tmp_path / "out.dfly"
    src.write_bytes(data)
    packed = damselfly("blob", "pack", "--codec", codec, "--chunk-size", "16K", src, dst)
    assert (packed.returncode, packed.stderr) == (EXIT_OK, b"")
    cat = damselfly("blob", "cat", dst)
    assert (cat.returncode, cat.stderr) == (EXIT_OK, b"")
    assert cat.stdout == data
    ranged = damselfly("blob", "cat", "--offset", "16K", "--length", "20001", dst)
    assert (ranged.returncode, ranged.stdout) == (EXIT_OK, data[16384 : 16384 + 20001])
    verify = damselfly("blob", "verify", dst)
    assert verify.returncode == EXIT_OK
    assert verify.stdout.decode().startswith(f"{dst}: OK (5 chunks, index sha256:")


def test_a_packed_blob_gets_the_usual_file_mode(tmp_path: Path) -> None:
    # Written through a temporary file and renamed; the result must still be an ordinary file
    # (0666 & ~umask, like cp or gzip output), not the temporary file's private 0600, or a registry or
    # another user cannot read the blob it is meant to serve.
    src, dst = tmp_path / "in", tmp_path / "out.dfly"
    src.write_bytes(b"data")
    old = os.umask(0o022)
    try:
        assert invoke("blob", "pack", str(src), str(dst)).exit_code == EXIT_OK
    finally:
        os.umask(old)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o644


def test_pack_reads_standard_input(tmp_path: Path, sample_blob: SampleBlob) -> None:
    dst = tmp_path / "out.dfly"
    packed = invoke("blob", "pack", "--chunk-size", "4K", "-", str(dst), input=sample_blob.data)
    assert packed.exit_code == EXIT_OK, packed.output
    assert invoke("blob", "cat", str(dst)).stdout_bytes == sample_blob.data


@pytest.mark.parametrize(
    ("args", "start", "length"),
    [
        (["--offset", "0", "--length", "1"], 0, 1),
        (["--offset", "4095", "--length", "2"], 4095, 2),
        (["--offset", "4K", "--length", "4K"], 4096, 4096),
        (["--offset", "1000", "--length", "3KiB"], 1000, 3072),
        (["--offset", "12K", "--length", "4097"], 12288, 4097),  # the zero chunk and one byte past it
        (["--offset", "5K"], 5120, None),
        (["--length", "10000"], 0, 10000),
        (["--offset", "20000", "--length", "1M"], 20000, None),  # past the end: short
        (["--offset", "1M"], 1 << 20, None),  # entirely past the end: empty
        (["--offset", "7", "--length", "0"], 7, 0),
    ],
)
def test_cat_writes_the_requested_range(
    tmp_path: Path, sample_blob: SampleBlob, args: list[str], start: int, length: int | None
) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "cat", *args, str(path))
    assert result.exit_code == EXIT_OK, result.stderr
    end = None if length is None else start + length
    assert result.stdout_bytes == sample_blob.data[start:end]


def test_cat_accepts_the_right_index_digest(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "cat", "--index-digest", sample_blob.info.index_digest, str(path))
    assert (result.exit_code, result.stdout_bytes) == (EXIT_OK, sample_blob.data)
    assert invoke("blob", "verify", "--index-digest", sample_blob.info.index_digest, str(path)).exit_code == 0


def test_cat_rejects_a_wrong_index_digest_as_corrupt(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    for command in ("cat", "verify"):
        result = invoke("blob", command, "--index-digest", wrong, str(path))
        assert (result.exit_code, result.stdout_bytes) == (EXIT_CORRUPT, b"")
        assert_one_line_error(result.stderr, str(path), "index digest", "manifest", wrong)


def test_a_malformed_index_digest_is_a_usage_error(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "cat", "--index-digest", "sha256:nothex", str(path))
    assert result.exit_code == EXIT_USAGE
    assert_one_line_error(result.stderr, "sha256:nothex")


# -- info and verify -------------------------------------------------------------------------------


def test_info_json_reports_every_field(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "info", "--json", str(path))
    assert result.exit_code == EXIT_OK, result.stderr
    got = json.loads(result.stdout)
    i = sample_blob.info
    assert got == {
        "codec": "lz4",
        "level": 0,
        "chunk_size": 4096,
        "uncompressed_size": len(sample_blob.data),
        "chunk_count": 6,
        "stored_chunks": 5,
        "raw_chunks": 1,
        "zero_chunks": 1,
        "blob_size": len(sample_blob.blob),
        "index_digest": i.index_digest,
        "metadata_size": len(sample_blob.metadata),
        "ratio": round(len(sample_blob.data) / len(sample_blob.blob), 4),
        "path": str(path),
    }


def test_pack_json_reports_the_blob_digest_of_the_file_it_wrote(tmp_path: Path) -> None:
    data = text_bytes(50000, 3)
    src, dst = tmp_path / "in", tmp_path / "out.dfly"
    src.write_bytes(data)
    result = invoke("blob", "pack", "--json", "--codec", "zstd", "--level", "7", str(src), str(dst))
    assert result.exit_code == EXIT_OK, result.stderr
    packed = json.loads(result.stdout)
    assert packed["blob_digest"] == "sha256:" + hashlib.sha256(dst.read_bytes()).hexdigest()
    assert (packed["codec"], packed["level"], packed["chunk_size"]) == ("zstd", 7, 65536)
    assert (packed["path"], packed["blob_size"]) == (str(dst), dst.stat().st_size)
    info = json.loads(invoke("blob", "info", "--json", str(dst)).stdout)
    assert "blob_digest" not in info  # a reader that read only the tail cannot know it
    assert info == {k: v for k, v in packed.items() if k != "blob_digest"}


def test_info_text_shows_the_chunk_counts_and_digest(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "info", str(path))
    assert result.exit_code == EXIT_OK
    assert "6 (5 stored, 1 raw, 1 zero)" in result.stdout
    assert sample_blob.info.index_digest in result.stdout


def test_verify_exits_zero_on_an_intact_blob(tmp_path: Path, sample_blob: SampleBlob) -> None:
    path = write_sample(tmp_path, sample_blob)
    result = invoke("blob", "verify", str(path))
    assert result.exit_code == EXIT_OK
    assert result.stdout == f"{path}: OK (6 chunks, index {sample_blob.info.index_digest})\n"


# -- bad arguments and missing files ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", ["0", "3", "2048", "2M", "6K"])
def test_pack_with_an_invalid_chunk_size_is_a_usage_error_and_leaves_nothing(
    tmp_path: Path, chunk_size: str
) -> None:
    (tmp_path / "in").write_bytes(b"data")
    result = invoke("blob", "pack", "--chunk-size", chunk_size, str(tmp_path / "in"), str(tmp_path / "out"))
    assert result.exit_code == EXIT_USAGE
    assert_one_line_error(result.stderr, "chunk size")
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_pack_with_an_unparseable_size_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "in").write_bytes(b"data")
    result = invoke("blob", "pack", "--chunk-size", "4X", str(tmp_path / "in"), str(tmp_path / "out"))
    assert result.exit_code == EXIT_USAGE
    assert "'4X' is not a size" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_pack_of_a_missing_source_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    result = invoke("blob", "pack", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert result.exit_code == EXIT_ERROR
    assert_one_line_error(result.stderr, str(tmp_path / "missing"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["cat", "verify", "info"])
def test_reading_a_missing_blob_is_an_error_naming_it(tmp_path: Path, command: str) -> None:
    result = invoke("blob", command, str(tmp_path / "missing.dfly"))
    assert result.exit_code == EXIT_ERROR
    assert_one_line_error(result.stderr, str(tmp_path / "missing.dfly"), "No such file")


# -- damaged blobs through the installed command ---------------------------------------------------


Damage = Callable[[bytes], bytes]
#: (reader of the intact blob, its size) -> a position in the blob
Where = Callable[[ChunkReader, int], int]


def _flip_in(where: Where) -> Damage:
    """Damage a blob by flipping every bit of the byte at `where(reader, size)`."""

    def damage(blob: bytes) -> bytes:
        b = bytearray(blob)
        b[where(ChunkReader(BytesSource(blob)), len(blob))] ^= 0xFF
        return bytes(b)

    return damage


# (command, damage, structure named in the message, offset named in the message)
DAMAGE: dict[str, tuple[str, Damage, str, Where]] = {
    "header magic": ("verify", _flip_in(lambda r, n: 3), "corrupt header", lambda r, n: 0),
    "header crc": ("verify", _flip_in(lambda r, n: 30), "corrupt header", lambda r, n: 0),
    "compressed chunk": (
        "cat",
        _flip_in(lambda r, n: r.chunk_range(1)[0] + 5),
        "corrupt chunk 1",
        lambda r, n: r.chunk_range(1)[0],
    ),
    "raw chunk": (
        "verify",
        _flip_in(lambda r, n: r.chunk_range(2)[0] + 100),
        "corrupt chunk 2",
        lambda r, n: r.chunk_range(2)[0],
    ),
    "index": (
        "cat",
        _flip_in(lambda r, n: r.index_offset + 50),
        "corrupt index",
        lambda r, n: r.index_offset,
    ),
    "index (info)": (
        "info",
        _flip_in(lambda r, n: n - TRAILER_SIZE - 1),
        "corrupt index",
        lambda r, n: r.index_offset,
    ),
    "trailer": ("verify", _flip_in(lambda r, n: n - 20), "corrupt trailer", lambda r, n: n - TRAILER_SIZE),
    "truncated to 0": ("cat", lambda b: b[:0], "corrupt blob", lambda r, n: 0),
    "truncated to 100": ("cat", lambda b: b[:100], "corrupt blob", lambda r, n: 100),
    "truncated in the middle": (
        "cat",
        lambda b: b[: len(b) // 2],
        "corrupt trailer",
        lambda r, n: n // 2 - TRAILER_SIZE,
    ),
    "last byte missing": ("verify", lambda b: b[:-1], "corrupt trailer", lambda r, n: n - 1 - TRAILER_SIZE),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_blob_exits_3_with_one_line_naming_file_structure_and_offset(
    tmp_path: Path, sample_blob: SampleBlob, case: str
) -> None:
    command, damage, structure, offset_of = DAMAGE[case]
    damaged = damage(sample_blob.blob)
    path = write_sample(tmp_path, sample_blob, damaged)
    proc = damselfly("blob", command, path)
    assert proc.returncode == EXIT_CORRUPT, proc.stderr
    assert proc.stdout == b"", "no byte of a damaged blob may reach stdout"
    offset = offset_of(ChunkReader(BytesSource(sample_blob.blob)), len(sample_blob.blob))
    assert_one_line_error(proc.stderr.decode(), str(path), structure, f"at offset {offset}")


def test_cat_needs_no_header_so_a_damaged_header_still_cats_exactly(
    tmp_path: Path, sample_blob: SampleBlob
) -> None:
    damaged = _flip_in(lambda r, n: 3)(sample_blob.blob)
    path = write_sample(tmp_path, sample_blob, damaged)
    result = invoke("blob", "cat", str(path))
    assert (result.exit_code, result.stdout_bytes) == (EXIT_OK, sample_blob.data)
    assert invoke("blob", "verify", str(path)).exit_code == EXIT_CORRUPT


def test_a_newer_major_version_exits_4_and_says_to_upgrade(tmp_path: Path, sample_blob: SampleBlob) -> None:
    b = bytearray(sample_blob.blob)
    t = len(b) - TRAILER_SIZE
    struct.pack_into("<H", b, t + 8, 2)  # trailer major
    struct.pack_into("<I", b, len(b) - 4, zlib.crc32(b[t : len(b) - 4]))
    path = write_sample(tmp_path, sample_blob, bytes(b))
    proc = damselfly("blob", "cat", path)
    assert (proc.returncode, proc.stdout) == (EXIT_UNSUPPORTED, b"")
    assert_one_line_error(proc.stderr.decode(), str(path), "format 2.0", "upgrade damselfly")
