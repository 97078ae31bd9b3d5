"""Helpers of the peer-network tests: node configs, the cluster secret, an image in a registry, and fake
peers (one that lies, one that never answers) to put in a node's tree.

Real device daemons (`tests.snapshotter.devd.DeviceDaemon`) run each node; everything here is undone
by exact identity (the server threads it started, the files below the test's directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from p2p.peerauth import Signer
from p2p.registry import RegistryClient
from tests.snapshotter.devd import MiB, build_image, make_big_tree, push_layout

SECRET = b"the-test-fleet-secret-0123456789"


def write_secret(path: Path, secret: bytes = SECRET) -> Path:
    path.write_bytes(secret + b"\n")
    os.chmod(path, 0o600)
    return path


def node_config(path: Path, listen: str, peers: list[str], secret_file: Path, **p2p: Any) -> Path:
    """A config file for one node: the registry over plain HTTP, the peer network on."""
    keys = {
        "enabled": True,
        "listen": listen,
        "peers": peers,
        "secret_file": str(secret_file),
        "health_interval": 1.0,
        "registries": ["*"],  # any: the tests' registries are loopback ports only they know
        **p2p,
    }
    lines = ["[remote]", "plain_http = true", "", "[p2p]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True)
class PushedImage:
    ref: str
    tree: Path
    layer_digest: str
    layer_size: int
    index_digest: str


def push_big_image(where: Path, registry: str, total: int, name: str = "big") -> PushedImage:
    """A converted one-layer image of `total` bytes of incompressible files, pushed as NAME:v1."""
    tree = where / "tree"
    make_big_tree(tree, total)
    img = build_image(tree, where / "img")
    push_layout(RegistryClient(registry, plain_http=True), name, img.layout, "v1")
    layer = img.blob.read_bytes()
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    return PushedImage(f"{registry}/{name}:v1", tree, digest, len(layer), img.info.index_digest)


def signed_get(
    signer: Signer, target: str, range_value: str = "", to: str = "", **extra: str
) -> dict[str, str]:
    """The headers of a signed peer GET for member `to` (what `p2p.peerclient` sends)."""
    headers = {k.replace("_", "-"): v for k, v in extra.items()}
    if to:
        headers["x-damselfly-to"] = to
    headers.update(signer.headers("GET", target, range_value, headers))
    if range_value:
        headers["range"] = range_value
    return headers


class FakePeer:
    """An HTTP server on loopback that plays a peer. ``liar``: answers every range with random bytes of
    the right length (a 206 that only a chunk check can catch); ``hang``: accepts and never answers.
    Both answer health checks, so the node keeps them in its trees."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        self.headers: list[dict[str, str]] = []  # of every blob request, names lowercased
        self._release = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/v1/health"):
                    body = json.dumps({"id": "fake"}).encode()
                    self.send_response(200)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                peer.requests.append(self.path)
                peer.headers.append({k.lower(): v for k, v in self.headers.items()})
                if peer.mode == "hang":
                    peer._release.wait(120)
                    return
                first, last = (int(x) for x in self.headers["range"].split("=")[1].split("-"))
                size = int(self.path.split("size=")[1].split("&")[0])
                body = random.randbytes(last - first + 1)
                self.send_response(206)
                self.send_header("content-length", str(len(body)))
                self.send_header("content-range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakePeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on loopback (closed again: a daemon binds each next)."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)


__all__ = ["MiB"]
