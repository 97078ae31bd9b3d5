"""`damselfly device-daemon`, `attach`, `detach`, `devices`, `mount`, `umount`: devices without containerd."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import click

from p2p.cache import DEFAULT_UNIT_SIZE

from ..device import control
from ..device.daemon import Paths, run
from ..device.manager import DeviceSpec, Settings
from ..errors import ControlError, SnapshotterError
from ..image import device_spec_for
from ..mounts import find_mount, loop_info, loops_for, mount_loop, umount_loop
from .blob import SizeType
from .errors import reports_errors

DEFAULT_STATE_DIR = "/run/damselfly"
STATE_DIR_OPTION = click.option(
    "--state-dir",
    envvar="DAMSELFLY_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The device daemon's state directory (cache, FUSE mount, control socket).",
)


@click.command("device-daemon")
@STATE_DIR_OPTION
@click.option(
    "--read-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds before a device read that cannot be served fails with EIO.",
)
@click.option(
    "--unit-size", type=SizeType(), default=DEFAULT_UNIT_SIZE, show_default=True, help="Cache fetch unit."
)
@click.option("--cache-limit", type=SizeType(), default=0, help="Evict complete unused blobs above this.")
@click.option(
    "--background-delay",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds before a blob's background full download starts.",
)
@click.option(
    "--background-rate",
    type=SizeType(),
    default=0,
    help="Background download bytes per second per blob (0: unlimited).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every attach, detach and fetch failure.")
@reports_errors
def device_daemon(
    state_dir: str,
    read_timeout: float,
    unit_size: int,
    cache_limit: int,
    background_delay: float,
    background_rate: int,
    verbose: bool,
) -> None:
    """Serve block devices through FUSE until SIGTERM (runs in the foreground)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings(
        read_timeout=read_timeout,
        unit_size=unit_size,
        cache_limit_bytes=cache_limit,
        background_delay=background_delay,
        background_rate=float(background_rate),
    )
    run(state_dir, settings)
    # Reads that timed out may still wait on a hung network in pool threads; Python would join them at
    # exit. Everything the daemon owns is closed by now, so leave at once.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def ensure_daemon(state_dir: str, timeout: float = 20.0) -> Paths:
    """Return the running daemon's paths, starting a detached daemon first if none answers."""
    paths = Paths(state_dir)
    try:
        control.call(paths.socket, {"op": "ping"}, timeout=5)
        return paths
    except ControlError:
        pass
    os.makedirs(state_dir, exist_ok=True)
    with open(os.path.join(state_dir, "devd.log"), "ab") as logf:
        subprocess.Popen(
            [sys.executable, "-m", "snapshotter.cli", "device-daemon", "--state-dir", state_dir, "-v"],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,  # it must outlive this command
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            control.call(paths.socket, {"op": "ping"}, timeout=2)
            return paths
        except ControlError:
            if time.monotonic() > deadline:
                raise SnapshotterError(
                    f"the device daemon did not start within {timeout:.0f}s; "
                    f"see {os.path.join(state_dir, 'devd.log')}"
                ) from None
            time.sleep(0.1)


def _attach(state_dir: str, spec: DeviceSpec) -> str:
    paths = ensure_daemon(state_dir)
    reply = control.call(paths.socket, {"op": "attach", "spec": spec.to_json()})
    return str(reply["path"])


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
@reports_errors
def attach(
    src: str, state_dir: str, plain_http: bool, platform: str, upper_dir: str | None, name: str | None
) -> None:
    """Attach the block device of image SRC (OCI layout directory or registry reference); print its path."""
    spec = device_spec_for(src, plain_http=plain_http, platform=platform, name=name, upper=upper_dir)
    click.echo(_attach(state_dir, spec))


@click.command()
@click.argument("name")
@STATE_DIR_OPTION
@reports_errors
def detach(name: str, state_dir: str) -> None:
    """Detach device NAME (idempotent)."""
    control.call(Paths(state_dir).socket, {"op": "detach", "name": name})


@click.command()
@STATE_DIR_OPTION
@reports_errors
def devices(state_dir: str) -> None:
    """Show attached devices and the download state of their blobs (JSON)."""
    reply = control.call(Paths(state_dir).socket, {"op": "status"})
    click.echo(json.dumps(reply["status"], indent=2, sort_keys=True))


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
    reply = control.call(
        Paths(state_dir).socket,
        {
            "op": "commit",
            "name": name,
            "out": os.path.abspath(blob_path),
            "codec": codec,
            "chunk_size": chunk_size,
        },
    )
    info = reply["info"]
    click.echo(f"{blob_path}: {info['blob_digest']} index {info['index_digest']} ({info['blob_size']} bytes)")


@click.command("stop-daemon")
@STATE_DIR_OPTION
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for it to exit."
)
@reports_errors
def stop_daemon(state_dir: str, timeout: float) -> None:
    """Stop the device daemon (devices still in use by loop devices stop working: umount first)."""
    paths = Paths(state_dir)
    try:
        pid = int(control.call(paths.socket, {"op": "ping"}, timeout=5)["pid"])
    except ControlError:
        click.echo("the device daemon is not running")
        return
    control.call(paths.socket, {"op": "shutdown"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise SnapshotterError(f"the device daemon (pid {pid}) did not exit within {timeout:.0f}s")


@click.command("mount")
@click.argument("src")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@STATE_DIR_OPTION
@click.option("--plain-http", is_flag=True, help="Talk HTTP to the registry (loopback registries).")
@click.option(
    "--platform", default="linux/amd64", show_default=True, help="Platform of a multi-platform image."
)
@reports_errors
def mount_cmd(src: str, mountpoint: str, state_dir: str, plain_http: bool, platform: str) -> None:
    """Mount image SRC's root filesystem read-only at MOUNTPOINT, fetching blocks lazily.

    SRC is an OCI layout directory or a registry reference of a converted image.
    """
    spec = device_spec_for(src, plain_http=plain_http, platform=platform)
    path = _attach(state_dir, spec)
    os.makedirs(mountpoint, exist_ok=True)
    loop = mount_loop(path, mountpoint, "ext4", ("ro", "noload"))
    click.echo(f"{src} mounted at {mountpoint} ({loop} on {path})")


@click.command("umount")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@STATE_DIR_OPTION
@reports_errors
def umount_cmd(mountpoint: str, state_dir: str) -> None:
    """Unmount MOUNTPOINT, detach its loop device, and detach the device if nothing else uses it."""
    info = find_mount(mountpoint)
    if info is None:
        raise SnapshotterError(f"{mountpoint} is not mounted")
    loop = loop_info(info.source) if info.source.startswith("/dev/loop") else None
    umount_loop(mountpoint)
    paths = Paths(state_dir)
    backing = loop.backing_file if loop is not None else ""
    if os.path.dirname(backing) == paths.mountpoint and not loops_for(backing):
        control.call(paths.socket, {"op": "detach", "name": os.path.basename(backing)})
