"""A loopback docker-registry (the demo's, the benchmarks' and the tests'), and the bytes it served.

The registry (Debian's ``docker-registry`` 2.8, the reference distribution registry) gets a free port on
127.0.0.1 and its own storage and config (JSON, which is YAML) under its directory; `auth` is a
registry auth section (htpasswd, token), for the tests. `stop` ends exactly the process it started, by
pid; `halt` and `resume` stop it and start it again on the same port and storage.

It can also listen elsewhere: `bind` is the address (a `netlab` node's, say) and `wrap` turns its argv
into the one to start (`NetNode.argv`, to run it inside the node's network namespace; the process is
still the registry itself, stopped by pid). A free port can only be probed in our own namespace, so
with `wrap` and an address other than 127.0.0.1 the port is `NETNS_PORT` (5000), free in a namespace
of its own, unless `port` names one; `port` also fixes the port anywhere else (tried once, no
probing). `host` and `url` name `bind`, and the readiness check reaches it from here (a lab's bridge
routes its subnet), so the registry must be reachable from this namespace.

With the access log on (the demo's), the log (Apache combined format: ``... "GET /v2/... HTTP/1.1" 200
1048576 ...``) says what was served: the size field is the body bytes the registry wrote for that
response, so the bytes served between two moments are the sum of the sizes of the lines appended in
between: counted at the registry, for every client.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from blockformat.digest import Digest
from p2p.auth import static_credentials
from p2p.manifest import OCI_MANIFEST
from p2p.registry import RegistryClient

from .procs import Service

REGISTRY_BIN = "/usr/bin/docker-registry"
#: One access-log line: method, path, status, body bytes ("-" for none).
ACCESS_LINE = re.compile(rb'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')
#: The port of a registry in another network namespace (see the module docstring).
NETNS_PORT = 5000
LOOPBACK = "127.0.0.1"


def free_port(bind: str = LOOPBACK) -> int:
    """A port free on `bind` (of this network namespace) right now."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((bind, 0))
        port: int = s.getsockname()[1]
        return port


class Registry(Service):
    """One docker-registry process (see the module docstring)."""

    config_name = "config.yml"

    def __init__(
        self,
        directory: Path,
        log: Path,
        *,
        auth: dict[str, Any] | None = None,
        access_log: bool = True,
        bind: str = LOOPBACK,
        wrap: Callable[[list[str]], list[str]] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(directory, log)
        self.auth = auth
        self.access_log = access_log
        self.bind = bind
        self.wrap = wrap
        self.fixed_port = port
        if port is None and wrap is not None and bind != LOOPBACK:
            self.fixed_port = NETNS_PORT  # another namespace: nothing to probe from here
        self.port = 0

    @property
    def host(self) -> str:
        address = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"{address}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.dir / "data"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": not self.access_log}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": uuid.uuid4().hex},
        }
        if self.auth is not None:
            config["auth"] = self.auth
        return config

    def error(self, message: str) -> Exception:
        """The exception for a registry that would not start (the tests' adds the log itself)."""
        return OSError(f"{message}; see {self.log}")

    def start(self, timeout: float = 20.0) -> Self:
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise OSError(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
        self.dir.mkdir(parents=True, exist_ok=True)
        why = None
        tries = 3 if self.fixed_port is None else 1  # a probed port can be taken before the registry binds
        for _ in range(tries):
            self.port = self.fixed_port if self.fixed_port is not None else free_port(self.bind)
            self.config_path.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
            why = self._spawn(timeout)
            if why is None:
                return self
            self.halt()
        where = self.host if self.fixed_port is not None else f"{self.bind} (tried {tries} ports)"
        raise self.error(f"docker-registry did not start on {where}: {why}")

    def _spawn(self, timeout: float) -> str | None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        argv = [REGISTRY_BIN, "serve", str(self.config_path)]
        return self.launch(self.wrap(argv) if self.wrap else argv, self._answers, timeout, env)

    def _answers(self) -> bool:
        # No proxy from the environment: the registry is on loopback or on a lab's bridge, here.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # 401 with auth: the API answers
        except OSError:
            return False

    def resume(self, timeout: float = 20.0) -> None:
        """Start the registry again with the configuration (port, storage) it had."""
        if self.proc is not None:
            raise OSError(f"the registry on {self.host} is running (pid {self.proc.pid})")
        why = self._spawn(timeout)
        if why is not None:
            self.halt()
            raise self.error(f"docker-registry did not start again on {self.host}: {why}")

    def stop(self) -> str | None:
        """Stop the process (SIGTERM, then SIGKILL, by pid); a note if it needed SIGKILL. `halt` does the
        same: port, storage and config stay for `resume`."""
        return self.halt()

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
