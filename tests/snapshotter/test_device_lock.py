"""One device daemon per state directory: a second daemon is refused before it mounts anything, and
clients that look for a daemon at the same moment start only one."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from snapshotter.device.client import DeviceClient

from .devd import DAMSELFLY, DeviceDaemon, mount_points


def test_a_second_daemon_on_the_same_state_is_refused_and_the_first_keeps_serving(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = DeviceDaemon(state).start()
    try:
        assert first.proc is not None
        second = subprocess.run(
            [str(DAMSELFLY), "device-daemon", "--state-dir", str(state), "-v"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert second.returncode != 0
        assert f"another device daemon (pid {first.proc.pid}) serves {state}" in second.stderr
        # nothing stacked on the first one's mount, and the first one still answers on its socket
        assert mount_points().count(str(state / "dev")) == 1
        assert first.call({"op": "ping"})["pid"] == first.proc.pid
    finally:
        assert first.stop() == []


def test_clients_starting_a_daemon_at_once_start_one(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    pids: list[int] = []
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            pids.append(DeviceClient(state).ensure())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=ensure) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == []
        assert len(pids) == 3 and len(set(pids)) == 1, pids
        assert mount_points().count(f"{state}/dev") == 1
    finally:
        for t in threads:
            t.join(90)
        DeviceClient(state).shutdown()
    assert f"{state}/dev" not in mount_points()
