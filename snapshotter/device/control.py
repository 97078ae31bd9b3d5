"""The device daemon's control API: JSON lines over a unix socket.

One request per line, one reply per line::

    {"op": "ping"}                                   -> {"ok": true, "pid": 1234}
    {"op": "attach", "spec": {DeviceSpec}}           -> {"ok": true, "path": "/run/damselfly/dev/NAME"}
    {"op": "detach", "name": "NAME"}                 -> {"ok": true}
    {"op": "commit", "name": "NAME", "out": "/path", "codec": "lz4", "chunk_size": 65536}
                                                     -> {"ok": true, "info": {BlobInfo}}
    {"op": "status"}                                 -> {"ok": true, "status": {...}}
    {"op": "shutdown"}                               -> {"ok": true}

A failure replies ``{"ok": false, "error": "<message>", "kind": "<exception class>"}``.
The socket is created mode 0600: only root (the snapshotter, the CLI) may use it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ControlError, SnapshotterError
from ..host.sockets import bind_privately

log = logging.getLogger(__name__)

MAX_LINE = 16 << 20


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    handler: Handler


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
                reply = {"ok": True, **self.server.handler(request)}
            except Exception as e:
                if not isinstance(e, (SnapshotterError, ValueError, KeyError, OSError)):
                    log.exception("control request failed")
                reply = {"ok": False, "error": str(e), "kind": type(e).__name__}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


class ControlServer:
    """Serves `handler` on a unix socket from its own threads until `close`."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # Bound 0600 before anyone can connect (no process-wide umask change in a threaded daemon).
        with bind_privately(path) as private:
            self._server = _Server(private, _RequestHandler)
        self._server.handler = handler
        self._thread = threading.Thread(target=self._server.serve_forever, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def call(path: str, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the daemon at `path`; return its reply or raise `ControlError`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ControlError(
            f"cannot reach the device daemon at {path}: {e.strerror or e}; "
            "is `damselfly device-daemon` running?"
        ) from None
    try:
        reply: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise ControlError(f"the device daemon at {path} sent a malformed reply") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")), str(reply.get("kind")))
    return reply
