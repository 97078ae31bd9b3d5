"""`damselfly blob`: pack, cat, verify and inspect chunk containers (for debugging and checks)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import click

from blockformat.chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo, ChunkReader, pack_file
from blockformat.codecs import CODEC_NAMES
from blockformat.durable import atomic_write
from blockformat.source import FileSource

from ..host.umask import shared_file_mode
from ..units import parse_size
from .errors import reports_errors

CODEC_CHOICE = click.Choice(sorted(CODEC_NAMES), case_sensitive=False)


def _size(text: str) -> int:
    """Parse 4096, 4K, 64KiB, 1M, 1MiB, 10G (binary units: `units.parse_size`)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        return _size(str(value))


#: ``--chunk-size``, for every command that makes chunk containers.
chunk_size_option = click.option(
    "--chunk-size",
    type=SizeType(),
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Uncompressed chunk size: a power of two from 4K to 1M.",
)


@click.group()
def blob() -> None:
    """Pack, read and check chunk containers (the compressed, seekable blob format)."""


@blob.command()
@click.argument("src", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("dst", type=click.Path(dir_okay=False, writable=True))
@click.option("--codec", type=CODEC_CHOICE, default="lz4", show_default=True, help="Chunk codec.")
@click.option("--level", type=int, default=None, help="Compression level (zstd: 1..22, default 3).")
@chunk_size_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@reports_errors
def pack(src: str, dst: str, codec: str, level: int | None, chunk_size: int, as_json: bool) -> None:
    """Pack the file SRC ('-' for stdin) into the chunk container DST.

    DST appears only when packing succeeded (written to a temporary file, then renamed).
    """
    # The mode cp or gzip would give it (0666 & ~umask), not a temp file's private 0600: a registry
    # or another user may need to read the blob.
    with atomic_write(os.path.abspath(dst), shared_file_mode()) as out:
        if src == "-":
            info = pack_file(sys.stdin.buffer, out, codec, chunk_size, level)
        else:
            with open(src, "rb") as f:
                info = pack_file(f, out, codec, chunk_size, level)
    _print_info(info, dst, as_json)


@blob.command()
@click.argument("blob_path", metavar="BLOB", type=click.Path(dir_okay=False))
@click.option("--offset", type=SizeType(), default=0, help="First uncompressed byte to write.")
@click.option("--length", type=SizeType(), default=None, help="How many bytes (default: to the end).")
@click.option(
    "--index-digest", default=None, help="Expected index digest (sha256:...), e.g. from a manifest."
)
@reports_errors
def cat(blob_path: str, offset: int, length: int | None, index_digest: str | None) -> None:
    """Write the uncompressed bytes of BLOB to stdout, every chunk verified first."""
    with FileSource(blob_path) as src:
        r = ChunkReader(src, index_digest)
        end = r.size if length is None else min(r.size, offset + length)
        out = sys.stdout.buffer
        step = 4 * 1024 * 1024
        pos = offset
        while pos < end:
            n = min(step, end - pos)
            out.write(r.read(pos, n))
            pos += n
        out.flush()


@blob.command()
@click.argument("blob_path", metavar="BLOB", type=click.Path(dir_okay=False))
@click.option(
    "--index-digest", default=None, help="Expected index digest (sha256:...), e.g. from a manifest."
)
@reports_errors
def verify(blob_path: str, index_digest: str | None) -> None:
    """Check the header, the trailer, the index and every chunk of BLOB. Exit 0 only if all are intact."""
    with FileSource(blob_path) as src:
        info = ChunkReader(src, index_digest).verify()
    click.echo(f"{blob_path}: OK ({info.chunk_count} chunks, index {info.index_digest})")


@blob.command()
@click.argument("blob_path", metavar="BLOB", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@reports_errors
def info(blob_path: str, as_json: bool) -> None:
    """Show codec, chunk size, sizes, ratio, chunk count and index digest of BLOB (reads only its tail)."""
    with FileSource(blob_path) as src:
        i = ChunkReader(src).info()
    _print_info(i, blob_path, as_json)


def _print_info(i: BlobInfo, path: str, as_json: bool) -> None:
    if as_json:
        d = dataclasses.asdict(i)
        d["ratio"] = round(i.ratio, 4)
        d["path"] = path
        if d["blob_digest"] is None:
            del d["blob_digest"]
        click.echo(json.dumps(d, indent=2))
        return
    codec = i.codec + (f" (level {i.level})" if i.codec == "zstd" else "")
    rows = [
        ("blob", path),
        ("codec", codec),
        ("chunk size", f"{i.chunk_size}"),
        ("uncompressed size", f"{i.uncompressed_size}"),
        ("blob size", f"{i.blob_size}"),
        ("ratio", f"{i.ratio:.3f}"),
        ("chunks", f"{i.chunk_count} ({i.stored_chunks} stored, {i.raw_chunks} raw, {i.zero_chunks} zero)"),
        ("index digest", i.index_digest),
    ]
    if i.blob_digest:
        rows.append(("blob digest", i.blob_digest))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
