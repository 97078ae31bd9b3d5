"""`damselfly serve` (the containerd snapshotter service) and `damselfly config` (the effective config)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import stat
import threading
from pathlib import Path
from types import FrameType

import click
import grpc

from p2p.auth import DockerConfigFile, chain_providers
from p2p.keychain import Keychain

from .. import logs
from ..config import LOG_LEVELS, Config, load, to_toml
from ..device.metrics import DaemonMetrics
from ..device.supervisor import DeviceDaemon
from ..errors import SnapshotterError
from ..host.notify import notify
from ..metrics import REGISTRY, MetricsServer
from ..remote.blobcheck import BlobCheck, RemoteOptions
from ..remote.snapshots import RemoteSnapshots
from ..service.cri import CredentialKeeper, CriProxy, build_cri_server
from ..service.metadata import MetaStore
from ..service.overlay import OverlayDriver
from ..service.server import build_server
from ..service.snapshots import Snapshots
from .errors import reports_errors

log = logging.getLogger("damselfly.serve")

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Config file (default: /etc/damselfly/config.toml if it exists, else built-in defaults).",
)

#: Seconds `serve` lets running calls finish after SIGTERM/SIGINT.
STOP_GRACE = 10.0


def _claim_socket(path: Path) -> None:
    """Make `path` free for our socket: remove a stale socket, refuse a live one or a non-socket."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SnapshotterError(f"{path} exists and is not a socket; remove it or choose another --address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # left behind by a process that died
            return
    raise SnapshotterError(
        f"{path}: another process is serving on this socket; stop it or choose another --address"
    )


def _start_daemon(daemon: DeviceDaemon) -> None:
    try:
        daemon.ensure()
    except (SnapshotterError, OSError) as e:  # the first converted Prepare tries again, and says why
        log.error("cannot start the device daemon: %s", e)


def _effective(
    config_path: Path | None,
    root: Path | None,
    address: str | None,
    level: str | None,
    state_dir: Path | None = None,
) -> Config:
    cfg = load(config_path)
    sn = cfg.snapshotter
    if root is not None:
        sn = dataclasses.replace(sn, root=str(root.absolute()))
    if address is not None:
        sn = dataclasses.replace(sn, address=str(Path(address).absolute()))
    cfg = dataclasses.replace(cfg, snapshotter=sn)
    if state_dir is not None:
        cfg = dataclasses.replace(
            cfg, device=dataclasses.replace(cfg.device, state_dir=str(state_dir.absolute()))
        )
    if level is not None:
        cfg = dataclasses.replace(cfg, log_level=level)
    return cfg


