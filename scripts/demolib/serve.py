"""The demo's own `damselfly serve` (own config, snapshot root, socket and device-daemon state directory),
and the undoing of what it leaves on purpose, shared with the tests.

`damselfly serve` starts the device daemon (which serves converted images' block devices through FUSE)
when a converted image first needs it, in its own session so that it outlives `serve` — containers keep
their devices across a restart of the service. `release` therefore undoes, by exact path and pid, what
`serve` leaves on purpose: the chain mounts under its root, the loop devices over the daemon's device
files, the daemon itself (asked to shut down, then SIGTERM, then SIGKILL: `stop_daemon`) and its FUSE
mount.

Its config is damselfly's defaults but for the paths, plus the `tables` the caller gives (the demo's:
``[remote] plain_http`` for a registry off loopback, ``[p2p]`` for the peer network; `damselfly serve`
hands both to the device daemon it starts). `wrap` rewrites the command line (the demo's puts `serve`
in a node's cgroup, and in a node's network namespace: the device daemon it starts inherits both).

`Serve.reset` gives a cold node: `serve` stopped, everything released, root and state (the device cache
included) deleted, and `serve` started again on the same socket, where containerd's proxy client finds
it again by itself.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from snapshotter.device import control
from snapshotter.device.paths import Paths
from snapshotter.errors import ControlError

from .containerd import toml_value
from .procs import Service, alive, detach_loops_below, stop_pid, unmount_below, wait_gone


def damselfly_argv() -> list[str]:
    """The `damselfly` console script next to this interpreter, else ``python -m snapshotter.cli``."""
    script = Path(sys.executable).parent / "damselfly"
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapshotter.cli"]


class Serve(Service):
    config_name = "config.toml"

    def __init__(
        self,
        directory: Path,
        socket_path: Path,
        log: Path,
        wrap: Callable[[Sequence[str]], list[str]] = list,
        tables: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        super().__init__(directory, log)
        self.socket = socket_path
        self.wrap = wrap
        #: More tables of the config file (``{"p2p": {"enabled": True, ...}}``), written at `start`.
        self.tables: dict[str, Mapping[str, object]] = dict(tables or {})
        self.root = directory / "root"  # the snapshotter's
        self.state = directory / "state"  # the device daemon's
        self.daemon_pids: list[int] = []  # device daemons seen (reported, and checked gone at the end)

    def config(self) -> str:
        # Every other key keeps damselfly's default (`damselfly config --config FILE` prints them all).
        text = (
            'log_level = "info"\n\n'
            "[snapshotter]\n"
            f"root = {toml_value(str(self.root))}\n"
            f"address = {toml_value(str(self.socket))}\n\n"
            "[device]\n"
            f"state_dir = {toml_value(str(self.state))}\n"
        )
        for name, keys in self.tables.items():
            if name in ("snapshotter", "device"):  # TOML refuses a table defined twice
                raise ValueError(f"[{name}] is written by Serve itself")
            text += f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
        return text

    def start(self, timeout: float = 30.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        argv = [*damselfly_argv(), "serve", "--config", str(self.config_path)]
        why = self.launch(self.wrap(argv), self._answers, timeout)
        if why is not None:
            raise OSError(f"damselfly serve on {self.socket} {why}; see {self.log}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def daemon_pid(self) -> int | None:
        """The device daemon's pid, if one answers at our state directory."""
        pid = daemon_pid(self.state)
        if pid is not None and pid not in self.daemon_pids:
            self.daemon_pids.append(pid)
        return pid

    def devices(self) -> dict[str, Any]:
        """The device daemon's status: what ``damselfly devices --state-dir STATE`` prints (devices, their
        blobs' download progress, the peer network's counters). Raises `ControlError` if none answers."""
        reply = control.call(Paths(str(self.state)).socket, {"op": "status"}, timeout=30)
        status: dict[str, Any] = reply["status"]
        return status

    def stop(self) -> list[str]:
        """Stop `serve` (SIGTERM: it stops the device daemon too when no device is in use)."""
        if self.proc is None:
            return []
        self.daemon_pid()  # note the daemon's pid while `serve` still knows it
        note = self.halt(signal.SIGTERM, 30.0)
        return [f"damselfly serve: {note}"] if note else []

    def release(self) -> list[str]:
        """Undo what `serve` leaves on purpose (see the module docstring); return what was undone."""
        self.daemon_pid()  # note a daemon that answers, so `leftovers` can check it is gone
        return release(self.root, self.state, self.daemon_pids)

    def keep_daemon_log(self, dest: Path) -> None:
        """Move the device daemon's log (``devd.log`` in the state directory) to the end of `dest`."""
        log = self.state / "devd.log"
        if log.exists():
            with dest.open("ab") as out, log.open("rb") as f:
                shutil.copyfileobj(f, out)
            log.unlink()

    def reset(self, keep_log: Path | None = None) -> list[str]:
        """A cold node: stop, release, delete root and state (the device cache; the daemon's log goes
        to the end of `keep_log` first, if given), start again."""
        undone = self.stop() + self.release()
        if keep_log is not None:
            self.keep_daemon_log(keep_log)
        for d in (self.root, self.state):
            if d.exists():
                shutil.rmtree(d)
        self.start()
        return undone


def daemon_pid(state: Path) -> int | None:
    """The pid of the device daemon that answers at state directory `state`, if one does."""
    try:
        return int(control.call(Paths(str(state)).socket, {"op": "ping"}, timeout=5)["pid"])
    except (ControlError, KeyError, TypeError, ValueError):
        return None


def stop_daemon(state: Path, pid: int, timeout: float = 20.0) -> list[str]:
    """Ask the device daemon at `state` (process `pid`) to shut down; SIGTERM, then SIGKILL, if it
    is not gone within `timeout` seconds. Returns what it needed beyond the request ([] normally)."""
    with contextlib.suppress(ControlError):
        control.call(Paths(str(state)).socket, {"op": "shutdown"}, timeout=5)
    if wait_gone(pid, timeout):
        return []
    note = stop_pid(pid, signal.SIGTERM, timeout)
    return [f"device daemon {pid} needed SIGTERM" + (f" ({note})" if note else "")]


def release(root: Path, state: Path, pids: Sequence[int] = ()) -> list[str]:
    """Undo what a `damselfly serve` on `root` and its device daemon at `state` leave on purpose, by
    exact path and pid: chain mounts under `root` (unmounted, deepest first), loop devices over files
    below `state` (detached), the daemon that answers there and any of `pids` still alive (stopped),
    then its FUSE mount. Returns what it undid; a daemon that stops when asked is not reported."""
    undone = [f"umount {mp}" for mp in unmount_below(root)]
    undone += [f"losetup -d {dev}" for dev in detach_loops_below(state)]
    answering = daemon_pid(state)
    if answering is not None:
        undone += stop_daemon(state, answering)
    for pid in pids:  # a daemon that stopped answering but still runs
        if pid != answering and alive(pid):
            note = stop_pid(pid, signal.SIGTERM, 10.0)
            undone.append(f"device daemon {pid} (silent) needed SIGTERM" + (f" ({note})" if note else ""))
    undone += [f"umount {mp}" for mp in unmount_below(state)]
    return undone
