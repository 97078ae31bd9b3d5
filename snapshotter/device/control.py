"""The device daemon's control API: JSON lines over a unix socket.

One request per line, one reply per line::

    {"op": "ping"}                                   -> {"ok": true, "pid": 1234}
    {"op": "attach", "spec": {DeviceSpec}}           -> {"ok": true, "path": "<state>/dev/NAME"}
    {"op": "detach", "name": "NAME"}                 -> {"ok": true}
    {"op": "commit", "name": "NAME", "out": "/path", "codec": "lz4", "chunk_size": 65536}
                                                     -> {"ok": true, "info": {BlobInfo}}
    {"op": "status"}                                 -> {"ok": true, "status": {...}}
    {"op": "credentials", "entries": [{"registry": "r.example", "repository": "team/app",
        "username": "...", "password": "...", "identity_token": "", "registry_token": ""}]}
                                                     -> {"ok": true, "changed": 1}

``credentials`` hands the daemon the credentials `damselfly serve` got from CRI ``PullImage`` calls
(`p2p.keychain`): kept in the daemon's memory only, never logged (a failed request's reply and log
name no secret).
    {"op": "shutdown"}                               -> {"ok": true}

A failure replies ``{"ok": false, "error": "<message>", "kind": "<exception class>", "fields": {...}}``;
`call` raises it again on the client's side as the same class with the same fields (`WIRE_ERRORS`), so
a corrupt blob found by the daemon is a `CorruptBlobError` (exit 3) in the CLI that asked, not a
generic `ControlError`. Other kinds arrive as `ControlError(message, kind)`.
The socket is bound mode 0600 (`host.sockets`): only root (the snapshotter, the CLI) may use it.
Clients use `snapshotter.device.client.DeviceClient`, not this module.
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

from blockformat.errors import (
    BlockFormatError,
    CorruptBlobError,
    InvalidArgumentError,
    SourceError,
    TruncatedBlobError,
    UnsupportedFormatError,
)
from p2p.errors import CacheError, P2PError

from ..errors import ControlError, DeviceError, ImageError, LayerError, MountError, SnapshotterError
from ..host.sockets import bind_privately

log = logging.getLogger(__name__)

MAX_LINE = 16 << 20


Handler = Callable[[dict[str, Any]], dict[str, Any]]

#: Exceptions that cross the socket as themselves: class -> the constructor arguments, by attribute
#: name (empty: the message is the only argument).
WIRE_ERRORS: dict[str, tuple[type[Exception], tuple[str, ...]]] = {
    cls.__name__: (cls, fields)
    for cls, fields in (
        (CorruptBlobError, ("blob", "offset", "what", "expected", "got", "remedy")),
        (TruncatedBlobError, ("blob", "offset", "what", "expected", "got", "remedy")),
        (SourceError, ("blob", "offset", "length", "cause")),
        (UnsupportedFormatError, ()),
        (InvalidArgumentError, ()),
        (CacheError, ()),
        (DeviceError, ()),
        (ImageError, ("where", "why", "remedy")),
        (LayerError, ("layer", "entry", "why", "remedy")),
        (MountError, ("what", "command", "returncode", "stderr", "remedy")),
    )
}


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return str(value)


def error_reply(e: BaseException) -> dict[str, Any]:
    """The reply for a failed request: message, class, and the fields to raise it again with."""
    reply: dict[str, Any] = {"ok": False, "error": str(e), "kind": type(e).__name__}
    known = WIRE_ERRORS.get(type(e).__name__)
    if known is not None and type(e) is known[0]:
        reply["fields"] = {name: _jsonable(getattr(e, name, None)) for name in known[1]}
    return reply


def error_from_reply(reply: dict[str, Any]) -> Exception:
    """The exception a failed reply stands for (`error_reply` in reverse)."""
    message, kind = str(reply.get("error")), str(reply.get("kind"))
    known = WIRE_ERRORS.get(kind)
    fields = reply.get("fields")
    if known is None or not isinstance(fields, dict):
        return ControlError(message, kind)
    cls, names = known
    try:
        return cls(**{n: fields[n] for n in names}) if names else cls(message)
    except (KeyError, TypeError):
        return ControlError(message, kind)


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
                if not isinstance(
                    e, SnapshotterError | BlockFormatError | P2PError | ValueError | KeyError | OSError
                ):
                    log.exception("control request failed")
                reply = error_reply(e)
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


#: The longest path `connect` takes as it is (``sockaddr_un.sun_path`` holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107


def _connect(s: socket.socket, path: str) -> None:
    """Connect to the socket at `path`, however long the state directory's path: a longer one is
    reached through an ``O_PATH`` descriptor of its directory (the server binds it the same way,
    `host.sockets.bind_privately`)."""
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        s.connect(path)
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        s.connect(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
    finally:
        os.close(fd)


def call(path: str, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the daemon at `path`; return its reply or raise `ControlError`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            _connect(s, path)
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
        raise error_from_reply(reply)
    return reply