@click.command("serve")
@CONFIG_OPTION
@click.option("--root", type=click.Path(path_type=Path, file_okay=False), help="Snapshot root directory.")
@click.option("--address", help="Unix socket to serve on (containerd's proxy_plugins address).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), help="Overrides the config's log_level.")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The device daemon's state directory (overrides [device] state_dir).",
)
@reports_errors
def serve(
    config_path: Path | None,
    root: Path | None,
    address: str | None,
    log_level: str | None,
    state_dir: Path | None,
) -> None:
    """Serve containerd's Snapshots API on a unix socket until SIGTERM or SIGINT (foreground).

    Converted layers are served by a device daemon that this command starts at once (in the background,
    so a converted image's first Prepare does not wait for it), detached so that it outlives a restart
    (or a crash) of this service while containers use it; on a clean stop with no converted chain
    mounted, it is stopped too.

    With ``[cri] enabled``, it also serves the CRI image service on ``[cri] listen`` for the kubelet,
    forwarded to containerd's, and keeps the credentials of its PullImage calls in memory for the Prepare
    checks and the block reads of those images (`snapshotter.service.cri`).

    Under systemd (Type=notify) it reports READY=1 once the socket serves, and STOPPING=1 at its stop.
    """
    cfg = _effective(config_path, root, address, log_level, state_dir)
    logs.setup(getattr(logging, cfg.log_level.upper()), cfg.log_format)
    root_dir = Path(cfg.snapshotter.root)
    sock = Path(cfg.snapshotter.address)
    driver = OverlayDriver(root_dir)
    store = MetaStore(root_dir / "metadata.db")
    dev = cfg.device
    # Credentials of CRI pulls, in memory only: the Prepare checks ask them first, the daemon gets them.
    keychain = Keychain()
    # The daemon runs the node's peer network too ([p2p]); [remote] plain_http is its registries'.
    daemon = DeviceDaemon(
        dev.state_dir, dev, cfg.p2p, cfg.remote.plain_http, cfg.registry, keychain, cfg.log_format
    )
    rc = cfg.remote
    options = RemoteOptions(
        rc.enabled, rc.plain_http, rc.check_timeout, rc.unreachable_cooldown, rc.prefetch, cfg.registry
    )
    check = BlobCheck(options, chain_providers(keychain, DockerConfigFile()))
    remote = RemoteSnapshots(store, root_dir, daemon, options, check)
    metrics: MetricsServer | None = None
    cri: grpc.Server | None = None
    proxy: CriProxy | None = None
    daemon_metrics: DaemonMetrics | None = None
    try:
        _claim_socket(sock)
        if cfg.cri.enabled:
            _claim_socket(Path(cfg.cri.listen))
        # Before serving: mounts of running containers stay as they are; missing ones come back.
        remote.reconcile()
        starting: threading.Thread | None = None
        if cfg.p2p.enabled:
            daemon.ensure()  # a member of the fleet from the start: it serves peers before it needs a device
        elif rc.enabled:
            # Started now, not at the first converted Prepare: its start-up (~1 s of imports) would be
            # on the cold path of the first container.
            starting = threading.Thread(target=_start_daemon, args=(daemon,), name="devd-start", daemon=True)
            starting.start()
        daemon.watch(remote.reconcile)
        if cfg.metrics.address:
            # One scrape target: the device daemon's metrics too, asked at each scrape.
            daemon_metrics = DaemonMetrics(daemon)
            REGISTRY.register(daemon_metrics)
            metrics = MetricsServer(cfg.metrics.address)
            log.info("metrics on http://%s/metrics", cfg.metrics.address)
        server = build_server(Snapshots(store, driver, remote), str(sock))
        if cfg.cri.enabled:
            proxy = CriProxy(cfg.cri.containerd, CredentialKeeper(keychain, daemon.share_credentials))
            cri = build_cri_server(proxy, cfg.cri.listen)
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("%s received, stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server.start()
        if cri is not None:
            cri.start()
            log.info(
                "serving runtime.v1.ImageService on %s for containerd at %s",
                cfg.cri.listen,
                cfg.cri.containerd,
            )
        try:
            log.info("serving containerd.services.snapshots.v1 on %s (root %s)", sock, root_dir)
            notify(f"READY=1\nSTATUS=serving on {sock}")
            while not stop.wait(1.0):
                pass
        finally:
            notify("STOPPING=1")
            if cri is not None:
                cri.stop(STOP_GRACE).wait()
                Path(cfg.cri.listen).unlink(missing_ok=True)
            server.stop(STOP_GRACE).wait()
            sock.unlink(missing_ok=True)
            daemon.close()  # stop watching; the daemon and the chain mounts stay for running containers
            if starting is not None:
                starting.join()  # a daemon still starting would be missed by the idle check
            remote.chains.close()  # devices attached at a pull that no container mounted go
            if not remote.mounted_chains():
                daemon.stop_if_idle()  # ... but an idle one need not outlive us
    finally:
        daemon.close()
        if proxy is not None:
            proxy.close()
        remote.close()
        if metrics is not None:
            metrics.close()
        if daemon_metrics is not None:
            REGISTRY.unregister(daemon_metrics)
        store.close()
    log.info("stopped")


@click.command("config")
@CONFIG_OPTION
@reports_errors
def config_cmd(config_path: Path | None) -> None:
    """Print the effective config as TOML (every key, defaults filled in)."""
    click.echo(to_toml(load(config_path)), nl=False)
