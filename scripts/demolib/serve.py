"""The demo's own `damselfly serve`: own config, snapshot root, socket and device-daemon state directory.

`damselfly serve` starts the device daemon (which serves converted images' block devices through FUSE)
when a converted image first needs it, in its own session so that it outlives `serve` — containers keep
their devices across a restart of the service. `release` therefore undoes, by exact path and pid, what
`serve` leaves on purpose: the chain mounts under its root, the loop devices over the daemon's device
files, the daemon itself (asked to shut down, then SIGTERM, then SIGKILL) and its FUSE mount.

`reset` gives a cold node: `serve` stopped, everything released, root and state (the device cache
included) deleted, and `serve` started again on the same socket, where containerd's proxy client finds
it again by itself.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from snapshotter.device import control
from snapshotter.device.daemon import Paths
from snapshotter.errors import ControlError

from .procs import alive, detach_loops_below, stop_pid, stop_popen, unmount_below


def damselfly_argv() -> list[str]:
    """The `damselfly` console script next to this interpreter, else ``python -m snapshotter.cli``."""
    script = Path(sys.executable).parent / "damselfly"
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotter.cli"]


class Serve:
    def __init__(
        self, directory: Path, socket_path: Path, log: Path, wrap: Callable[[Sequence[str]], list[str]] = list
    ) -> None:
        self.dir = directory
        self.socket = socket_path
        self.log = log
        self.wrap = wrap
        self.proc: subprocess.Popen[bytes] | None = None
        self.daemon_pids: list[int] = []  # device daemons seen (reported, and checked gone at the end)

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def config(self) -> str:
        # Every other key keeps damselfly's default (`damselfly config --config FILE` prints them all).
        return (
            'log_level = "info"\n\n'
            "[snapshotter]\n"
            f'root = "{self.root}"\n'
            f'address = "{self.socket}"\n\n'
            "[device]\n"
            f'state_dir = "{self.state}"\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.wrap([*damselfly_argv(), "serve", "--config", str(self.config_path)]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise OSError(
                    f"damselfly serve exited with status {self.proc.returncode} at start; see {self.log}"
                )
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise OSError(
                    f"damselfly serve did not listen on {self.socket} within {timeout:.0f}s; see {self.log}"
                )
            time.sleep(0.05)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def daemon_pid(self) -> int | None:
        """The device daemon's pid, if one answers at our state directory."""
        try:
            pid = int(control.call(Paths(str(self.state)).socket, {"op": "ping"}, timeout=5)["pid"])
        except (ControlError, KeyError, TypeError, ValueError):
            return None
        if pid not in self.daemon_pids:
            self.daemon_pids.append(pid)
        return pid

    def stop(self) -> list[str]:
        """Stop `serve` (SIGTERM: it stops the device daemon too when no device is in use)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return []
        self.daemon_pid()  # note the daemon's pid while `serve` still knows it
        note = stop_popen(proc, signal.SIGTERM, 30.0)
        return [f"damselfly serve: {note}"] if note else []

    def release(self) -> list[str]:
        """Undo what `serve` leaves on purpose (see the module docstring); return what was undone."""
        undone = [f"umount {mp}" for mp in unmount_below(self.root)]
        undone += [f"losetup -d {dev}" for dev in detach_loops_below(self.state)]
        pid = self.daemon_pid()
        if pid is not None:
            with contextlib.suppress(ControlError):
                control.call(Paths(str(self.state)).socket, {"op": "shutdown"}, timeout=5)
            note = stop_pid(pid, signal.SIGTERM, 20.0) if not _gone_within(pid, 20.0) else None
            undone.append(f"device daemon {pid} stopped" + (f" ({note})" if note else ""))
        for pid in self.daemon_pids:  # a daemon that stopped answering but still runs
            if alive(pid):
                note = stop_pid(pid, signal.SIGTERM, 10.0)
                undone.append(f"device daemon {pid}: SIGTERM" + (f" ({note})" if note else ""))
        undone += [f"umount {mp}" for mp in unmount_below(self.state)]
        return undone

    def reset(self) -> list[str]:
        """A cold node: stop, release, delete root and state (the device cache), start again."""
        undone = self.stop() + self.release()
        for d in (self.root, self.state):
            if d.exists():
                shutil.rmtree(d)
        self.start()
        return undone


def _gone_within(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
