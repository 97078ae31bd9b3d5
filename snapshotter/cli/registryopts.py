"""The options every command that talks to a registry shares: where its ``[registry]`` settings come from.

``--config FILE`` names damselfly's config file (default: ``/etc/damselfly/config.toml`` if it exists),
whose ``[registry]`` table applies; ``--hosts-dir DIR`` replaces its ``config_path`` (containerd's
hosts.toml tree, ``ctr --hosts-dir``'s name). With neither, containerd's ``/etc/containerd/certs.d``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from p2p.hosts import RegistrySettings

from ..config import registry_settings

F = TypeVar("F", bound=Callable[..., object])

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="damselfly's config file: its [registry] table applies (mirrors, TLS, proxies) "
    "[/etc/damselfly/config.toml if it exists].",
)
HOSTS_DIR_OPTION = click.option(
    "--hosts-dir",
    default=None,
    metavar="DIR",
    help="containerd's hosts.toml tree for registry mirrors and TLS (overrides [registry] config_path) "
    "[/etc/containerd/certs.d].",
)


def registry_options(fn: F) -> F:
    """Add ``--config`` and ``--hosts-dir`` (the command gets `config_path` and `hosts_dir`)."""
    return CONFIG_OPTION(HOSTS_DIR_OPTION(fn))


def settings_from(config_path: Path | None, hosts_dir: str | None) -> RegistrySettings:
    return registry_settings(config_path, hosts_dir)
