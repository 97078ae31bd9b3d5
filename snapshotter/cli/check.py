"""`damselfly check SRC CONVERTED`: compare a converted image's tree with its source's (docs/convert.md)."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from ..convert.check import DEFAULT_WORK_DIR, CheckOptions, check
from .errors import EXIT_DIFFERENT, reports_errors
from .registryopts import registry_options, settings_from


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@click.command("check")
@click.argument("src")
@click.argument("converted")
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    help="Platform of a multi-platform image to check (repeat for several; 'all'). Default linux/amd64.",
)
@click.option("--plain-http", is_flag=True, default=None, help="Talk HTTP to the registries (loopback ones).")
@click.option(
    "--max-differences",
    "limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Print at most this many differences (then a count of the rest).",
)
@click.option(
    "--work-dir",
    envvar="DAMSELFLY_CHECK_WORK_DIR",
    default=DEFAULT_WORK_DIR,
    show_default=True,
    help="Where the source image is unpacked (room for the whole image), removed at the end.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr; only differences and the summary.")
@registry_options
@reports_errors
def check_cmd(
    src: str,
    converted: str,
    platforms: tuple[str, ...],
    plain_http: bool | None,
    limit: int,
    work_dir: str,
    quiet: bool,
    config_path: Path | None,
    hosts_dir: str | None,
) -> None:
    """Check that image CONVERTED (made by `damselfly convert`) holds exactly image SRC's files.

    SRC is unpacked with the OCI layer rules, CONVERTED mounted read-only, and the two trees compared
    entry by entry: type, mode, owner, size, content (SHA-256), xattrs, symlink targets, device
    numbers, mtimes, hard links. Prints one line per difference (`PATH: what`, the source's value
    first) and a summary line. SRC and CONVERTED: registry references, OCI layout directories (DIR or
    DIR:REF) or archives, as for `damselfly convert`. Needs root.

    Exit status: 0 equal, 5 the images differ, 1 error, 2 usage, 3 corrupt data.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = CheckOptions(
        platforms=platforms,
        plain_http=plain_http,
        work_dir=work_dir,
        registry=settings_from(config_path, hosts_dir),
    )
    # SIGTERM (a cancelled CI job, `timeout`) unwinds like Ctrl-C: mounts, loop devices, the private
    # device daemon and the work directory are all undone.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def progress(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    result = check(src, converted, options, progress)
    several = len(result.platforms) > 1
    found = [(p.platform, d) for p in result.platforms for d in p.differences]
    for platform, d in found[:limit]:
        click.echo(f"{platform}: {d}" if several else str(d))
    if len(found) > limit:
        click.echo(f"... and {len(found) - limit} more differences")
    verdict = "equal" if result.equal else f"{len(found)} differences"
    platforms_text = ", ".join(p.platform for p in result.platforms)
    click.echo(
        f"{converted} vs {src} ({platforms_text}): {verdict}; {result.entries} entries compared, "
        f"{_human(result.bytes_hashed)} hashed, {result.seconds:.1f}s"
    )
    if not result.equal:
        sys.exit(EXIT_DIFFERENT)
