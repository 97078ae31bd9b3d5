"""`damselfly device-daemon`, `attach`, `detach`, `devices`, `mount`, `umount`: devices without containerd."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from p2p.hosts import RegistrySettings, Resolver
from p2p.settings import P2PSettings

from .. import config, logs
from ..config import LOG_FORMATS, DeviceSection
from ..device.client import DeviceClient
from ..device.daemon import run
from ..device.manager import DeviceSpec
from ..errors import ConfigError, SnapshotterError
from ..host.loop import loop_info, loops_for
from ..host.mountinfo import find_mount
from ..host.mounts import mount, mount_loop, umount_loop
from ..image.spec import device_spec_for
from .blob import SizeType
from .errors import reports_errors
from .registryopts import registry_options, settings_from

DEFAULT_STATE_DIR = DeviceSection.state_dir
STATE_DIR_OPTION = click.option(
    "--state-dir",
    envvar="DAMSELFLY_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The device daemon's state directory (cache, FUSE mount, control socket).",
)


@click.command("device-daemon")
@click.option(
    "--state-dir",
    envvar="DAMSELFLY_STATE_DIR",
    default=None,
    help=f"The daemon's state directory (cache, FUSE mount, control socket) [[device] state_dir, "
    f"{DEFAULT_STATE_DIR}].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The config file (the same as `damselfly serve`'s): its [device], [p2p], [registry] and [remote] "
    "plain_http apply.",
)
@click.option(
    "--settings",
    "settings_json",
    default=None,
    help="Every [device] setting as one JSON object (how `damselfly serve` starts the daemon).",
)
@click.option(
    "--p2p",
    "p2p_json",
    default=None,
    help="Every [p2p] setting as one JSON object (how `damselfly serve` starts the daemon).",
)
@click.option(
    "--registry",
    "registry_json",
    default=None,
    help="Every [registry] setting as one JSON object (how `damselfly serve` starts the daemon).",
)
@click.option("--plain-http", is_flag=True, help="HTTP for every registry ([remote] plain_http).")
@click.option(
    "--read-timeout",
    type=float,
    default=None,
    help=f"Seconds before a device read that cannot be served fails with EIO [{DeviceSection.read_timeout}].",
)
@click.option(
    "--fail-cooldown",
    type=float,
    default=None,
    help=f"Seconds a unit or registry that failed fails reads at once [{DeviceSection.fail_cooldown}].",
)
@click.option(
    "--unit-size", type=SizeType(), default=None, help=f"Cache fetch unit [{DeviceSection.unit_size}]."
)
@click.option(
    "--cache-limit",
    type=SizeType(),
    default=None,
    help="Bytes the node cache may take on disk, like 10G (0: no limit); unused blobs are evicted, least "
    f"recently used first [{DeviceSection.cache_limit}].",
)
@click.option(
    "--background-delay",
    type=float,
    default=None,
    help=f"Seconds before a blob's background full download starts [{DeviceSection.background_delay}].",
)
@click.option(
    "--background-rate",
    type=SizeType(),
    default=None,
    help="Background download bytes per second per blob (0: unlimited) [0].",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every attach, detach and fetch failure.")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=None,
    help="text, or json: one object per line [the config's log_format, text].",
)
@reports_errors
def device_daemon(
    state_dir: str | None,
    config_path: Path | None,
    settings_json: str | None,
    p2p_json: str | None,
    registry_json: str | None,
    plain_http: bool,
    read_timeout: float | None,
    fail_cooldown: float | None,
    unit_size: int | None,
    cache_limit: int | None,
    background_delay: float | None,
    background_rate: int | None,
    verbose: bool,
    log_format: str | None,
) -> None:
    """Serve block devices through FUSE until SIGTERM (runs in the foreground).

    With the peer network on ([p2p] enabled), the daemon also serves its peers and fetches from them."""
    cfg = config.load(config_path) if config_path is not None else config.Config()
    logs.setup(logging.INFO if verbose else logging.WARNING, log_format or cfg.log_format)
    base = DeviceSection.from_json(settings_json) if settings_json is not None else cfg.device
    state_dir = state_dir or base.state_dir
    p2p = cfg.p2p
    if p2p_json is not None:
        try:
            p2p = P2PSettings.from_json(p2p_json)
        except (TypeError, ValueError) as e:
            raise ConfigError("--p2p", f"not valid p2p settings: {e}") from None
    given = {
        "read_timeout": read_timeout,
        "fail_cooldown": fail_cooldown,
        "unit_size": unit_size,
        "cache_limit": cache_limit,
        "background_delay": background_delay,
        "background_rate": background_rate,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = DeviceSection.from_json(
        json.dumps({**json.loads(base.to_json()), **overrides, "state_dir": state_dir})
    )
    registry = cfg.registry if registry_json is None else RegistrySettings.from_json(registry_json)
    run(state_dir, settings, p2p, plain_http or cfg.remote.plain_http, registry)
    # Reads that timed out may still wait on a hung network in pool threads; Python would join them at
    # exit. Everything the daemon owns is closed by now, so leave at once.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _client(state_dir: str, registry: RegistrySettings | None = None) -> DeviceClient:
    return DeviceClient(state_dir, registry=registry)


def _attach(state_dir: str, spec: DeviceSpec, registry: RegistrySettings) -> str:
    """Attach through the daemon of `state_dir`; a daemon started here reads registries with
    `registry` (one that runs already keeps its own settings)."""
    client = _client(state_dir, registry)
    client.ensure()  # a detached daemon: it must outlive this command
    return client.attach(spec)


@click.command()
@click.argument("src")
@STATE_DIR_OPTION
@click.option("--plain-http", is_flag=True, help="Talk HTTP to the registry (loopback registries).")
@click.option(
    "--platform", default="linux/amd64", show_default=True, help="Platform of a multi-platform image."
)
@click.option(
    "--upper", "upper_dir", default=None, help="Directory of a writable upper: a read-write device."
)
@click.option("--name", default=None, help="Device name (default: derived from the image's layers).")
@registry_options
@reports_errors
def attach(
    src: str,
    state_dir: str,
    plain_http: bool,
    platform: str,
    upper_dir: str | None,
    name: str | None,
    config_path: Path | None,
    hosts_dir: str | None,
) -> None:
    """Attach the block device of image SRC (OCI layout directory or registry reference); print its path.

    A device daemon started here reads registries with this command's [registry] settings."""
    registry = settings_from(config_path, hosts_dir)
    spec = device_spec_for(
        src, plain_http=plain_http, platform=platform, name=name, upper=upper_dir, resolver=Resolver(registry)
    )
    click.echo(_attach(state_dir, spec, registry))


