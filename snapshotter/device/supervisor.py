"""The device daemon as `damselfly serve` sees it: started on demand, detached, and watched.

The daemon (`snapshotter.device.daemon`) serves every chain's block device through FUSE. It must
outlive the gRPC service — a restart of `damselfly serve` (SIGTERM, SIGKILL, an upgrade) must not
take running containers' devices away — so it runs in its own session (``start_new_session``; under
systemd, ``KillMode=process`` keeps it when the unit stops) and `serve` only talks to it over its
control socket.

`DeviceDaemon` starts it when none answers at the state directory (lazily: a node that never runs a
converted image never gets one), `stop_if_idle` ends it when `serve` stops cleanly and no device is
in use, and `watch` pings it from a thread: a daemon that stopped answering
is started again and the callback re-attaches what the snapshotter needs. (Devices of a daemon that
died are gone with it: their loop devices fail reads until the chain is mounted anew; the restart only
makes new containers work again.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from blockformat.durable import private_dir

from ..config import DeviceSection
from ..errors import ControlError, DeviceError
from . import control
from .daemon import Paths
from .manager import DeviceSpec

log = logging.getLogger(__name__)

#: How long `ensure` waits for a daemon it started to answer.
START_TIMEOUT = 30.0
#: Seconds between two pings of the watch thread.
WATCH_INTERVAL = 5.0


class DeviceDaemon:
    """The control-socket client of the device daemon at `state_dir`, starting it when needed."""

    def __init__(self, state_dir: str, settings: DeviceSection | None = None) -> None:
        self.paths = Paths(state_dir)
        self.settings = settings or DeviceSection(state_dir=state_dir)
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._used = False  # whether we needed the daemon yet: only then does `watch` restart it
        self.started_pids: list[int] = []  # daemons this process started (tests stop them by pid)

    # -- the process -------------------------------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> int | None:
        """The daemon's pid, or None when nothing answers."""
        try:
            return int(control.call(self.paths.socket, {"op": "ping"}, timeout=timeout)["pid"])
        except (ControlError, KeyError, TypeError, ValueError):
            return None

    def ensure(self) -> int:
        """Return the pid of the daemon that answers, starting one first if none does."""
        self._used = True
        pid = self.ping()
        if pid is not None:
            return pid
        with self._start_lock:
            pid = self.ping()
            if pid is not None:
                return pid
            busy = self._pidfile_process()
            if busy is not None:
                # Alive but not answering (starting, or very busy): a second daemon would mount its FUSE
                # filesystem over the first one's. Wait for it instead.
                pid = self._wait_answer(busy, None)
                if pid is not None:
                    return pid
            return self._start()

    def _pidfile_process(self) -> int | None:
        """The pid in the daemon's pid file when that process is alive and is a device daemon."""
        try:
            with open(self.paths.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return None
        return pid if b"device-daemon" in cmdline else None

    def _wait_answer(self, pid: int, proc: subprocess.Popen[bytes] | None) -> int | None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            answered = self.ping(timeout=2.0)
            if answered is not None:
                return answered
            if proc is not None and proc.poll() is not None:
                return None
            if proc is None and not os.path.exists(f"/proc/{pid}"):
                return None
            time.sleep(0.05)
        return None

    def _start(self) -> int:
        state = self.paths.state
        private_dir(state)
        argv = [sys.executable, "-m", "snapshotter.cli", "device-daemon", "--state-dir", state]
        argv += ["--settings", self.settings.to_json(), "-v"]
        logfile = os.path.join(state, "devd.log")
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `damselfly serve` (and a SIGKILL of it)
                close_fds=True,
            )
        self.started_pids.append(proc.pid)
        log.info("started the device daemon (pid %d, state %s)", proc.pid, state)
        # Reap it in the background if it ever exits while we run (no zombie).
        threading.Thread(target=proc.wait, name="devd-reaper", daemon=True).start()
        pid = self._wait_answer(proc.pid, proc)
        if pid is not None:
            return pid
        if proc.poll() is not None:
            raise DeviceError(
                f"the device daemon exited with status {proc.returncode} at start; see {logfile}"
            )
        raise DeviceError(
            f"the device daemon (pid {proc.pid}) did not answer on {self.paths.socket} within "
            f"{START_TIMEOUT:.0f}s; see {logfile}"
        )

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
        pid = self.ping()
        if pid is None:
            return False
        try:
            devices = control.call(self.paths.socket, {"op": "status"})["status"].get("devices", {})
            if devices:
                log.info("the device daemon (pid %d) keeps serving %d devices", pid, len(devices))
                return False
            control.call(self.paths.socket, {"op": "shutdown"})
        except ControlError as e:
            log.warning("cannot stop the idle device daemon (pid %d): %s", pid, e)
            return False
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        break  # exited; its parent (maybe us) reaps it
            except OSError:
                break
            time.sleep(0.05)
        log.info("stopped the idle device daemon (pid %d)", pid)
        return True

    def close(self) -> None:
        """Stop watching (the daemon itself keeps running: it outlives us by design)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
            self._watcher = None

    # -- devices -----------------------------------------------------------------------------------

    def _call(self, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        self.ensure()
        return control.call(self.paths.socket, request, timeout=timeout)

    def attach(self, spec: DeviceSpec) -> str:
        """Attach (idempotent for the same spec); returns the path of the device file."""
        return str(self._call({"op": "attach", "spec": spec.to_json()})["path"])

    def device_path(self, name: str) -> str:
        return os.path.join(self.paths.mountpoint, name)

    def detach(self, name: str) -> None:
        """Detach device `name` (idempotent). A daemon that is not running has no device to detach."""
        if self.ping() is None:
            return
        control.call(self.paths.socket, {"op": "detach", "name": name})

    def attached(self) -> set[str]:
        """Names of the devices the daemon serves (starting it first if none answers: then none)."""
        status = self._call({"op": "status"})["status"]
        return set(status.get("devices", {}))
