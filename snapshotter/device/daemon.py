"""`damselfly device-daemon`: the long-lived process that serves every device file.

It mounts the FUSE device filesystem, serves the control socket, and runs until SIGTERM/SIGINT or a
``shutdown`` request. It is meant to outlive the gRPC service (DESIGN §6) so containers keep working
while the snapshotter restarts. Layout of its state directory::

    <state>/              mode 0700, root's (forced at every start)
    <state>/cache/        node blob cache (p2p.cache), 0700
    <state>/dev/          FUSE mount: one file per attached device (root dir 0700, files 0400/0600)
    <state>/devd.sock     control socket, 0600
    <state>/devd.pid      pid of the running daemon
    <state>/devd.lock     flock held by the running daemon for its whole life (one per state dir)
    <state>/start.lock    flock a client holds while it looks for a daemon and starts one

With ``[device] metrics_address``, it serves its Prometheus metrics at ``http://ADDRESS/metrics``
(`snapshotter.device.metrics`); a port it cannot bind is logged and shown by ``status``, and the
devices are served anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
import types
from typing import Any

from blockformat.durable import private_dir, write_file_atomic
from p2p.hosts import RegistrySettings
from p2p.settings import P2PSettings

from ..config import DeviceSection
from ..errors import DeviceError, SnapshotterError
from ..host.syscalls import MNT_DETACH, unmount_path
from ..metrics import MetricsServer
from . import metrics as device_metrics
from .control import ControlServer
from .manager import DeviceManager, DeviceSpec
from .paths import Paths
from .prefetch import PrefetchRequest

log = logging.getLogger(__name__)


def run(
    state_dir: str,
    settings: DeviceSection,
    p2p: P2PSettings | None = None,
    plain_http: bool = False,
    registry: RegistrySettings | None = None,
) -> None:
    paths = Paths(state_dir)
    # Root's alone, whoever made it and however: the cache and the devices hold every image's bytes.
    private_dir(state_dir)
    lock = hold_lock(paths)  # released by the kernel when this process ends, however it ends
    manager = DeviceManager(state_dir, settings, p2p, plain_http, registry)
    registry_metrics = device_metrics.register(manager)
    endpoint: dict[str, Any] = {"address": settings.metrics_address or None, "error": None}
    stop = threading.Event()

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "mountpoint": paths.mountpoint, "p2p": manager.node.enabled}
        if op == "document":
            return {"path": manager.document(request)}
        if op == "resolve":
            return {"resolved": manager.resolve(request)}
        if op == "variant":
            return {"variant": manager.variant(request)}
        if op == "credentials":
            return {"changed": manager.credentials(request)}
        if op == "attach":
            prefetch = request.get("prefetch")
            return {
                "path": manager.attach(
                    DeviceSpec.from_json(request["spec"]),
                    None if prefetch is None else PrefetchRequest.from_json(prefetch),
                )
            }
        if op == "record":
            manager.record(str(request["name"]), float(request["seconds"]))
            return {}
        if op == "record-stop":
            return manager.record_stop(str(request["name"]))
        if op == "detach":
            manager.detach(str(request["name"]))
            return {}
        if op == "commit":
            info = manager.commit(
                str(request["name"]),
                str(request["out"]),
                str(request.get("codec", "lz4")),
                int(request.get("chunk_size", 65536)),
                None if request.get("level") is None else int(request["level"]),
            )
            return {"info": info}
        if op == "status":
            return {"status": {**manager.status(), "pid": os.getpid(), "metrics": endpoint}}
        if op == "metrics":
            return {"metrics": device_metrics.dump(registry_metrics)}
        if op == "shutdown":
            stop.set()
            return {}
        raise ValueError(f"unknown operation {op!r}")

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _unmount_stale(paths.mountpoint)
    private_dir(paths.mountpoint)  # hidden under the mount too: the FUSE root is 0700 as well
    manager.start(paths.mountpoint)
    server = ControlServer(paths.socket, handle)
    http: MetricsServer | None = None
    try:
        if settings.metrics_address:
            try:
                http = MetricsServer(settings.metrics_address, registry_metrics, "[device] metrics_address")
            except SnapshotterError as e:  # the devices matter more than their metrics: serve them anyway
                endpoint["error"] = str(e)
                log.error("%s", e)
        server.start()
        write_file_atomic(paths.pidfile, f"{os.getpid()}\n".encode())
        log.info("device daemon %d serving %s on %s", os.getpid(), paths.mountpoint, paths.socket)
        while not stop.wait(1.0):
            pass
    finally:
        server.close()
        if http is not None:
            http.close()
        manager.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.pidfile)
        log.info("device daemon %d stopped", os.getpid())
        os.close(lock)


def hold_lock(paths: Paths) -> int:
    """Take the state directory's daemon lock, or raise `DeviceError`: a second daemon would mount its
    FUSE filesystem over the first one's and take over its control socket, leaving the first one
    serving devices nobody can reach or stop."""
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            with open(paths.pidfile) as f:
                who = f"pid {int(f.read().strip())}"
        except (OSError, ValueError):
            who = "starting"
        raise DeviceError(f"another device daemon ({who}) serves {paths.state}") from None
    return fd


def _unmount_stale(mountpoint: str) -> None:
    """A daemon that was killed leaves its FUSE mount behind ("transport endpoint is not connected")."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == 107:  # ENOTCONN
            unmount_path(mountpoint, MNT_DETACH)
    except FileNotFoundError:
        pass
