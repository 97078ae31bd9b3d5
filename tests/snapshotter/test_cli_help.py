"""Every command and subcommand of the `damselfly` CLI answers --help."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from snapshotter.cli import cli


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):  # the top group loads its commands lazily
        cmd = group.get_command(ctx, name)
        assert cmd is not None, name
        if isinstance(cmd, click.Group):
            out += _paths(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


@pytest.mark.parametrize("path", _paths(cli), ids=lambda p: " ".join(p) or "damselfly")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="damselfly")
    assert result.exit_code == 0, result.output
    assert "Usage: damselfly" in result.output
    assert len(result.output.splitlines()) > 3


def test_blob_group_lists_its_subcommands() -> None:
    result = CliRunner().invoke(cli, ["blob", "--help"], prog_name="damselfly")
    for name in ("pack", "cat", "verify", "info"):
        assert name in result.output


def test_rpull_does_not_import_the_converter_or_the_device_daemon() -> None:
    """`damselfly rpull` is on every cold start's path: its process imports what it uses only."""
    code = (
        "import sys; from snapshotter.cli import cli; cli.get_command(None, 'rpull'); "
        "print(' '.join(m for m in ('snapshotter.convert.converter', 'snapshotter.device.daemon', "
        "'p2p.node', 'hypercorn') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
