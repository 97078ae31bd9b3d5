"""The `damselfly` command line.

Exit codes (one table for every subcommand; see `snapshotter.cli.errors`):
0 success, 1 error (I/O, bad input), 2 usage, 3 corrupt data, 4 unsupported format version.
"""

from __future__ import annotations

import click

from .blob import blob
from .convert import convert_cmd
from .device import attach, commit, detach, device_daemon, devices, mount_cmd, stop_daemon, umount_cmd
from .fetch import fetch
from .rpull import rpull
from .serve import config_cmd, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="damselfly")
def cli() -> None:
    """damselfly: start containers from block-layer images before they are downloaded."""


cli.add_command(blob)
cli.add_command(fetch)
cli.add_command(convert_cmd, name="convert")
cli.add_command(serve)
cli.add_command(config_cmd, name="config")
cli.add_command(rpull)
for _cmd in (mount_cmd, umount_cmd, attach, detach, commit, devices, device_daemon, stop_daemon):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="damselfly")