@click.command()
@click.argument("name")
@STATE_DIR_OPTION
@reports_errors
def detach(name: str, state_dir: str) -> None:
    """Detach device NAME (idempotent)."""
    _client(state_dir).detach(name)


@click.command()
@STATE_DIR_OPTION
@reports_errors
def devices(state_dir: str) -> None:
    """Show attached devices and the download state of their blobs (JSON)."""
    click.echo(json.dumps(_client(state_dir).status(), indent=2, sort_keys=True))


@click.command("commit")
@click.argument("name")
@click.argument("blob_path", metavar="BLOB")
@STATE_DIR_OPTION
@click.option(
    "--codec", type=click.Choice(["lz4", "zstd", "snappy", "none"]), default="lz4", show_default=True
)
@click.option("--chunk-size", type=SizeType(), default=65536, show_default=True)
@reports_errors
def commit(name: str, blob_path: str, state_dir: str, codec: str, chunk_size: int) -> None:
    """Seal the writable upper of device NAME into the layer blob BLOB (unmount its filesystem first)."""
    info = _client(state_dir).commit(name, blob_path, codec, chunk_size)
    click.echo(f"{blob_path}: {info.blob_digest} index {info.index_digest} ({info.blob_size} bytes)")


@click.command("stop-daemon")
@STATE_DIR_OPTION
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for it to exit."
)
@reports_errors
def stop_daemon(state_dir: str, timeout: float) -> None:
    """Stop the device daemon (devices still in use by loop devices stop working: umount first)."""
    if _client(state_dir).shutdown(timeout) is None:
        click.echo("the device daemon is not running")


