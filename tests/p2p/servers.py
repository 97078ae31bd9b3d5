"""Tiny loopback HTTP servers that stand between the client and the real registry in tests.

- `RedirectServer`: answers every request with ``307`` to the same path on the registry (like a
  registry whose blobs live behind a CDN).
- `ForwardProxy`: a plain HTTP forward proxy (absolute-form request lines), counting what it forwards.
- `RawServer`: a socket server whose connection handler is a plain function, for stalls and trickles.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


class _Background:
    """Run a ThreadingHTTPServer in a daemon thread for the duration of a ``with`` block."""

    server: ThreadingHTTPServer

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> Any:
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class RedirectServer(_Background):
    def __init__(self, target: str, status: int = 307) -> None:
        self.redirects = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _redirect(self) -> None:
                owner.redirects += 1
                self.send_response(status)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self._redirect()

            def do_HEAD(self) -> None:
                self._redirect()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> RedirectServer:
        super().__enter__()
        return self


class ForwardProxy(_Background):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, absolute URL)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.scheme != "http" or not url.netloc:
                    self.send_error(400, "forward proxy wants absolute http:// URLs")
                    return
                owner.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(url.netloc, timeout=10)
                try:
                    target = url.path + (f"?{url.query}" if url.query else "")
                    conn.request(self.command, target, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and not (
                            k.lower() == "content-length" and self.command != "HEAD"
                        ):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def do_PUT(self) -> None:
                self._forward()

            def do_PATCH(self) -> None:
                self._forward()

            def do_DELETE(self) -> None:
                self._forward()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> ForwardProxy:
        super().__enter__()
        return self


class RawServer:
    """Accepts connections on loopback and hands each socket to `handler` in its own thread."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self.handler(conn)

    def __enter__(self) -> RawServer:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()
        self.sock.close()

    @property
    def stopping(self) -> threading.Event:
        return self._stop


def read_request_head(conn: socket.socket) -> bytes:
    """Read up to the end of an HTTP request's headers (bodies are not expected here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
