"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Under a unit with ``Type=notify``, systemd sets ``$NOTIFY_SOCKET`` to the address of a datagram socket
and waits for the service to send ``READY=1`` before it counts the unit as started (and starts the
units ordered after it, such as containerd). `damselfly serve` sends it once its gRPC socket serves,
and ``STOPPING=1`` when it begins to stop. Each message is one datagram of newline-separated
``KEY=VALUE`` assignments, sent to an ``AF_UNIX`` ``SOCK_DGRAM`` socket: a path, or — when the address
starts with ``@`` — a name in the abstract namespace (the ``@`` stands for its leading NUL byte).

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) nothing is sent. A failure to send
is logged, never raised: the service works the same; systemd would only time the start out.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def address_of(value: str) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names, for `socket.connect`; None for one we cannot use."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock:... (a VM's host) or garbage


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` (``READY=1``, ``STOPPING=1``, ``STATUS=...``; several joined by newlines) to the
    service manager; True if it was sent, False without ``$NOTIFY_SOCKET`` or when sending failed."""
    value = (os.environ if environ is None else environ).get(ENV, "")
    if not value:
        return False
    address = address_of(value)
    if address is None:
        log.warning("cannot notify systemd: %s=%r is not a unix socket address", ENV, value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s (%s): %s", value, state.splitlines()[0], e)
        return False
    return True
