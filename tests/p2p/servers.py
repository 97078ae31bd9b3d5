"""Tiny loopback HTTP servers that stand between the client and the real registry in tests.

- `RedirectServer`: answers every request with ``307`` to the same path on the registry (like a
  registry whose blobs live behind a CDN).
- `ForwardProxy`: a plain HTTP forward proxy (absolute-form request lines), counting what it forwards.
- `RawServer`: a socket server whose connection handler is a plain function, for stalls and trickles.
- `AuthProbe`: a registry stand-in that wants credentials and is its own token server, over HTTP or
  HTTPS, recording every request — to prove where credentials go (and where they do not).

Their common parts, also used by `faultproxy.FaultProxy` and `registry_server.TokenServer`:
`BackgroundServer` (a ThreadingHTTPServer in a daemon thread for a ``with`` block), `QuietHandler` (a
handler that logs nothing and sends every method to one function) and `serve_tls`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

#: Headers that belong to one connection, never forwarded by a proxy (RFC 9110, section 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


def serve_tls(server: ThreadingHTTPServer, context: ssl.SSLContext) -> None:
    """Make `server` speak HTTPS. The handshake happens on the first read, in the request's own thread,
    so a client that stalls in it does not hold up accept()."""
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing and hands every method (GET, HEAD, POST, PUT, PATCH, DELETE)
    to `handle_request`."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_request(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self.handle_request()

    def do_HEAD(self) -> None:
        self.handle_request()

    def do_POST(self) -> None:
        self.handle_request()

    def do_PUT(self) -> None:
        self.handle_request()

    def do_PATCH(self) -> None:
        self.handle_request()

    def do_DELETE(self) -> None:
        self.handle_request()


class BackgroundServer:
    """Run a ThreadingHTTPServer in a daemon thread for the duration of a ``with`` block."""

    server: ThreadingHTTPServer
    scheme = "http"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def __enter__(self) -> Any:
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class RedirectServer(BackgroundServer):
    def __init__(self, target: str, status: int = 307) -> None:
        self.redirects = 0
        owner = self

        class Handler(QuietHandler):
            def handle_request(self) -> None:
                owner.redirects += 1
                self.send_response(status)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def __enter__(self) -> RedirectServer:
        super().__enter__()
        return self


class ForwardProxy(BackgroundServer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, absolute URL)
        owner = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def handle_request(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.scheme != "http" or not url.netloc:
                    self.send_error(400, "forward proxy wants absolute http:// URLs")
                    return
                owner.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection(url.netloc, timeout=10)
                try:
                    target = url.path + (f"?{url.query}" if url.query else "")
                    conn.request(self.command, target, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP_BY_HOP and not (
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
        self.sock.settimeout(0.1)  # before the thread starts: __exit__ may close the socket at once
        self.connections = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
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
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # it notices the stop within its accept timeout
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


@dataclass
class Seen:
    """One request as it reached an `AuthProbe`."""

    method: str
    path: str
    authorization: str | None
    body: bytes


class AuthProbe(BackgroundServer):
    """A registry that wants credentials, and a token server, in one loopback server (HTTPS with `tls`).

    Registry side, for ``/v2/<name>/blobs/<digest>``:

    - `auth` ``"bearer"``: a request with ``Bearer user:<name>`` (a token some probe issued to a user in
      `users`; ``Bearer anonymous`` too when `public`) is served; any other gets ``401`` with
      ``WWW-Authenticate: Bearer realm="<realm>"``. `realm` is this server's own ``/token`` unless a test
      points it elsewhere. ``"basic"``: ``Basic`` with a password from `users`, else ``401 Basic``.
      ``"none"``: no authentication asked (a storage backend).
    - Served means: ``GET`` → `blob` (or ``307`` to ``blob_redirect + path`` when set), ``HEAD`` → ``404``,
      ``POST …/blobs/uploads/`` → ``202`` with ``Location: upload_location``, ``PUT`` → ``201``.

    Token side, ``/token`` and ``/token-moved``: a GET with ``Basic`` credentials from `users`, or a POST with
    a refresh-token form whose token is in `refresh_tokens`, gets ``user:<name>``; anything else gets
    ``anonymous``. With `token_redirect` set, ``/token`` answers ``307`` there instead.

    `seen` records every request before it is looked at.
    """

    def __init__(
        self,
        auth: Literal["bearer", "basic", "none"] = "bearer",
        *,
        users: dict[str, str] | None = None,
        refresh_tokens: dict[str, str] | None = None,
        blob: bytes = b"",
        public: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.auth = auth
        self.users = users or {}
        self.refresh_tokens = refresh_tokens or {}
        self.blob = blob
        self.public = public
        self.seen: list[Seen] = []
        self.token_redirect: str | None = None
        self.blob_redirect: str | None = None
        self.upload_location: str | None = None
        owner = self

        class Handler(QuietHandler):
            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else b""
                owner.seen.append(Seen(self.command, self.path, self.headers.get("Authorization"), body))
                return body

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _basic_user(self) -> str | None:
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Basic "):
                    return None
                name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                return name if name in owner.users and owner.users[name] == password else None

            def _token(self, body: bytes) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/token" and owner.token_redirect is not None:
                    self._send(307, headers={"Location": owner.token_redirect})
                    return
                if path not in ("/token", "/token-moved"):
                    self._send(404)
                    return
                if self.command == "POST":
                    form = urllib.parse.parse_qs(body.decode())
                    user = owner.refresh_tokens.get(form.get("refresh_token", [""])[0])
                else:
                    user = self._basic_user()
                token = f"user:{user}" if user else "anonymous"
                doc = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
                self._send(200, doc, {"Content-Type": "application/json"})

            def _authorized(self) -> bool:
                if owner.auth == "none":
                    return True
                auth = self.headers.get("Authorization", "")
                if owner.auth == "basic":
                    return self._basic_user() is not None
                token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
                if token == "anonymous":
                    return owner.public
                return token is not None and token.removeprefix("user:") in owner.users

            def _registry(self) -> None:
                if not self._authorized():
                    challenge = (
                        'Basic realm="probe"' if owner.auth == "basic" else f'Bearer realm="{owner.realm}"'
                    )
                    error = {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
                    self._send(401, json.dumps(error).encode(), {"WWW-Authenticate": challenge})
                elif self.command == "GET" and owner.blob_redirect is not None:
                    self._send(307, headers={"Location": owner.blob_redirect + self.path})
                elif self.command == "GET":
                    self._send(200, owner.blob, {"Content-Type": "application/octet-stream"})
                elif self.command == "POST" and owner.upload_location is not None:
                    self._send(202, headers={"Location": owner.upload_location})
                elif self.command == "PUT":
                    self._send(201)
                else:
                    self._send(404)

            def handle_request(self) -> None:
                body = self._record()
                if self.path.startswith("/token"):
                    self._token(body)
                else:
                    self._registry()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            serve_tls(self.server, tls)
            self.scheme = "https"
        self.realm = f"{self.url}/token"

    def __enter__(self) -> AuthProbe:
        super().__enter__()
        return self

    def credentials_seen(self, secrets: list[str]) -> list[Seen]:
        """The requests that carried credentials: an Authorization header other than an anonymous token
        (a user's token is as good as a password), or any of `secrets` in their body or URL."""
        return [
            r
            for r in self.seen
            if r.authorization not in (None, "Bearer anonymous")
            or any(x.encode() in r.body or x in r.path for x in secrets)
        ]
