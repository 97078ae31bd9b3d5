"""Every command and subcommand of the `damselfly` CLI answers --help."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from snapshotter.cli import cli


def _paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
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
