"""`damselfly serve` as an operator runs it: systemd's readiness protocol on a real datagram socket,
JSON logs from serve and from the device daemon it starts, and one /metrics endpoint that carries the
daemon's metrics next to serve's own (the daemon's own endpoint too)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.demolib.serve import daemon_pid
from scripts.demolib.serve import release as release_remote
from snapshotter.config import DEFAULT_CACHE_LIMIT
from tests.e2e import observe
from tests.p2p.peerlab import free_ports
from tests.snapshotter import serving
from tests.snapshotter.remote_lab import serve_config


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(30)
    try:
        yield s, path
    finally:
        s.close()


def _json_lines(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    records = []
    for line in lines:
        record = json.loads(line)  # every line: one object
        assert {"time", "level", "logger", "message"} <= set(record), record
        records.append(record)
    return records


def test_serve_notifies_readiness_logs_json_and_exposes_the_daemons_metrics(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    listener, address = notify_socket
    state = tmp_path / "state"
    serve_port, daemon_port = free_ports(2)
    config = serve_config(
        tmp_path / "config.toml",
        state,
        metrics=f"127.0.0.1:{serve_port}",
        device_metrics=f"127.0.0.1:{daemon_port}",
        log_format="json",
    )
    served = serving.start(tmp_path, "--config", str(config), env={**os.environ, "NOTIFY_SOCKET": address})
    try:
        # The socket answered (serving.start waited for it): serve has said so to systemd.
        assert listener.recv(4096).startswith(b"READY=1\nSTATUS=serving on ")

        observe.wait_for("the device daemon serve starts", lambda: daemon_pid(state) is not None)
        pid = daemon_pid(state)
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET=" not in f.read(), "the daemon would speak for the unit"

        both = observe.scrape(f"127.0.0.1:{serve_port}")
        assert observe.sample(both, "damselfly_device_daemon_up") == 1
        assert observe.sample(both, "damselfly_remote_layers_total") == 0  # serve's own
        assert observe.sample(both, "damselfly_read_bytes_total", source="cache") == 0  # the daemon's
        assert observe.sample(both, "damselfly_cache_limit_bytes") == DEFAULT_CACHE_LIMIT  # [device] default
        assert observe.sample(both, "damselfly_device_daemon_process_cpu_seconds_total") > 0
        assert observe.sample(both, "process_cpu_seconds_total") > 0  # serve's process, not the daemon's

        own = observe.scrape(f"127.0.0.1:{daemon_port}")
        assert observe.sample(own, "damselfly_fetched_bytes_total", source="registry") == 0
        assert ("damselfly_remote_layers_total", frozenset()) not in own  # serve's are not the daemon's
    finally:
        served.stop()
        try:
            assert listener.recv(4096) == b"STOPPING=1"
        finally:
            release_remote(served.root, state)

    records = _json_lines(served.log)
    assert any(r["message"].startswith("serving containerd.services.snapshots.v1 on ") for r in records)
    assert records[-1]["message"] == "stopped" and records[-1]["logger"] == "damselfly.serve"
    daemon_records = _json_lines(state / "devd.log")
    assert any(r["message"].startswith(f"device daemon {pid} serving ") for r in daemon_records)
