"""A loopback docker-registry for the demo, and the bytes it served, from its access log.

The registry (Debian's ``docker-registry`` 2.8, the reference distribution registry) gets a free port on
127.0.0.1, its own storage and config under the demo's run directory, and writes its access log (Apache
combined format: ``... "GET /v2/... HTTP/1.1" 200 1048576 ...``) to its log file. The size field is the
body bytes the registry wrote for that response, so the bytes served between two moments are the sum
of the sizes of the lines appended in between: counted at the registry, for every client.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from p2p.auth import static_credentials
from p2p.digest import Digest
from p2p.manifest import OCI_MANIFEST
from p2p.registry import RegistryClient

from .procs import stop_popen

REGISTRY_BIN = "/usr/bin/docker-registry"
#: One access-log line: method, path, status, body bytes ("-" for none).
ACCESS_LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Registry:
    """One docker-registry process (see the module docstring)."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.dir = directory
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 20.0) -> None:
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise OSError(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            config = {
                "version": "0.1",
                "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": str(self.dir / "data")},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                "http": {"addr": self.host, "secret": uuid.uuid4().hex},
            }
            cfg = self.dir / "config.yml"
            cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with self.log.open("ab") as out:
                self.proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # a Ctrl-C reaches it only through stop()
                )
            if self._ready(timeout):
                return
            self.stop()
        raise OSError(f"docker-registry did not start on 127.0.0.1 (tried 3 ports); see {self.log}")

    def _ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def log_offset(self) -> int:
        """Where the access log ends now: pass it to `served_since` later."""
        try:
            return self.log.stat().st_size
        except FileNotFoundError:
            return 0

    def served_since(self, offset: int) -> tuple[int, int]:
        """(body bytes, requests) of the responses logged after `offset`."""
        with self.log.open("rb") as f:
            f.seek(offset)
            data = f.read()
        total = requests = 0
        for line in data.split(b"\n")[:-1]:  # a line still being written has no newline yet
            m = ACCESS_LINE.match(line)
            if m is None:
                continue
            requests += 1
            if m.group(4) != b"-":
                total += int(m.group(4))
        return total, requests

    def stop(self) -> str | None:
        proc, self.proc = self.proc, None
        return stop_popen(proc) if proc is not None else None


# -- pushing an OCI layout as it is ---------------------------------------------------------------


class _CountingFile(io.FileIO):
    """A file that reports every byte read (the push reads each blob twice: to hash it, to upload it)."""

    def __init__(self, path: Path, advance: Callable[[int], None]) -> None:
        super().__init__(path, "rb")
        self._advance = advance

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._advance(len(data))
        return data


def layout_blob(layout: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return layout / "blobs" / algorithm / hexdigest


def push_layout(
    host: str, layout: Path, manifest_digest: str, repository: str, tag: str, advance: Callable[[int], None]
) -> int:
    """Push the image `manifest_digest` of OCI layout `layout` to the loopback registry `host` as
    ``repository:tag``, byte for byte (same blobs, same manifest, same digests: nothing is re-encoded).
    `advance` gets the bytes read (twice each blob's size in all). Returns the bytes of the blobs."""
    raw = layout_blob(layout, manifest_digest).read_bytes()
    doc = json.loads(raw)
    total = 0
    with RegistryClient(host, plain_http=True, credentials=static_credentials({})) as client:
        for desc in [doc["config"], *doc["layers"]]:
            with _CountingFile(layout_blob(layout, desc["digest"]), advance) as f:
                client.push_blob(repository, f, Digest(desc["digest"]))
            total += int(desc["size"])
        client.push_manifest(repository, raw, doc.get("mediaType", OCI_MANIFEST), tag)
    return total


def layer_bytes(ref: str) -> int:
    """The compressed size of the layers of image `ref` (``HOST/REPOSITORY:TAG``, loopback)."""
    host = ref.split("/", 1)[0]
    with RegistryClient(host, plain_http=True, credentials=static_credentials({})) as client:
        return sum(d.size for d in client.resolve(ref).manifest.layers)
