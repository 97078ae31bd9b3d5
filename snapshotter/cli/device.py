"""`damselfly device-daemon`, `attach`, `detach`, `devices`, `mount`, `umount`: devices without containerd."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time

import click

from blockformat.durable import private_dir

from ..config import DeviceSection
from ..device import control
from ..device.daemon import Paths, run
from ..device.manager import DeviceSpec
from ..errors import ControlError, SnapshotterError
from ..host.mounts import find_mount, loop_info, loops_for, mount, mount_loop, umount_loop
from ..host.syscalls import MNT_DETACH, unmount_path
from ..image.spec import device_spec_for
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
    "--settings",
    "settings_json",
    default=None,
    help="Every [device] setting as one JSON object (how `damselfly serve` starts the daemon).",
)
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
    "--cache-limit", type=SizeType(), default=None, help="Evict complete unused blobs above this [0]."
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
@reports_errors
def device_daemon(
    state_dir: str,
    settings_json: str | None,
    read_timeout: float | None,
    fail_cooldown: float | None,
    unit_size: int | None,
    cache_limit: int | None,
    background_delay: float | None,
    background_rate: int | None,
    verbose: bool,
) -> None:
    """Serve block devices through FUSE until SIGTERM (runs in the foreground)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    base = DeviceSection.from_json(settings_json) if settings_json is not None else DeviceSection()
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
    private_dir(state_dir)  # the daemon forces it too; its log must not be readable before that
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
@reports_errors
def mount_cmd(src: str, mountpoint: str, state_dir: str, plain_http: bool, platform: str) -> None:
    """Mount image SRC's root filesystem read-only at MOUNTPOINT, fetching blocks lazily.

    SRC is an OCI layout directory or a registry reference of a converted image. The mount is
    nosuid,nodev. The same image may be mounted at several places (they share one device).
    """
    spec = device_spec_for(src, plain_http=plain_http, platform=platform)
    path = _attach(state_dir, spec)
    try:
        os.makedirs(mountpoint, exist_ok=True)
        loop = _mount_device(path, mountpoint)
    except BaseException:
        # Nothing else uses the device (a mount of it elsewhere has its own loop device): detach it, so a
        # failed mount leaves nothing attached in the daemon.
        if not loops_for(path):
            with contextlib.suppress(SnapshotterError):
                control.call(Paths(state_dir).socket, {"op": "detach", "name": spec.name})
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
    paths = Paths(state_dir)
    alive = _daemon_answers(paths)
    umount_loop(mountpoint, lazy=not alive)  # a dead device cannot answer: do not wait on it
    backing = loop.backing_file if loop is not None else ""
    if not alive:
        _remove_dead_daemon(paths)
        return
    if os.path.dirname(backing) == paths.mountpoint and not loops_for(backing):
        control.call(paths.socket, {"op": "detach", "name": os.path.basename(backing)})


def _daemon_answers(paths: Paths) -> bool:
    try:
        control.call(paths.socket, {"op": "ping"}, timeout=5)
    except ControlError:
        return False
    return True


def _remove_dead_daemon(paths: Paths) -> None:
    """Remove the FUSE mount, socket and pid file of a device daemon that is gone (not just slow: its
    pid file names no live device daemon). Its devices are gone with it."""
    try:
        with open(paths.pidfile) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"device-daemon" in f.read():
                return  # alive but not answering (busy or starting): leave it be
    except (OSError, ValueError):
        pass
    if find_mount(paths.mountpoint) is not None:
        unmount_path(paths.mountpoint, MNT_DETACH)
    for stale in (paths.socket, paths.pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
    logging.getLogger(__name__).warning("removed what a dead device daemon left in %s", paths.state)
