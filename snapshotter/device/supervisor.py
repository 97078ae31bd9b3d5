"""The device daemon as `damselfly serve` sees it: started on demand, detached, and watched.

The daemon (`snapshotter.device.daemon`) serves every chain's block device through FUSE. It must
outlive the gRPC service — a restart of `damselfly serve` (SIGTERM, SIGKILL, an upgrade) must not
take running containers' devices away — so it runs in its own session (``start_new_session``; under
systemd, ``KillMode=process`` keeps it when the unit stops) and `serve` only talks to it over its
control socket.

`DeviceDaemon` (a `client.DeviceClient`) starts it when none answers at the state directory (lazily:
a node that never runs a converted image never gets one), `stop_if_idle` ends it when `serve` stops
cleanly and no device is in use, and `watch` pings it from a thread: a daemon that stopped answering
is started again and the callback re-attaches what the snapshotter needs. (Devices of a daemon that
died are gone with it: their loop devices fail reads until the chain is mounted anew; the restart only
makes new containers work again.)

Credentials from CRI pulls (`snapshotter.service.cri`) live in `serve`'s memory (`keychain`) and, once
a daemon answers, in the daemon's: `share_credentials` hands it one repository's at once, and every
`ensure` that finds a daemon this process has not handed them to yet (started now, restarted, or
started by someone else) hands it all of them, before it is used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from p2p.hosts import RegistrySettings
from p2p.keychain import Keychain, entry_to_json
from p2p.settings import P2PSettings

from ..config import DeviceSection
from ..errors import ControlError, DeviceError
from .client import DaemonProcess, DeviceClient
from .manager import DeviceSpec
from .prefetch import PrefetchRequest

log = logging.getLogger(__name__)

#: Seconds between two pings of the watch thread.
WATCH_INTERVAL = 5.0


class DeviceDaemon(DeviceClient):
    """The device daemon at `state_dir` as `serve` needs it: started when needed, watched."""

    def __init__(
        self,
        state_dir: str,
        settings: DeviceSection | None = None,
        p2p: P2PSettings | None = None,
        plain_http: bool = False,
        registry: RegistrySettings | None = None,
        keychain: Keychain | None = None,
        log_format: str = "text",
    ) -> None:
        super().__init__(state_dir, settings, p2p, plain_http, registry, log_format)
        self.keychain = keychain
        self._credentials_lock = threading.Lock()
        self._credentials_pid: int | None = None  # the daemon that has every entry of `keychain`
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._used = False  # whether we needed the daemon yet: only then does `watch` restart it
        self.started_pids: list[int] = []  # daemons this process started (tests stop them by pid)

    def ensure(self) -> int:
        """The pid of the daemon that answers, starting one first if none does (one start at a time)."""
        pid = self.ping()
        if pid is None:
            with self._start_lock:
                pid = super().ensure()
        # Only now: a watcher that pinged while the first daemon was starting must not "restart" it.
        self._used = True
        self._hand_credentials(pid)
        return pid

    # -- credentials of CRI pulls ---------------------------------------------------------------------

    def share_credentials(self, registry: str, repository: str) -> None:
        """Hand the daemon the keychain's credentials for `repository` now, if a daemon answers (else
        the next `ensure` hands it every entry)."""
        if self.keychain is None:
            return
        pid = self.ping()
        if pid is None:
            return
        with self._credentials_lock:
            if pid == self._credentials_pid:
                creds = self.keychain.for_repository(registry, repository)
                if creds is not None:
                    self.give_credentials([entry_to_json(registry, repository, creds)])
                return
        self._hand_credentials(pid)

    def _hand_credentials(self, pid: int) -> None:
        """Every entry of the keychain to the daemon `pid`, unless it has them. A failure is logged (no
        secret in it) and tried again at the next `ensure`."""
        if self.keychain is None or len(self.keychain) == 0:
            return
        with self._credentials_lock:
            if pid == self._credentials_pid:
                return
            entries = [entry_to_json(r, repo, c) for r, repo, c in self.keychain.entries()]
            try:
                self.give_credentials(entries)
            except (ControlError, DeviceError) as e:
                log.warning("cannot hand the credentials of CRI pulls to the device daemon: %s", e)
                return
            self._credentials_pid = pid
            log.info("handed the credentials of %d repositories to the device daemon %d", len(entries), pid)

    def start(self, *, verbose: bool = True) -> DaemonProcess:
        started = super().start(verbose=verbose)
        self.started_pids.append(started.pid)
        return started

    def watch(self, on_restart: Callable[[], None], interval: float = WATCH_INTERVAL) -> None:
        """Ping the daemon every `interval` seconds from a thread; once this process has needed it, a
        daemon that stops answering is started again and `on_restart` is called. `close` ends it."""
        if self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                if not self._used or self.ping() is not None:
                    continue  # not needed yet (started lazily when a chain needs it), or alive
                log.error("the device daemon at %s stopped answering; starting it again", self.paths.state)
                try:
                    self.ensure()
                    on_restart()
                except Exception as e:
                    log.error("cannot restart the device daemon: %s", e)

        self._watcher = threading.Thread(target=loop, name="devd-watch", daemon=True)
        self._watcher.start()

    def stop_if_idle(self, timeout: float = 30.0) -> bool:
        """Shut the daemon down if it runs and serves no device (so a node without converted containers
        keeps no daemon around after `damselfly serve` stops); True if it was stopped. A daemon that
        serves devices keeps running: containers use them."""
        if self.ping() is None:
            return False
        try:
            devices = self.devices()
            if devices:
                log.info("the device daemon keeps serving %d devices", len(devices))
                return False
            pid = self.shutdown(timeout)
        except (ControlError, DeviceError) as e:
            log.warning("cannot stop the idle device daemon: %s", e)
            return False
        log.info("stopped the idle device daemon (pid %s)", pid)
        return pid is not None

    def close(self) -> None:
        """Stop watching (the daemon itself keeps running: it outlives us by design)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
            self._watcher = None

    # -- devices, starting the daemon first -------------------------------------------------------

    def attach(self, spec: DeviceSpec, prefetch: PrefetchRequest | None = None) -> str:
        self.ensure()
        return super().attach(spec, prefetch)

    def detach(self, name: str, timeout: float = 120.0) -> None:
        """Detach device `name` (idempotent). A daemon that is not running has no device to detach."""
        if self.ping() is None:
            return
        super().detach(name, timeout)

    def attached(self) -> set[str]:
        """Names of the devices the daemon serves (starting it first if none answers: then none)."""
        self.ensure()
        return self.devices()
