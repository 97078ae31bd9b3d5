"""A fault-injecting reverse proxy in front of the real registry.

Requests are forwarded to the registry unchanged, except that a queued `Fault` whose `path_contains`
matches the request path (and `method`, if given) is applied to it, `times` times, in queue order:

- ``status``: answer with `status` (and ``Retry-After: retry_after`` if set) without asking upstream;
- ``reset``: send the upstream status and headers and half the body, then reset the connection;
- ``stall``: send the upstream status and headers and half the body, then send nothing for `seconds`;
- ``drop``: forward the request upstream (so it takes effect), then reset without any answer;
- ``corrupt``: flip one byte in the middle of the upstream body (same length: only a digest check can tell).

Every request seen is recorded as ``(method, path, fault kind or "")``.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Literal

from .servers import HOP_BY_HOP, BackgroundServer, QuietHandler


@dataclass
class Fault:
    kind: Literal["status", "reset", "stall", "drop", "corrupt"]
    path_contains: str = "/blobs/"
    method: str | None = None
    times: int = 1
    status: int = 500
    retry_after: str | None = None
    seconds: float = 5.0


class FaultProxy(BackgroundServer):
    def __init__(self, upstream_host: str) -> None:
        self.upstream = upstream_host
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def handle_request(self) -> None:
                fault = owner._take(self.command, self.path)
                owner.seen.append((self.command, self.path, fault.kind if fault else ""))
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                if fault is not None and fault.kind == "status":
                    self.send_response(fault.status)
                    if fault.retry_after is not None:
                        self.send_header("Retry-After", fault.retry_after)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                # Host stays the proxy's: the registry builds absolute Location URLs from it, and uploads
                # must come back through the proxy.
                conn = http.client.HTTPConnection(owner.upstream, timeout=10)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    upstream_headers = resp.getheaders()
                finally:
                    conn.close()
                if fault is not None and fault.kind == "drop":
                    self._abort()
                    return
                if fault is not None and fault.kind == "corrupt" and data:
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
                self.send_response(resp.status, resp.reason)
                for k, v in upstream_headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                declared = dict((k.lower(), v) for k, v in upstream_headers).get("content-length")
                if self.command == "HEAD":
                    if declared is not None:
                        self.send_header("Content-Length", declared)
                    self.end_headers()
                    return
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault is not None and fault.kind in ("reset", "stall"):
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if fault.kind == "stall":
                        owner._stop.wait(fault.seconds)
                    self._abort()
                    return
                self.wfile.write(data)

            def _abort(self) -> None:
                # An abortive close (RST), as a crashed or cut-off peer would leave it.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.path_contains in path and (f.method is None or f.method == method):
                    f.times -= 1
                    if f.times <= 0:
                        self.faults.remove(f)
                    return f
        return None

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def faults_applied(self, kind: str) -> int:
        return sum(1 for _, _, k in self.seen if k == kind)

    def __enter__(self) -> FaultProxy:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # first: a stalled handler wakes up and ends its connection
        super().__exit__(*exc)
        time.sleep(0)  # let handler threads observe the stop event
