"""One cold start, measured: pull, then ``ctr run``, timed to the container's first output line.

Before it: ``sync`` and ``drop_caches`` (the page cache, dentries and inodes: what the registry, the
snapshotters and the container read comes from the disk or the network again). The caller has emptied
the node's own caches before (containerd's content and snapshots of the image, damselfly's device
cache), so nothing of the image is on the node.

Measured from the moment the pull starts:

- **first output**: seconds until ``ctr run`` printed the container's first line (its stdout is read
  as it streams, by a thread; the main thread waits in short slices so Ctrl-C stays immediate);
- **registry bytes**: body bytes the registry served (its access log, `Registry.served_since`);
- **node CPU**: CPU-seconds (user + system) of the node's cgroup: containerd and its shims,
  `damselfly serve` and its device daemon, ``ctr`` and ``damselfly rpull``. The container's own
  processes are in their own cgroup and not counted.

Bytes and CPU are read twice: at the first output line and when ``ctr run`` returned (the container
exited and was removed); the table uses the latter, the JSON result has both. A caller that runs
``ctr run`` without ``--rm`` (to read the device daemon's status while the container's snapshot still
holds its device) passes `after_run`: it runs when ``ctr run`` returned, inside the measured span, and
removes the container itself.

`LayerSources` is the other side of the registry's count: what a node's device daemon itself says it
fetched, from the registry and from peers (its peer network's counters, ``damselfly devices``), and
what it served to peers.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .procs import NodeCgroup
from .registry import Registry


class StartError(Exception):
    """A pull or a run failed; the message says which command and where its output is."""


@dataclass(frozen=True)
class StartResult:
    label: str
    first_output_s: float  # pull start -> first output line
    pull_s: float  # pull start -> pull command done
    total_s: float  # pull start -> ctr run returned
    registry_bytes: int  # until ctr run returned
    registry_requests: int
    node_cpu_s: float  # until ctr run returned
    registry_bytes_at_output: int
    node_cpu_s_at_output: float
    output: str


@dataclass(frozen=True)
class LayerSources:
    """A device daemon's own count of layer bytes, since it started: fetched from the registry, fetched
    from peers, served to peers (``p2p.fetched_bytes`` and ``p2p.upload_bytes`` of ``damselfly
    devices``; only what reached the node cache, so manifests and configs are not in it)."""

    registry_bytes: int
    peer_bytes: int
    uploaded_bytes: int

    @classmethod
    def of(cls, status: Mapping[str, Any]) -> LayerSources:
        """From a device daemon's status (`Serve.devices`); a daemon without the peer network has no
        upload count (0)."""
        p2p = status.get("p2p", {})
        fetched = p2p.get("fetched_bytes", {})
        return cls(
            registry_bytes=int(fetched.get("registry", 0)),
            peer_bytes=int(fetched.get("peer", 0)),
            uploaded_bytes=int(p2p.get("upload_bytes", 0)),
        )


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _pump(stream: IO[bytes], lines: queue.Queue[tuple[float, bytes] | None]) -> None:
    for line in iter(stream.readline, b""):
        lines.put((time.monotonic(), line))
    lines.put(None)


@dataclass
class Bench:
    """Where a cold start runs and is measured. `children` holds the running child process while it
    runs, so that an interrupted demo can stop it."""

    env: dict[str, str]
    registry: Registry
    cgroup: NodeCgroup
    log: Path
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    timeout: float = 900.0


def cold_start(
    bench: Bench,
    label: str,
    pull_argv: Sequence[str],
    run_argv: Sequence[str],
    expect: str,
    after_run: Callable[[], None] | None = None,
) -> StartResult:
    """Pull, run, measure (see the module docstring); `after_run`, if given, runs once ``ctr run``
    returned after the container's output (whatever its status), before the last readings."""
    env, registry, cgroup, log, children, timeout = (
        bench.env, bench.registry, bench.cgroup, bench.log, bench.children, bench.timeout
    )  # fmt: skip
    drop_caches()
    with log.open("ab") as out:
        out.write(f"\n== {label}: {' '.join(pull_argv)}\n".encode())
        out.flush()
        offset = registry.log_offset()
        cpu0 = cgroup.cpu_seconds()
        t0 = time.monotonic()
        pull = subprocess.Popen(
            list(pull_argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches it through the demo only
        )
        # In `children` until it ended: if anything goes wrong, the demo's cleanup stops it (SIGINT first).
        children.append(pull)
        try:
            status = pull.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StartError(f"{label}: the pull did not finish within {timeout:.0f}s; see {log}") from None
        children.remove(pull)
        pulled = time.monotonic()
        if status != 0:
            raise StartError(
                f"{label}: the pull ({pull_argv[-1]!r}...) exited with status {status}; see {log}"
            )

        out.write(f"== {label}: {' '.join(run_argv)}\n".encode())
        out.flush()
        run = subprocess.Popen(
            list(run_argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        children.append(run)
        assert run.stdout is not None
        lines: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(run.stdout, lines), daemon=True)
        reader.start()
        first = _next_line(lines, t0 + timeout, label)
        if first is None:
            run.wait(30)
            raise StartError(
                f"{label}: the container printed nothing (ctr run status {run.returncode}); see {log}"
            )
        t_first, first_line = first
        cpu_first = cgroup.cpu_seconds()
        bytes_first, _ = registry.served_since(offset)
        rest = []
        while (item := _next_line(lines, t0 + timeout, label)) is not None:
            rest.append(item[1])
        try:
            status = run.wait(60)
        except subprocess.TimeoutExpired:
            raise StartError(
                f"{label}: ctr run did not return after the container's output; see {log}"
            ) from None
        children.remove(run)
        if after_run is not None:
            after_run()
        t_end = time.monotonic()
        cpu_end = cgroup.cpu_seconds()
        served, requests = registry.served_since(offset)
        output = b"".join([first_line, *rest]).decode(errors="replace")
        out.write(f"== {label}: container output:\n{output}".encode())
    if status != 0:
        raise StartError(f"{label}: ctr run exited with status {status}; see {log}")
    if first_line.decode(errors="replace").strip() != expect:
        raise StartError(f"{label}: the container printed {first_line!r}, not {expect!r}; see {log}")
    return StartResult(
        label=label,
        first_output_s=t_first - t0,
        pull_s=pulled - t0,
        total_s=t_end - t0,
        registry_bytes=served,
        registry_requests=requests,
        node_cpu_s=cpu_end - cpu0,
        registry_bytes_at_output=bytes_first,
        node_cpu_s_at_output=cpu_first - cpu0,
        output=output,
    )


def _next_line(
    lines: queue.Queue[tuple[float, bytes] | None], deadline: float, label: str
) -> tuple[float, bytes] | None:
    while True:
        try:
            return lines.get(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise StartError(f"{label}: no output from the container in time") from None
