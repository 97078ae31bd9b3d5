"""The `damselfly` command line.

Exit codes (one table for every subcommand; see `snapshotter.cli.errors`):
0 success, 1 error (I/O, bad input), 2 usage, 3 corrupt data, 4 unsupported format version, 5 a
difference found (`damselfly check`: the converted image differs from its source).

Subcommands are imported when they run (`LazyGroup`): `damselfly rpull` is on the path of every cold
start, and importing the converter, the device daemon and the peer network with it cost a second of
Python before the first request.
"""

from __future__ import annotations

import importlib

import click

#: name -> (module under snapshotter.cli, attribute): every subcommand, in `--help` order.
COMMANDS: dict[str, tuple[str, str]] = {
    "blob": ("blob", "blob"),
    "fetch": ("fetch", "fetch"),
    "convert": ("convert", "convert_cmd"),
    "check": ("check", "check_cmd"),
    "serve": ("serve", "serve"),
    "config": ("serve", "config_cmd"),
    "rpull": ("rpull", "rpull"),
    "record-trace": ("trace", "record_trace"),
    "mount": ("device", "mount_cmd"),
    "umount": ("device", "umount_cmd"),
    "attach": ("device", "attach"),
    "detach": ("device", "detach"),
    "commit": ("device", "commit"),
    "devices": ("device", "devices"),
    "status": ("status", "status"),
    "device-daemon": ("device", "device_daemon"),
    "stop-daemon": ("device", "stop_daemon"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use (`COMMANDS`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        module = importlib.import_module(f"{__name__}.{where[0]}")
        command = getattr(module, where[1])
        assert isinstance(command, click.Command)
        return command


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    # Imported when asked: importlib.metadata alone costs 25 ms of every command's start.
    version = importlib.import_module("snapshotter.version")
    click.echo(version.describe())
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and the git commit, and exit.",
)
def cli() -> None:
    """damselfly: start containers from block-layer images before they are downloaded."""


def main() -> None:
    cli(prog_name="damselfly")
