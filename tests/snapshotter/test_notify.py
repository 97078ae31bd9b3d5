"""sd_notify readiness (`snapshotter.host.notify`) against a real AF_UNIX datagram socket, at a path and
in the abstract namespace, as systemd's ``$NOTIFY_SOCKET`` names them."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapshotter.host.notify import address_of, notify


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(5)
    try:
        yield s, path
    finally:
        s.close()


def test_ready_is_one_datagram_to_the_socket_path(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    assert notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notify("STOPPING=1", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"STOPPING=1"


def test_an_at_sign_names_the_abstract_namespace() -> None:
    name = f"damselfly-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert not notify("READY=1", {})
    assert not notify("READY=1", {"NOTIFY_SOCKET": ""})


def test_a_socket_nobody_listens_on_or_an_address_we_cannot_use_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert address_of("vsock:2:1234") is None
    assert "cannot notify systemd" in caplog.text
