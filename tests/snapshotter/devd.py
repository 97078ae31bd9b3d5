"""Helpers for the device end-to-end tests: the device daemon as a process, a registry that can be
stopped and restarted on the same port, a TCP proxy that counts what the registry serves, pushing an
OCI layout, timed reads that cannot hang the test, and a ledger of everything the tests made.

Everything here is undone by exact identity (pid, path, device), never by a broad name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockformat.annotations import LayerAnnotations
from blockformat.chunkfile import BlobInfo
from blockformat.digest import Digest
from p2p.manifest import OCI_MANIFEST
from p2p.registry import RegistryClient
from scripts.demolib.procs import left_below, log_tail, mount_points, processes, spawn, wait_ready
from scripts.demolib.serve import stop_daemon
from snapshotter.device import control
from snapshotter.errors import ControlError
from snapshotter.image.blockimage import build_layer_from_dir, write_oci_layout
from tests.p2p.registry_server import RegistryServer

from .conftest import KernelResources
from .test_blockimage import make_tree

DAMSELFLY = Path(sys.executable).with_name("damselfly")
MiB = 1 << 20


# -- the ledger: what the tests made, for the final leak check -------------------------------------


@dataclass
class Ledger:
    """Roots of every directory the device tests used (state dirs, mount points, blobs)."""

    roots: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def root(self, path: Path) -> Path:
        self.roots.append(str(path.resolve()))
        return path

    def leaks(self) -> list[str]:
        """FUSE or other mounts, loop devices and processes below our roots that still exist."""
        found = left_below(*self.roots)
        for pid, argv in processes():
            if pid in self.pids and "device-daemon" in argv:
                found.append(f"device daemon {pid}: {' '.join(argv)}")
        return found


LEDGER = Ledger()


# -- the device daemon -----------------------------------------------------------------------------


class DeviceDaemon:
    """One `damselfly device-daemon` process for a state directory, and the CLI pointed at it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        read_timeout: float = 3.0,
        background_delay: float = 3600.0,
        unit_size: int = MiB,
        extra_args: tuple[str, ...] = (),
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.wrap = wrap  # e.g. a network namespace's ``nsenter`` (scripts/demolib/netlab)
        self.args = [
            *extra_args,
            "--read-timeout",
            str(read_timeout),
            "--background-delay",
            str(background_delay),
            "--unit-size",
            str(unit_size),
        ]
        self.read_timeout = read_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "devd-test.log"

    @property
    def socket(self) -> str:
        return str(self.state_dir / "devd.sock")

    @property
    def fuse_mountpoint(self) -> str:
        return str(self.state_dir / "dev")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DAMSELFLY_STATE_DIR": str(self.state_dir)}

    def log(self) -> str:
        return log_tail(self.log_path)

    def start(self, timeout: float = 20.0) -> DeviceDaemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(DAMSELFLY), "device-daemon", "--state-dir", str(self.state_dir), *self.args, "-v"]
        if self.wrap is not None:
            argv = self.wrap(argv)
        proc = self.proc = spawn(argv, self.log_path)
        LEDGER.pids.append(proc.pid)

        def answers() -> bool:
            try:
                reply = control.call(self.socket, {"op": "ping"}, timeout=2)
            except ControlError:
                return False
            assert reply["pid"] == proc.pid, f"another daemon answers on {self.socket}: {reply}"
            return True

        why = wait_ready(proc, answers, timeout)
        if why is not None:
            raise RuntimeError(f"device daemon {why}:\n{self.log()}")
        return self

    def call(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return control.call(self.socket, request, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """What `damselfly devices` prints, parsed."""
        doc: dict[str, Any] = json.loads(self.cli("devices").stdout)
        return doc

    def cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``damselfly ARGS`` against this daemon's state directory."""
        proc = subprocess.run(
            [DAMSELFLY, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"damselfly {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                f"stderr: {proc.stderr}\ndaemon log:\n{self.log()}"
            )
        return proc

    def wait_complete(self, timeout: float = 120.0) -> dict[str, Any]:
        """Poll `damselfly devices` until every registry blob is complete; return the last status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            blobs = [b for b in st["blobs"].values() if not b["local"]]
            if blobs and all(b["complete"] for b in blobs):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"background download did not complete in {timeout}s: {st}")
            time.sleep(0.2)

    def stop(self) -> list[str]:
        """Shut the daemon down (control op, then SIGTERM, then SIGKILL, by pid); return what it took
        beyond the polite request, and make sure its FUSE mount is gone (a leak is reported, then
        removed so later tests are not hurt)."""
        problems: list[str] = []
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            problems += stop_daemon(self.state_dir, proc.pid, timeout=30.0)
            proc.wait(timeout=10)  # gone: reap it
        if self.fuse_mountpoint in mount_points():
            problems.append(f"FUSE mount {self.fuse_mountpoint} left behind")
            subprocess.run(["umount", "--lazy", "--", self.fuse_mountpoint], check=False, capture_output=True)
        return problems


# -- a registry that can be stopped and started again ----------------------------------------------

#: A real registry whose process a test stops (`halt`) and starts again (`resume`) on the same port
#: and storage.
RestartableRegistry = RegistryServer


# -- a TCP proxy that counts the registry's bytes --------------------------------------------------


class CountingProxy:
    """A plain TCP relay to `upstream`; `served` counts every byte the upstream sent to clients
    (headers and bodies of all responses: what the registry served, not what the client kept)."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.served = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hung = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._sockets: list[socket.socket] = []
        self._held: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> CountingProxy:
        t = threading.Thread(target=self._accept, name="counting-proxy", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def hang(self) -> None:
        """Become a dead network: cut every relay, then accept connections and never answer them."""
        self._hung.set()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def unhang(self) -> None:
        """Relay again; the connections held meanwhile are closed (their clients retry)."""
        self._hung.clear()
        with self._lock:
            held, self._held = self._held, []
        for s in held:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.unhang()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._hung.is_set():
                with self._lock:
                    self._held.append(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for src, dst, count in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, count), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if count:
                    with self._lock:
                        self.served += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


# -- images ----------------------------------------------------------------------------------------


def push_layout(client: RegistryClient, repository: str, layout: Path, tag: str) -> Digest:
    """Push the only image of an OCI layout (config, layers, manifest) under `tag`."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    blobs = layout / "blobs" / "sha256"
    raw = (blobs / entry["digest"].partition(":")[2]).read_bytes()
    manifest = json.loads(raw)
    for desc in [manifest["config"], *manifest["layers"]]:
        with open(blobs / desc["digest"].partition(":")[2], "rb") as f:
            client.push_blob(repository, f, Digest(desc["digest"]))
    return client.push_manifest(repository, raw, OCI_MANIFEST, tag)


def make_many_files_tree(root: Path, files: int = 5000, seed: int = 11) -> None:
    """The tree of `test_blockimage.make_tree` (every kind of entry, modes, owners, xattrs) plus
    `files` more small files in nested directories, with symlinks among them."""
    make_tree(root, files=200, seed=seed)
    rng = random.Random(seed)
    many = root / "many"
    dirs = [many]
    many.mkdir()
    for i in range(60):
        d = rng.choice(dirs) / f"d{i:02d}"
        d.mkdir()
        os.chmod(d, rng.choice([0o755, 0o750, 0o700, 0o775]))
        dirs.append(d)
    made: list[Path] = []
    modes = [0o644, 0o600, 0o755, 0o444, 0o640, 0o4755, 0o2750, 0o777]
    owners = [(0, 0), (1000, 1000), (33, 33), (65534, 65534), (1000, 0)]
    for i in range(files):
        p = rng.choice(dirs) / f"f{i:05d}"
        if i % 25 == 0 and made:
            target = rng.choice(made)
            p.symlink_to(os.path.relpath(target, p.parent))
            os.lchown(p, *rng.choice(owners))
            continue
        size = rng.choice([0, 1, 17, 512, 1000, 2048, 4096, 4097, 8000, 12000, rng.randrange(40000)])
        p.write_bytes(rng.randbytes(size // 2) + b"x" * (size - size // 2))
        os.chmod(p, rng.choice(modes))
        os.chown(p, *rng.choice(owners))
        made.append(p)


def make_big_tree(root: Path, total: int, files: int = 3, seed: int = 5) -> None:
    """`files` incompressible random files of `total` bytes together, and a small text file."""
    root.mkdir(parents=True)
    rng = random.Random(seed)
    each = total // files
    for i in range(files):
        with open(root / f"big{i}.bin", "wb") as f:
            for _ in range(0, each, 8 * MiB):
                f.write(rng.randbytes(min(8 * MiB, each - f.tell())))
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("the small file of a big image\n" * 4)


# -- reads that cannot hang the test ---------------------------------------------------------------

_READER = """
import json, os, sys, time
path, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
t0 = time.monotonic()
try:
    n = len(os.pread(fd, length, offset))
    out = {"ok": True, "bytes": n}
except OSError as e:
    out = {"ok": False, "errno": e.errno}
out["elapsed"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""


@dataclass(frozen=True)
class TimedRead:
    ok: bool
    errno: int | None
    nbytes: int
    elapsed: float  # seconds the read itself took, measured in the reading process


def timed_read(path: Path, offset: int = 0, length: int = 65536, limit: float = 60.0) -> TimedRead:
    """Read `length` bytes at `offset` of `path` in a child process; a read still blocked after
    `limit` seconds fails the test (and the child is killed without waiting on it forever)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), str(offset), str(length)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
        raise AssertionError(f"a read of {path} was still blocked after {limit}s") from None
    if child.returncode != 0:
        raise AssertionError(f"reader of {path} failed: {err}")
    doc = json.loads(out)
    return TimedRead(doc["ok"], doc.get("errno"), doc.get("bytes", 0), doc["elapsed"])


def drop_page_cache(*paths: Path) -> None:
    """Forget the kernel's cached pages of these files, so the next read goes to the device again."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- a test's kernel objects and daemons -----------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    src: Path
    blob: Path
    info: BlobInfo
    annotations: LayerAnnotations
    layout: Path

    def image_bytes(self) -> int:
        """Every blob of the image (manifest, config, layers): what a full pull would transfer."""
        return sum(p.stat().st_size for p in (self.layout / "blobs" / "sha256").iterdir())


def build_image(src: Path, where: Path, vsize: int | None = None) -> BuiltImage:
    """A converted single-layer image of the tree `src`, as an OCI layout at ``where/layout``."""
    work = where / "build"
    work.mkdir(parents=True)
    blob = where / "layer.blob"
    info, annotations = build_layer_from_dir(src, blob, workdir=work, vsize=vsize)
    layout = where / "layout"
    write_oci_layout(layout, [(blob, info, annotations)])
    return BuiltImage(src, blob, info, annotations, layout)


class DeviceLab:
    """What one test makes in the kernel: device daemons, mount points and loop devices, all under
    `root`. `close` unmounts the mount points, detaches loop devices over files below `root` (the
    daemons' device files among them), then stops the daemons; it returns the problems it met."""

    def __init__(self, root: Path) -> None:
        self.root = LEDGER.root(root)
        self.kernel = KernelResources(root)
        self.daemons: list[DeviceDaemon] = []

    def daemon(self, state: str = "state", **settings: Any) -> DeviceDaemon:
        d = DeviceDaemon(self.root / state, **settings).start()
        self.daemons.append(d)
        return d

    def stop(self, daemon: DeviceDaemon) -> None:
        """Stop `daemon` now; it must go with the polite request and take its FUSE mount along."""
        self.daemons.remove(daemon)
        problems = daemon.stop()
        assert not problems, problems

    def mount_point(self, name: str) -> Path:
        return self.kernel.mount_point(self.root / name)

    def close(self) -> list[str]:
        self.kernel.cleanup()
        problems: list[str] = []
        for d in reversed(self.daemons):
            problems += d.stop()
        return problems
