"""Test helpers: a real `damselfly serve` subprocess on a temporary root and socket, a gRPC client for it,
and real kernel mounts of what it returns (tests run as root). Processes and mounts are found and undone
with the demo's harness (`scripts.demolib.procs`)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from scripts.demolib.procs import mounts_below, spawn, unmount_below, wait_ready
from scripts.demolib.serve import damselfly_argv
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import mount_pb2


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    root: Path
    socket: Path
    log: Path
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.SnapshotsStub:
        return pb_grpc.SnapshotsStub(self.channel)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait for it; returns its exit status."""
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"damselfly serve ignored signal {sig}:\n{self.log_text()}") from None
        return self.proc.returncode


def start(
    tmp: Path,
    *extra: str,
    root: Path | None = None,
    socket: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Served:
    root = root or tmp / "root"
    socket = socket or tmp / "run" / "snapshotter.sock"
    log = tmp / f"serve-{time.monotonic_ns()}.log"
    argv = [*damselfly_argv(), "serve", "--root", str(root), "--address", str(socket), "--log-level", "debug"]
    if not any(a == "--state-dir" or a.startswith("--state-dir=") or a == "--config" for a in extra):
        argv += ["--state-dir", str(tmp / "state")]  # never the node's /run/damselfly
    proc = spawn([*argv, *extra], log, env)
    channel = grpc.insecure_channel(f"unix:{socket}")
    served = Served(proc, root, socket, log, channel)

    def answers() -> bool:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            return True
        except grpc.FutureTimeoutError:
            return False

    why = wait_ready(proc, lambda: socket.exists() and answers(), 30.0)
    if why is not None:
        if proc.poll() is None:
            served.stop(signal.SIGKILL)
        channel.close()
        raise AssertionError(f"damselfly serve on {socket} {why}:\n{served.log_text()}")
    return served


#: Mount points at or below a path, deepest first; and unmounting them all, by exact mount point.
mounts_under = mounts_below
unmount_under = unmount_below


@contextmanager
def serving(tmp: Path, *extra: str) -> Iterator[Served]:
    served = start(tmp, *extra)
    try:
        yield served
    finally:
        served.stop()
        unmount_under(tmp)


def md(namespace: str | None) -> list[tuple[str, str]]:
    return [("containerd-namespace", namespace)] if namespace is not None else []


def mount(mounts: Sequence[mount_pb2.Mount], target: Path) -> None:
    """Mount what Prepare/View/Mounts returned on `target`, as containerd's mount.All would."""
    for m in mounts:
        options = list(m.options)
        if m.type == "bind":
            cmd = ["mount", "-o", ",".join(options), m.source, str(target)]
        else:
            cmd = ["mount", "-t", m.type, "-o", ",".join(options), m.source, str(target)]
        subprocess.run(cmd, check=True, capture_output=True)


@contextmanager
def mounted(mounts: Sequence[mount_pb2.Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    mount(mounts, target)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, capture_output=True)


def prepare(
    stub: pb_grpc.SnapshotsStub, ns: str, key: str, parent: str = "", labels: dict[str, str] | None = None
) -> list[mount_pb2.Mount]:
    resp = stub.Prepare(
        pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {}), metadata=md(ns)
    )
    return list(resp.mounts)


def view(stub: pb_grpc.SnapshotsStub, ns: str, key: str, parent: str = "") -> list[mount_pb2.Mount]:
    return list(stub.View(pb.ViewSnapshotRequest(key=key, parent=parent), metadata=md(ns)).mounts)


def commit(
    stub: pb_grpc.SnapshotsStub, ns: str, key: str, name: str, labels: dict[str, str] | None = None
) -> None:
    stub.Commit(pb.CommitSnapshotRequest(key=key, name=name, labels=labels or {}), metadata=md(ns))


def names(stub: pb_grpc.SnapshotsStub, ns: str | None, *filters: str) -> list[str]:
    out = []
    for resp in stub.List(pb.ListSnapshotsRequest(filters=list(filters)), metadata=md(ns)):
        out += [i.name for i in resp.info]
    return sorted(out)


def remove_all(stub: pb_grpc.SnapshotsStub, ns: str) -> None:
    """Remove every snapshot of `ns`, children first."""
    while True:
        infos = [i for r in stub.List(pb.ListSnapshotsRequest(), metadata=md(ns)) for i in r.info]
        if not infos:
            return
        parents = {i.parent for i in infos}
        for i in infos:
            if i.name not in parents:
                stub.Remove(pb.RemoveSnapshotRequest(key=i.name), metadata=md(ns))