#: Options of `damselfly mount`'s ext4: read-only, no journal replay (the image has none), and
#: ``nosuid,nodev``: the image is someone else's files, not a container's root — a setuid-root binary in
#: it must not run as root for a local user, and its device nodes must not open (docs/security.md).
IMAGE_MOUNT_OPTIONS = ("ro", "noload", "nosuid", "nodev")


@click.command("mount")
@click.argument("src")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@STATE_DIR_OPTION
@click.option("--plain-http", is_flag=True, help="Talk HTTP to the registry (loopback registries).")
@click.option(
    "--platform", default="linux/amd64", show_default=True, help="Platform of a multi-platform image."
)
@registry_options
@reports_errors
def mount_cmd(
    src: str,
    mountpoint: str,
    state_dir: str,
    plain_http: bool,
    platform: str,
    config_path: Path | None,
    hosts_dir: str | None,
) -> None:
    """Mount image SRC's root filesystem read-only at MOUNTPOINT, fetching blocks lazily.

    SRC is an OCI layout directory or a registry reference of a converted image. The mount is
    nosuid,nodev. The same image may be mounted at several places (they share one device). A device
    daemon started here reads registries with this command's [registry] settings.
    """
    registry = settings_from(config_path, hosts_dir)
    spec = device_spec_for(src, plain_http=plain_http, platform=platform, resolver=Resolver(registry))
    path = _attach(state_dir, spec, registry)
    try:
        os.makedirs(mountpoint, exist_ok=True)
        loop = _mount_device(path, mountpoint)
    except BaseException:
        # Nothing else uses the device (a mount of it elsewhere has its own loop device): detach it, so a
        # failed mount leaves nothing attached in the daemon.
        if not loops_for(path):
            with contextlib.suppress(SnapshotterError):
                _client(state_dir).detach(spec.name)
        raise
    click.echo(f"{src} mounted at {mountpoint} ({loop} on {path})")


def _mount_device(path: str, mountpoint: str) -> str:
    """Loop-mount device file `path` at `mountpoint`; a second mount of the same device reuses its loop
    device (a second loop device over the same file would be a second copy of one ext4 in the kernel)."""
    existing = loops_for(path)
    if existing and find_mount(mountpoint) is None:
        mount(existing[0], mountpoint, "ext4", IMAGE_MOUNT_OPTIONS)
        return existing[0]
    return mount_loop(path, mountpoint, "ext4", IMAGE_MOUNT_OPTIONS)


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@STATE_DIR_OPTION
@reports_errors
def umount_cmd(mountpoint: str, state_dir: str) -> None:
    """Unmount MOUNTPOINT, detach its loop device, and detach the device if nothing else uses it.

    After a crash of the device daemon it also removes what the dead daemon left (its FUSE mount,
    socket and pid file), so the next `mount` starts a fresh one."""
    info = find_mount(mountpoint)
    if info is None:
        raise SnapshotterError(f"{mountpoint} is not mounted")
    loop = loop_info(info.source) if info.source.startswith("/dev/loop") else None
    client = _client(state_dir)
    alive = client.ping() is not None
    umount_loop(mountpoint, lazy=not alive)  # a dead device cannot answer: do not wait on it
    if not alive:
        client.remove_dead()
        return
    backing = loop.backing_file if loop is not None else ""
    if os.path.dirname(backing) == client.paths.mountpoint and not loops_for(backing):
        client.detach(os.path.basename(backing))
