"""The `damselfly` command line.

Exit codes (one table for every subcommand; see `snapshotter.cli.errors`):
0 success, 1 error (I/O, bad input), 2 usage, 3 corrupt data, 4 unsupported format version.
"""

from __future__ import annotations

import click

from .blob import blob


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="damselfly")
def cli() -> None:
    """damselfly: start containers from block-layer images before they are downloaded."""


cli.add_command(blob)


def main() -> None:
    cli(prog_name="damselfly")
