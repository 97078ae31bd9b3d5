"""`damselfly convert SRC DST`: turn an OCI image into an image of block layers (docs/convert.md)."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from ..convert.converter import (
    CODECS,
    DEFAULT_CACHE_DIR,
    DEFAULT_CACHE_LIMIT,
    DEFAULT_VSIZE,
    ConvertOptions,
    LayerResult,
    convert,
)
from ..convert.ext4layer import interrupt
from .blob import SizeType, chunk_size_option
from .errors import reports_errors
from .registryopts import registry_options, settings_from


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _line(label: str, r: LayerResult) -> str:
    if r.reused:
        return f"{label}: reused {r.blob_digest[:19]} ({_human(r.blob_size)})"
    rate = r.uncompressed_size / r.seconds if r.seconds > 0 else 0.0
    return (
        f"{label}: {_human(r.source_size)} in ({_human(r.uncompressed_size)} tar) -> {_human(r.blob_size)} "
        f"{r.blob_digest[:19]} in {r.seconds:.1f}s ({_human(rate)}/s)"
    )


@contextmanager
def _reporter(quiet: bool) -> Iterator[Any]:
    """A progress callback: rich bars per layer, or one plain line per layer with --quiet."""
    console = Console(stderr=True)
    if quiet or not console.is_terminal:

        def plain(event: str, label: str, value: Any) -> None:
            if event == "done" and not quiet:
                console.print(_line(label, value), markup=False, highlight=False, soft_wrap=True)

        yield plain
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bars:
        tasks: dict[str, TaskID] = {}

        def rich_progress(event: str, label: str, value: Any) -> None:
            if event == "start":
                tasks[label] = bars.add_task(label, total=value or None)
            elif event == "advance" and label in tasks:
                bars.advance(tasks[label], value)
            elif event == "done":
                if label in tasks:
                    bars.update(tasks[label], completed=value.source_size, description=_line(label, value))
                else:
                    bars.console.print(_line(label, value), markup=False, highlight=False, soft_wrap=True)

        yield rich_progress


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--codec", type=click.Choice(CODECS), default="lz4", show_default=True, help="Chunk compression."
)
@click.option("--level", type=int, default=None, help="Compression level (zstd).")
@chunk_size_option
@click.option(
    "--vsize",
    type=SizeType(),
    default=DEFAULT_VSIZE,
    show_default=True,
    help="Virtual size of the block device (sparse: only what is used costs space).",
)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="Platform of a multi-platform image to convert (repeat for several; 'all'). Default linux/amd64.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Platforms converted at once (default: one per two CPUs, at most the platforms converted); "
    "1 converts them one after another. The result is the same whatever it is.",
)
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP to the registries (loopback ones).")
@click.option("--oci-layout", is_flag=True, help="DST is an OCI layout directory (created if missing).")
@click.option(
    "--cache-dir",
    envvar="DAMSELFLY_CONVERT_CACHE",
    default=DEFAULT_CACHE_DIR,
    show_default=True,
    help="Converted layers kept for reuse, and the work directory.",
)
@click.option(
    "--cache-limit",
    envvar="DAMSELFLY_CONVERT_CACHE_LIMIT",
    type=SizeType(),
    default=DEFAULT_CACHE_LIMIT,
    show_default=True,
    help="Bytes the cache's converted layers may take, like 10G (0: no limit); the least recently used "
    "are evicted when a conversion ends (docs/convert.md).",
)
@click.option(
    "--prefetch-files",
    "prefetch_files",
    multiple=True,
    metavar="PATHS",
    help="Paths or globs in the image (comma-separated or repeated; a directory means all below it) "
    "whose blocks nodes fetch first when they mount the image: stored as a trace referrer (registry DST).",
)
@click.option(
    "--referrer",
    is_flag=True,
    help="Push each converted manifest as an OCI 1.1 referrer of its source manifest (subject), so "
    "`damselfly rpull SRC` finds it; DST must be a tag in SRC's repository (docs/convert.md).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars; print only the result.")
@click.option("-v", "--verbose", is_flag=True, help="Log what every layer did.")
@registry_options
@reports_errors
def convert_cmd(
    src: str,
    dst: str,
    codec: str,
    level: int | None,
    chunk_size: int,
    vsize: int,
    platforms: tuple[str, ...],
    jobs: int | None,
    plain_http: bool | None,
    oci_layout: bool,
    cache_dir: str,
    cache_limit: int,
    prefetch_files: tuple[str, ...],
    referrer: bool,
    quiet: bool,
    verbose: bool,
    config_path: Path | None,
    hosts_dir: str | None,
) -> None:
    """Convert image SRC into block layers at DST.

    SRC: a registry reference, an OCI layout directory (DIR or DIR:REF), or a `docker save` / OCI
    archive tarball. DST: a registry reference or an OCI layout directory. Needs root (see
    docs/convert.md). Layers already converted for the same chain are reused from --cache-dir.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = ConvertOptions(
        codec=codec,
        level=level,
        chunk_size=chunk_size,
        vsize=vsize,
        platforms=platforms,
        plain_http=plain_http,
        cache_dir=os.path.abspath(cache_dir),
        cache_limit=cache_limit,
        quiet=quiet,
        oci_layout=oci_layout,
        prefetch_files=tuple(p for item in prefetch_files for p in item.split(",") if p.strip()),
        registry=settings_from(config_path, hosts_dir),
        referrer=referrer,
        jobs=jobs,
    )
    # SIGTERM (a CI job cancelled, `timeout`) unwinds like Ctrl-C, so the loop devices, the mounts and
    # image files of the layer being built (and a private device daemon) are all undone; `interrupt`
    # also flags it, in case the KeyboardInterrupt lands where Python ignores it.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    started = time.monotonic()
    with _reporter(quiet) as progress:
        result = convert(src, dst, options, progress)
    layers = result.layers
    converted = [x for x in layers if not x.reused]
    tar = sum(x.uncompressed_size for x in converted)
    secs = time.monotonic() - started
    click.echo(
        f"{result.destination}@{result.manifest_digest}: {len(converted)} layers converted, "
        f"{len(layers) - len(converted)} reused, {_human(sum(x.source_size for x in layers))} -> "
        f"{_human(sum(x.blob_size for x in layers))} in {secs:.1f}s"
        + (f" ({_human(tar / secs)}/s of tar)" if converted and secs > 0 else "")
    )
    for p in result.platforms:
        if p.listed:
            how = "referrers API" if p.listed == "api" else "referrers tag"
            click.echo(f"{p.platform}: {p.manifest_digest} is a referrer of {p.source_digest} ({how})")
        if p.trace is not None:
            click.echo(
                f"{p.platform}: prefetch list of {len(p.trace.ranges)} ranges ({_human(p.trace.total)}) "
                f"pushed as referrer {p.trace_digest}"
            )
