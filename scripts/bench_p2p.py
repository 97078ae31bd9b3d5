#!/usr/bin/env python3
"""Benchmark of the peer network (``p2p``): N nodes start the same image at once over shaped links.

The issue's acceptance item and docs/p2p.md (the distribution-time model of the P2P reference, §5). The
script

1. builds (once, cached in ``--workdir``) a converted single-layer image of ``--mb`` MB of incompressible
   data (`build_layer_from_dir` + `write_oci_layout`, as the tests' ``build_image`` does);
2. for every run, makes a fresh `Fleet` (``scripts/demolib/fleet``): a new lab of network namespaces,
   a new registry in a namespace of its own, N new device daemons with empty state; the registry's link
   and every node's link shaped by tbf to the same rate B (``--mbit``, both directions); pushes the
   image (not timed);
3. attaches and mounts the image on every node at the same moment (one thread per node, released
   together; ``[device] background_delay = 0``, so each node's background download starts at once)
   and times from that moment until every node's layer blob is complete and verified (polled on each
   daemon's control socket every 0.1 s). Registry egress is the body bytes in the registry's access log
   over the run; node CPU is the daemons' user + system time over the run (``/proc/PID/stat``);
4. runs P2P (``[p2p] enabled``, all nodes static members of each other) and direct pulls (``enabled =
   false``: each node fetches from the registry itself) for N = ``--nodes``, ``--reps`` times each, P2P
   and direct alternating within each N; then a fan-out sweep: P2P at N = ``--sweep-nodes`` for each
   ``[p2p] fanout`` in ``--fanouts``, the fan-outs round-robin;
5. writes medians to ``bench/results/p2p.md`` (next to the chunked lower bound T >= S/B +
   (ceil(log2(N+1)) - 1) c/B, with c = 4 MiB, the background download's request size), the raw runs to
   ``bench/results/p2p.json`` and a plot to ``bench/results/p2p.png``.

The mount is done here, not by ``damselfly mount``: the image's device spec is resolved once before the
clock starts (as containerd resolves the manifest before it asks the snapshotter for the layers) and
each thread then attaches the device on its node's control socket and loop-mounts it read-only, which is
what ``damselfly mount`` does after its own start. N ``damselfly`` processes starting at once cost about
a CPU second each, which on a small machine would be timed instead of the distribution;
``--cli-mount`` uses ``FleetNode.mount`` (the command) instead.

Needs root (network namespaces, tbf, FUSE, loop devices) and ``docker-registry``. Everything is undone
by pid and exact path after every run, also on Ctrl-C, SIGTERM or a failed run (`Fleet.close`).
``--keep-logs DIR`` copies every run's daemon logs, their final ``damselfly devices`` status and the
registry's access log to DIR (a failed run's go to ``--workdir``/failed anyway); ``--p2p-set KEY=VALUE``
sets another ``[p2p]`` key on every node; ``--from-json`` renders the report and plot of a saved JSON
again. Run ``.venv/bin/python scripts/bench_p2p.py --help`` for the options; ``--quick`` is a smaller run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from demolib.fleet import Fleet, FleetNode
from demolib.netlab import NetLabError
from demolib.procs import left_below
from demolib.registry import REGISTRY_BIN, push_layout
from demolib.report import git, loadavg, machine, publish
from matplotlib.figure import Figure

from p2p.tree import ancestors, rendezvous
from snapshotter.device import control
from snapshotter.device.client import DeviceClient
from snapshotter.errors import ControlError
from snapshotter.host.mounts import mount_loop
from snapshotter.image.blockimage import build_layer_from_dir, write_oci_layout
from snapshotter.image.spec import device_spec_for

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000  # sizes and rates in decimal units, as tc's "mbit"
MIB = 1 << 20
#: c in the bound: `BackgroundDownload` asks for about 4 MiB per request (p2p/background.py); the cache's
#: unit (64 KiB) only sets how those bytes are verified and marked present.
FETCH_UNIT = 4 * MIB
OUTPUT = REPO / "bench" / "results" / "p2p.md"
WORK = REPO / "bench" / "work" / "p2p"
REPOSITORY = "bench/p2p"
#: What ``damselfly mount`` mounts a device with (snapshotter/cli/device.py).
MOUNT_OPTIONS = ("ro", "noload", "nosuid", "nodev")
POLL = 0.1
MOUNT_CLI = "`damselfly mount`, one process per node"
MOUNT_DIRECT = "control-socket attach and loop mount, the device spec resolved once before the clock starts"
#: The issue's aims: registry egress within this many copies, completion within this many bounds.
AIM_EGRESS = 1.05
AIM_BOUND = 2.0
FILES = 3
#: The packages the device daemons run.
PRODUCT = ("blockformat", "p2p", "snapshotter")


def log(msg: str) -> None:
    print(f"[bench_p2p {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# -- the image ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    layout: Path
    manifest: str  # digest of the manifest in the layout
    layer: str  # digest of the one layer blob
    size: int  # S: the layer blob's bytes
    data_bytes: int  # random bytes in the tree


def build_image(work: Path, mb: int, seed: int = 5) -> Image:
    """A converted one-layer image of `mb` MB of random files (built once, cached in `work`)."""
    where = work / f"image-{mb}MB"
    meta = where / "image.json"
    if meta.exists():
        doc = json.loads(meta.read_text())
        image = Image(**{**doc, "layout": Path(doc["layout"])})
        if image.layout.is_dir():
            return image
    if where.exists():
        shutil.rmtree(where)
    tree, build = where / "tree", where / "build"
    tree.mkdir(parents=True)
    build.mkdir()
    total = mb * MB
    log(f"building a {mb} MB image of random files in {where}")
    rng = random.Random(seed)
    for i in range(FILES):
        each = total // FILES
        with open(tree / f"big{i}.bin", "wb") as f:
            while f.tell() < each:
                f.write(rng.randbytes(min(8 * MIB, each - f.tell())))
    (tree / "etc").mkdir()
    (tree / "etc" / "motd").write_text("the small file of a big image\n")
    blob = where / "layer.blob"
    info, annotations = build_layer_from_dir(tree, blob, workdir=build)
    layout = where / "layout"
    manifest = write_oci_layout(layout, [(blob, info, annotations)])
    shutil.rmtree(tree)
    shutil.rmtree(build)
    blob.unlink()  # the layout holds it (hard link or copy)
    image = Image(layout, str(manifest), str(info.blob_digest), info.blob_size, total - total % FILES)
    meta.write_text(json.dumps({**asdict(image), "layout": str(layout)}, indent=1) + "\n")
    return image


# -- one run --------------------------------------------------------------------------------------------


@dataclass
class NodeResult:
    label: str
    address: str
    depth: int  # edges from the blob's tree root (P2P), 0 for direct pulls
    mount_s: float  # until its mount returned (the first lazy reads served)
    complete_s: float  # until its layer blob was complete and verified
    cpu_s: float
    link_down_bytes: int  # what its link delivered to it until it was complete (IP packets)
    link_up_bytes: int  # what it sent over its link during the whole run
    registry_bytes: int
    peer_bytes: int
    upload_bytes: int
    bad_peers: int
    demotions: int
    peer_errors: dict[str, int]


@dataclass
class Run:
    label: str
    mode: str  # "p2p" or "direct"
    nodes: int
    fanout: int
    seconds: float = math.nan  # until every node was complete
    registry_bytes: int = 0  # body bytes in the registry's access log
    registry_requests: int = 0
    registry_cpu_s: float = 0.0
    busy: float = 0.0  # share of the machine's CPU time (all CPUs, all processes) busy over the run
    per_node: list[NodeResult] = field(default_factory=list)
    error: str = ""

    @property
    def node_cpu_s(self) -> float:
        return sum(n.cpu_s for n in self.per_node)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat; idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def node_status(node: FleetNode) -> dict[str, Any]:
    """What ``damselfly devices`` prints, from the control socket (no CLI process to start)."""
    status: dict[str, Any] = control.call(str(node.state / "devd.sock"), {"op": "status"}, timeout=10)[
        "status"
    ]
    return status


def layer_complete(status: dict[str, Any], digest: str) -> bool:
    blob = status.get("blobs", {}).get(digest)
    return bool(blob) and bool(blob.get("complete")) and bool(blob.get("verified"))


def depths(digest: str, nodes: Sequence[FleetNode], fanout: int) -> dict[str, int]:
    order = rendezvous(digest, [n.address for n in nodes])
    return {n.label: len(ancestors(order, n.address, fanout)) for n in nodes}


def start_all(nodes: Sequence[FleetNode]) -> None:
    """Start the daemons in parallel (each start is mostly Python's import time)."""
    errors: list[BaseException] = []

    def one(n: FleetNode) -> None:
        try:
            n.start(timeout=60)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in nodes]
    try:
        for t in threads:
            t.start()
    finally:  # also on Ctrl-C: no daemon may be spawned after the cleanup has stopped the others
        for t in threads:
            if t.ident is not None:
                t.join()
    if errors:
        raise errors[0]


def wait_members_up(nodes: Sequence[FleetNode], timeout: float) -> None:
    """Wait until every node sees every other as up: daemons started together mark the ones that were
    not listening yet as down until their next health check, and a tree built then would differ."""
    deadline = time.monotonic() + timeout
    while True:
        down = {n.label: node_status(n).get("p2p", {}).get("down", {}) for n in nodes}
        down = {k: v for k, v in down.items() if v}
        if not down:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"members still down after {timeout:.0f} s: {down}")
        time.sleep(0.2)


def mount_at_once(
    nodes: Sequence[FleetNode], mount: Callable[[FleetNode, Path], None], root: Path
) -> tuple[float, dict[str, float]]:
    """Mount on every node at the same moment (threads released by a barrier); (start, seconds each
    mount took). A failed mount raises once every thread has ended."""
    barrier = threading.Barrier(len(nodes) + 1)
    took: dict[str, float] = {}
    errors: list[BaseException] = []
    t0 = 0.0

    def one(n: FleetNode) -> None:
        try:
            barrier.wait(30)
            mount(n, root / n.label)
            took[n.label] = time.monotonic() - t0
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in nodes]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        barrier.wait(30)
    finally:  # also on Ctrl-C: no mount may land after the cleanup has unmounted
        for t in threads:
            t.join(300)
    if errors:
        raise RuntimeError(f"mount failed: {errors[0]}") from errors[0]
    return t0, took


def wait_complete(
    nodes: Sequence[FleetNode], digest: str, t0: float, timeout: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds from `t0` until each node's layer was complete and verified (polled every `POLL`), and
    the bytes its link had delivered to it by then (its veth's counter)."""
    done: dict[str, float] = {}
    down: dict[str, int] = {}
    pending = list(nodes)
    while pending:
        now = time.monotonic()
        still = []
        for n in pending:
            if layer_complete(node_status(n), digest):
                done[n.label] = now - t0
                down[n.label] = n.net.tx_bytes()
            else:
                still.append(n)
        pending = still
        if pending and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"nodes {[n.label for n in pending]} not complete after {timeout:.0f} s")
        if pending:
            time.sleep(POLL)
    return done, down


class Bench:
    """What every run shares: the image, the options, where logs go."""

    def __init__(self, image: Image, args: argparse.Namespace) -> None:
        self.image = image
        self.args = args
        self.mbit: float = args.mbit
        self.tmp = Path(args.tmp)

    def run(self, label: str, mode: str, n: int, fanout: int) -> Run:
        run = Run(label, mode, n, fanout)
        where = Path(tempfile.mkdtemp(prefix="bench-p2p-", dir=self.tmp))
        fleet = None
        try:
            fleet = Fleet(where / "fleet", registry_mbit=self.mbit, node_mbit=self.mbit)
            device = {"background_delay": 0.0, "read_timeout": 30.0}
            keys = {**dict(self.args.p2p_set), "fanout": fanout}
            nodes = fleet.add_nodes(n, p2p=mode == "p2p", device=device, **keys)
            start_all(nodes)
            self._measure(run, fleet, nodes, fleet.dir / "mnt")  # below the fleet: `close` sweeps it
        except Exception as e:
            run.error = f"{type(e).__name__}: {e}"
            log(f"{label}: FAILED: {run.error}")
        finally:
            with signals_held():  # a second Ctrl-C must not leave half a fleet behind
                keep = self.args.keep_logs
                if fleet is not None and (keep is not None or run.error):
                    self._keep_logs(fleet, keep or self.args.workdir / "failed", label)
                notes, leaks = close_fleet(fleet) if fleet is not None else ([], [])
                for note in notes:
                    log(f"{label}: cleanup: {note}")
                leaks += left_below(where)  # mounts, loop devices, sockets the close could not undo
                if leaks:
                    raise RuntimeError(f"{label}: cleanup left {leaks}; remove them, then {where}")
                shutil.rmtree(where, ignore_errors=True)
        return run

    def _measure(self, run: Run, fleet: Fleet, nodes: list[FleetNode], mnt: Path) -> None:
        img = self.image
        push_layout(fleet.registry_host, img.layout, img.manifest, REPOSITORY, "v1", lambda _n: None)
        ref = f"{fleet.registry_host}/{REPOSITORY}:v1"
        offset = fleet.registry.log_offset()
        if self.args.cli_mount:

            def mount(node: FleetNode, mp: Path) -> None:
                node.mount(ref, mp)

        else:
            spec = device_spec_for(ref, plain_http=True)

            def mount(node: FleetNode, mp: Path) -> None:
                mp.mkdir(parents=True, exist_ok=True)
                node.mounts.append(mp)  # `FleetNode.stop` unmounts it
                path = DeviceClient(str(node.state)).attach(spec)
                mount_loop(path, mp, "ext4", MOUNT_OPTIONS)

        if run.mode == "p2p":
            wait_members_up(nodes, 30.0)
        pids = {n.label: n.proc.pid if n.proc is not None else None for n in nodes}
        cpu0 = {label: cpu_seconds(pid) for label, pid in pids.items()}
        reg0 = cpu_seconds(fleet.registry.pid)
        busy0, total0 = cpu_times()
        link0 = {n.label: (n.net.tx_bytes(), n.net.rx_bytes()) for n in nodes}
        t0, mounted = mount_at_once(nodes, mount, mnt)
        done, down = wait_complete(nodes, img.layer, t0, self.args.timeout)
        run.seconds = max(done.values())
        up = {n.label: n.net.rx_bytes() - link0[n.label][1] for n in nodes}
        busy1, total1 = cpu_times()
        run.busy = (busy1 - busy0) / max(1, total1 - total0)
        cpu1 = {label: cpu_seconds(pid) for label, pid in pids.items()}
        run.registry_cpu_s = cpu_seconds(fleet.registry.pid) - reg0
        time.sleep(0.5)  # the registry logs a response once it has sent it
        run.registry_bytes, run.registry_requests = fleet.served_since(offset)
        tree = depths(img.layer, nodes, run.fanout) if run.mode == "p2p" else {}
        for n in nodes:
            st = node_status(n)
            blob = st["blobs"][img.layer]
            p = st.get("p2p", {})
            run.per_node.append(
                NodeResult(
                    label=n.label,
                    address=n.address,
                    depth=tree.get(n.label, 0),
                    mount_s=mounted[n.label],
                    complete_s=done[n.label],
                    cpu_s=cpu1[n.label] - cpu0[n.label],
                    link_down_bytes=down[n.label] - link0[n.label][0],
                    link_up_bytes=up[n.label],
                    registry_bytes=int(blob.get("registry_bytes", 0)),
                    peer_bytes=int(blob.get("peer_bytes", 0)),
                    upload_bytes=int(p.get("upload_bytes", 0)),
                    bad_peers=int(blob.get("bad_peers", 0)),
                    demotions=int(p.get("demotions", 0)),
                    peer_errors={k: v for k, v in p.get("peer_errors", {}).items() if v},
                )
            )

    @staticmethod
    def _keep_logs(fleet: Fleet, keep: Path, label: str) -> None:
        out = keep / label
        out.mkdir(parents=True, exist_ok=True)
        for n in fleet.nodes:
            with contextlib.suppress(OSError):
                shutil.copy(n.log, out / f"{n.label}-devd.log")
            with contextlib.suppress(OSError, ControlError, KeyError, ValueError):
                (out / f"{n.label}-status.json").write_text(json.dumps(node_status(n), indent=1) + "\n")
        with contextlib.suppress(OSError):
            shutil.copy(fleet.registry.log, out / "registry.log")
        log(f"{label}: logs in {out}")


def close_fleet(fleet: Fleet) -> tuple[list[str], list[str]]:
    """`Fleet.close`: (notes, e.g. a daemon that needed a signal; what the lab could not remove)."""
    try:
        return fleet.close(), []
    except NetLabError as e:
        return [], e.problems


# -- the model ------------------------------------------------------------------------------------------


def byte_rate(mbit: float) -> float:
    """B in bytes per second (tc's mbit is 10^6 bits)."""
    return mbit * 1e6 / 8


def bound(size: int, n: int, mbit: float) -> float:
    """The chunked lower bound (P2P reference §5.3): S/B + (ceil(log2(N+1)) - 1) c/B."""
    b = byte_rate(mbit)
    return size / b + (math.ceil(math.log2(n + 1)) - 1) * FETCH_UNIT / b


def direct_bound(size: int, n: int, mbit: float) -> float:
    """N pulls through one registry link of rate B: N S / B (§5.1)."""
    return n * size / byte_rate(mbit)


def tree_shape(n: int, fanout: int) -> tuple[int, int]:
    """(most children of any node, depth of the deepest node) of a complete `fanout`-ary tree of n."""
    deepest, i = 0, n - 1
    while i > 0:
        i = (i - 1) // fanout
        deepest += 1
    return min(fanout, n - 1), deepest


def tree_model(size: int, n: int, fanout: int, mbit: float) -> float:
    """A single pipelined tree (§5.4): k (S + h c) / B, k the most children of a node, h the depth."""
    k, h = tree_shape(n, fanout)
    return max(k, 1) * (size + h * FETCH_UNIT) / byte_rate(mbit)


# -- the report -----------------------------------------------------------------------------------------


def ok(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if not r.error]


def spread(runs: Sequence[Run]) -> str:
    xs = [r.seconds for r in ok(runs)]
    if not xs:
        return "failed"
    return f"{med(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def cpu(runs: Sequence[Run]) -> str:
    """Median CPU seconds of the N daemons, and how busy the whole machine was (median share)."""
    good = ok(runs)
    return f"{med([r.node_cpu_s for r in good]):.1f} ({med([r.busy for r in good]):.0%})"


def copies(runs: Sequence[Run], size: int) -> float:
    return med([r.registry_bytes / size for r in ok(runs)])


def main_table(runs: Sequence[Run], args: argparse.Namespace, size: int) -> tuple[list[str], list[str]]:
    head = [
        "N",
        "P2P s",
        "direct s",
        "bound s",
        "P2P / bound",
        "tree model s",
        "direct / N·S/B",
        "egress P2P (copies)",
        "egress direct (copies)",
        "node CPU s (busy) P2P",
        "node CPU s (busy) direct",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|" + "---:|" * (len(head) - 1)]
    verdicts = []
    for n in args.nodes:
        p = [r for r in runs if r.nodes == n and r.mode == "p2p" and r.fanout == args.default_fanout]
        d = [r for r in runs if r.nodes == n and r.mode == "direct"]
        b = bound(size, n, args.mbit)
        tp, td = med([r.seconds for r in ok(p)]), med([r.seconds for r in ok(d)])
        ep, ed = copies(p, size), copies(d, size)
        cells = [
            str(n),
            spread(p),
            spread(d),
            f"{b:.2f}",
            f"{tp / b:.2f}",
            f"{tree_model(size, n, args.default_fanout, args.mbit):.1f}",
            f"{td / direct_bound(size, n, args.mbit):.2f}",
            f"{ep:.3f}",
            f"{ed:.2f}",
            cpu(p),
            cpu(d),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        egress_ok = ep <= AIM_EGRESS
        time_ok = tp <= AIM_BOUND * b
        verdicts.append(
            f"- N = {n}: registry egress {ep:.3f} copies "
            f"({'met' if egress_ok else 'MISSED'}: <= {AIM_EGRESS}); completion {tp / b:.2f}x the bound "
            f"({'met' if time_ok else 'MISSED'}: <= {AIM_BOUND:g}x)"
        )
    return lines, verdicts


def sweep_table(runs: Sequence[Run], args: argparse.Namespace, size: int) -> tuple[list[str], list[str]]:
    n = args.sweep_nodes
    b = bound(size, n, args.mbit)
    by_k = {k: [r for r in runs if r.fanout == k] for k in args.fanouts}
    meds = {k: med([r.seconds for r in ok(rs)]) for k, rs in by_k.items()}
    measured = {k: v for k, v in meds.items() if not math.isnan(v)}
    if not measured:
        return ["Every run of the sweep failed."], []
    best = min(measured, key=lambda k: measured[k])
    head = [
        "fan-out k",
        "children / depth",
        "seconds",
        "/ bound",
        "/ best k",
        "model k(S+hc)/B s",
        "first reads s",
        "egress (copies)",
        "node CPU s (busy)",
        "demotions",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---:|---:|" + "---:|" * (len(head) - 2)]
    for k, rs in by_k.items():
        kids, depth = tree_shape(n, k)
        good = ok(rs)
        cells = [
            f"**{k}**" if k == best else str(k),
            f"{kids} / {depth}",
            spread(rs),
            f"{meds[k] / b:.2f}",
            f"{meds[k] / measured[best]:.2f}",
            f"{tree_model(size, n, k, args.mbit):.1f}",
            f"{med([max(x.mount_s for x in r.per_node) for r in good]):.2f}",
            f"{copies(rs, size):.3f}",
            cpu(rs),
            f"{med([sum(x.demotions for x in r.per_node) for r in good]):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    default = args.default_fanout
    summary = [
        f"Fastest fan-out at N = {n}: **k = {best}** ({measured[best]:.1f} s, "
        f"{measured[best] / b:.2f}x the bound)."
    ]
    for k in sorted(measured):
        if k != best:
            summary.append(
                f"- k = {k}: {measured[k]:.1f} s, {measured[k] / measured[best] - 1:+.0%} vs k = {best}"
                + (" (the current default)" if k == default else "")
            )
    return lines, summary


def slowest_nodes(runs: Sequence[Run]) -> list[str]:
    """One line per P2P run: its slowest node, its depth, and where its bytes came from."""
    out = []
    for r in runs:
        if r.error:
            out.append(f"- {r.label}: **failed**: {r.error}")
            continue
        if r.mode != "p2p":
            continue
        slow = max(r.per_node, key=lambda x: x.complete_s)
        first = min(r.per_node, key=lambda x: x.complete_s)
        root = min(r.per_node, key=lambda x: (x.depth, x.complete_s))
        errs = {k: sum(x.peer_errors.get(k, 0) for x in r.per_node) for k in ("busy", "timeout", "error")}
        errs_s = ", ".join(f"{k} {v}" for k, v in errs.items() if v) or "none"
        out.append(
            f"- {r.label}: {r.seconds:.1f} s; first node {first.complete_s:.1f} s (depth {first.depth}), "
            f"last {slow.label} {slow.complete_s:.1f} s (depth {slow.depth}, "
            f"{slow.registry_bytes / MB:.0f} MB from the registry, "
            f"{slow.peer_bytes / MB:.0f} MB from peers); "
            f"root {root.label}: down {root.link_down_bytes / root.complete_s / MB:.1f} MB/s until "
            f"complete, up {root.link_up_bytes / r.seconds / MB:.1f} MB/s over the run; "
            f"demotions {sum(x.demotions for x in r.per_node)}, peer errors: {errs_s}"
        )
    return out


@dataclass
class Meta:
    """Where and when the runs were made (kept in the JSON, so a report can be rendered again)."""

    started: str
    machine: str
    registry: str
    command: str
    code: str  # the commit, and a hash of uncommitted changes to the product code
    code_at_end: str = ""
    elapsed: float = 0.0
    load: tuple[str, str] = ("?", "?")

    @classmethod
    def now(cls) -> Meta:
        registry_version = subprocess.run(
            [REGISTRY_BIN, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        return cls(
            started=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            machine=machine(f"nproc {os.cpu_count()}"),
            registry=registry_version or REGISTRY_BIN,
            command=shlex.join([Path(sys.executable).name, *sys.argv]),
            code=code_state(),
            load=(loadavg(), "?"),
        )


def code_state() -> str:
    """The commit, plus a hash of the uncommitted changes to the packages the daemons run (other work
    in the same tree may change them while a benchmark runs: compare this at the start and the end)."""
    head = git("rev-parse", "--short", "HEAD") or "?"
    diff = git("diff", "HEAD", "--", *PRODUCT)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *PRODUCT)
    if not diff and not untracked:
        return head
    h = hashlib.sha256((diff + "\n" + untracked).encode()).hexdigest()[:12]
    return f"{head} + uncommitted changes (diff {h})"


def render(
    image: Image,
    args: argparse.Namespace,
    main_runs: Sequence[Run],
    sweep_runs: Sequence[Run],
    meta: Meta,
) -> str:
    s = image.size
    b = byte_rate(args.mbit)
    table, verdicts = main_table(main_runs, args, s)
    code = meta.code
    if meta.code_at_end and meta.code_at_end != meta.code:
        code += f" at the start, **{meta.code_at_end} at the end** (the code changed during the runs)"
    lines = [
        "# P2P benchmark: N nodes start the same image at once",
        "",
        f"Generated {meta.started} by `scripts/bench_p2p.py` in {meta.elapsed / 60:.1f} min; code at "
        f"{code}; load average {meta.load[0]} at start, {meta.load[1]} at end.",
        "",
        f"- {meta.machine}",
        f"- registry: `{meta.registry}` in its own network namespace",
        f"- command: `{meta.command}`",
        f"- image: one converted layer (lz4, ext4) of {image.data_bytes / MB:.0f} MB of random files: "
        f"S = {s:,} bytes ({s / MB:.1f} MB)",
        "- `[p2p]`: the defaults of p2p/settings.py except `fanout` (per row), `health_interval = 1` "
        "(the fleet's)"
        + "".join(f", `{k} = {json.dumps(v)}`" for k, v in getattr(args, "p2p_set", []))
        + "; `[device]`: the defaults except `background_delay = 0`",
        f"- links: every node and the registry behind its own veth, tbf at B = {args.mbit:g} Mbit/s in "
        f"both directions ({b / MB:.1f} MB/s, of which TCP/IP headers take a few per cent)",
        f"- c = {FETCH_UNIT // MIB} MiB (the background download's request size; the cache unit is "
        "64 KiB); bound T ≥ S/B + (ceil(log2(N+1)) - 1)·c/B (P2P reference §5.3); direct pulls share one "
        "registry link, so they cannot beat N·S/B (§5.1)",
        f"- each run: a fresh fleet (new namespaces, registry, daemons, empty caches), the image pushed "
        f"(not timed), then every node attaches and mounts it at the same moment "
        f"({MOUNT_CLI if args.cli_mount else MOUNT_DIRECT}), "
        "`background_delay = 0`; time = until the last node's layer blob is complete and verified; "
        f"medians of {args.reps} runs (min-max in brackets), P2P and direct alternating within each N",
        "",
        f"## P2P (fan-out {args.default_fanout}, the default) vs N direct pulls",
        "",
        "Registry egress = body bytes the registry served over the run (its access log) / S; node CPU = "
        "the N device daemons' user + system seconds over the run; busy = the share of the whole "
        "machine's CPU time (every CPU, every process, the kernel's softirq work for tbf and veth "
        "included) that was busy over the run. Tree model = the single-tree time of the fan-out used "
        "(see the sweep below).",
        "",
        *table,
        "",
        f"Aims (issue): registry egress <= {AIM_EGRESS}x one copy, completion <= {AIM_BOUND:g}x the bound.",
        "",
        *verdicts,
        "",
    ]
    if sweep_runs:
        stable, summary = sweep_table(sweep_runs, args, s)
        lines += [
            f"## Fan-out sweep: P2P at N = {args.sweep_nodes}",
            "",
            f"`[p2p] fanout` = k; bound at N = {args.sweep_nodes}: "
            f"{bound(s, args.sweep_nodes, args.mbit):.2f} s. The model column is a single pipelined k-ary "
            "tree (§5.4): the busiest node's upload is split among its children and leaves never upload, "
            "so it is k_eff·(S + h·c)/B with k_eff the most children any node has and h the depth. First "
            "reads = until the last node's mount returned (ext4's first lazy reads, through the tree). "
            "Fan-outs run round-robin within each repetition.",
            "",
            *stable,
            "",
            *summary,
            "",
        ]
    lines += [
        "## Runs",
        "",
        "Per P2P run: the first and the last node to complete, the last one's depth in the blob's tree "
        "and where its bytes came from; the root's link rates (IP bytes on its veth: down until it was "
        "complete, up over the whole run). Raw figures of every run (per node: depth, mount and "
        "completion seconds, CPU, link bytes, registry/peer/upload bytes, demotions, peer errors) are in "
        "`p2p.json`.",
        "",
        *slowest_nodes([*main_runs, *sweep_runs]),
        "",
    ]
    return "\n".join(lines)


def plot(
    path: Path, image: Image, args: argparse.Namespace, main_runs: Sequence[Run], sweep: Sequence[Run]
) -> None:
    s = image.size
    ns = list(args.nodes)
    panels = 3 if sweep else 2
    fig = Figure(figsize=(5.2 * panels, 4.2))  # no pyplot: no global state, Agg writes the PNG
    axes = fig.subplots(1, panels)

    def series(mode: str, fanout: int | None) -> tuple[list[float], list[float], list[float], list[float]]:
        m, lo, hi, eg = [], [], [], []
        for n in ns:
            rs = ok(
                [
                    r
                    for r in main_runs
                    if r.nodes == n and r.mode == mode and (fanout is None or r.fanout == fanout)
                ]
            )
            xs = [r.seconds for r in rs]
            m.append(med(xs))
            lo.append(med(xs) - min(xs) if xs else 0.0)
            hi.append(max(xs) - med(xs) if xs else 0.0)
            eg.append(copies(rs, s))
        return m, lo, hi, eg

    pm, plo, phi, peg = series("p2p", args.default_fanout)
    dm, dlo, dhi, deg = series("direct", None)
    ax = axes[0]
    ax.errorbar(ns, pm, yerr=[plo, phi], marker="o", capsize=3, label=f"P2P (fan-out {args.default_fanout})")
    ax.errorbar(ns, dm, yerr=[dlo, dhi], marker="s", capsize=3, label="N direct pulls")
    fine = list(range(min(ns), max(ns) + 1))
    ax.plot(fine, [bound(s, n, args.mbit) for n in fine], "k-", label="bound S/B + (ceil(log2(N+1)) - 1) c/B")
    ax.plot(
        fine, [AIM_BOUND * bound(s, n, args.mbit) for n in fine], "k:", label=f"{AIM_BOUND:g}x bound (aim)"
    )
    ax.plot(fine, [direct_bound(s, n, args.mbit) for n in fine], "--", color="grey", label="N·S/B (direct)")
    ax.plot(
        ns,
        [tree_model(s, n, args.default_fanout, args.mbit) for n in ns],
        "x--",
        color="tab:red",
        label=f"single-tree model, k = {args.default_fanout}",
    )
    ax.set_xlabel("nodes N")
    ax.set_ylabel("seconds until every node has the image")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.set_title(f"{s / MB:.0f} MB image, {args.mbit:g} Mbit/s links")
    ax.legend(fontsize=8)
    ax = axes[1]
    width = 0.35
    xs = list(range(len(ns)))
    ax.bar([x - width / 2 for x in xs], peg, width, label="P2P")
    ax.bar([x + width / 2 for x in xs], deg, width, label="direct")
    ax.axhline(AIM_EGRESS, color="k", linestyle=":", label=f"{AIM_EGRESS}x (aim)")
    ax.set_xticks(xs, [str(n) for n in ns])
    ax.set_xlabel("nodes N")
    ax.set_ylabel("registry egress (copies of the image)")
    ax.set_title("registry egress")
    ax.legend(fontsize=8)
    if sweep:
        ax = axes[2]
        ks = list(args.fanouts)
        n = args.sweep_nodes
        vals = [[r.seconds for r in ok(sweep) if r.fanout == k] for k in ks]
        ax.bar([str(k) for k in ks], [med(v) for v in vals], color="tab:green", label="measured (median)")
        for i, v in enumerate(vals):
            ax.plot([i] * len(v), v, "k.", alpha=0.6)
        ax.plot(
            [str(k) for k in ks],
            [tree_model(s, n, k, args.mbit) for k in ks],
            "rx--",
            label="single-tree model",
        )
        ax.axhline(bound(s, n, args.mbit), color="k", label="bound")
        ax.set_xlabel("fan-out k")
        ax.set_ylabel("seconds")
        ax.set_title(f"fan-out sweep, N = {n}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -- main -----------------------------------------------------------------------------------------------


def schedule(args: argparse.Namespace) -> Iterator[tuple[str, str, str, int, int]]:
    """(part, label, mode, nodes, fan-out) of every run, in the order they run."""
    for rep in range(1, args.reps + 1):
        for n in args.nodes:
            for mode in ("p2p", "direct"):
                yield "main", f"r{rep}-n{n}-{mode}", mode, n, args.default_fanout
    if args.fanouts:
        for rep in range(1, args.reps + 1):
            shift = (rep - 1) % len(args.fanouts)
            for k in [*args.fanouts[shift:], *args.fanouts[:shift]]:
                yield "sweep", f"r{rep}-n{args.sweep_nodes}-p2p-k{k}", "p2p", args.sweep_nodes, k


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE in JSON (a bare word is a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def preflight(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench_p2p needs root: network namespaces, tbf, FUSE and loop devices")
    if not os.access(REGISTRY_BIN, os.X_OK):
        raise SystemExit(f"{REGISTRY_BIN} is missing: apt-get install docker-registry")
    if min([*args.nodes, args.sweep_nodes]) < 1 or (args.fanouts and min(args.fanouts) < 1):
        raise SystemExit("--nodes, --sweep-nodes and --fanouts must be positive")


def interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP inside (a cleanup that must finish), then handle them again."""
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def save(path: Path, image: Image, args: argparse.Namespace, runs: dict[str, list[Run]], meta: Meta) -> None:
    doc = {
        "meta": asdict(meta),
        "image": {**asdict(image), "layout": str(image.layout)},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "fetch_unit": FETCH_UNIT,
        "main": [asdict(r) for r in runs["main"]],
        "sweep": [asdict(r) for r in runs["sweep"]],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load(path: Path) -> tuple[Image, argparse.Namespace, dict[str, list[Run]], Meta]:
    """What `save` wrote: render a report again (``--from-json``) without running anything."""
    doc = json.loads(path.read_text())
    image = Image(**{**doc["image"], "layout": Path(doc["image"]["layout"])})
    args = argparse.Namespace(**doc["args"])

    def run(r: dict[str, Any]) -> Run:
        return Run(**{**r, "per_node": [NodeResult(**x) for x in r["per_node"]]})

    runs = {part: [run(r) for r in doc[part]] for part in ("main", "sweep")}
    m = doc["meta"]
    return image, args, runs, Meta(**{**m, "load": tuple(m["load"])})


def publish_all(
    output: Path, image: Image, args: argparse.Namespace, runs: dict[str, list[Run]], meta: Meta
) -> None:
    """The report, its PNG and (unless it was read from there) its JSON, side by side."""
    plot(output.with_suffix(".png"), image, args, runs["main"], runs["sweep"])
    publish(output, render(image, args, runs["main"], runs["sweep"], meta), log)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--mb", type=int, default=100, help="MB of random data in the image (default 100)")
    p.add_argument("--mbit", type=float, default=200.0, help="rate B of every link, Mbit/s (default 200)")
    p.add_argument("--nodes", type=ints, default=[2, 4, 8], help="node counts N (default 2,4,8)")
    p.add_argument("--reps", type=int, default=3, help="runs of every configuration (default 3)")
    p.add_argument("--fanouts", type=ints, default=[1, 2, 3, 4], help="fan-outs of the sweep ('' for none)")
    p.add_argument("--sweep-nodes", type=int, default=8, help="N of the fan-out sweep (default 8)")
    p.add_argument("--default-fanout", type=int, default=2, help="fan-out of the P2P vs direct runs (2)")
    p.add_argument(
        "--p2p-set",
        type=setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another [p2p] setting of every node (VALUE in JSON: stripe_size=4194304), repeatable",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take (default 300)")
    p.add_argument("--cli-mount", action="store_true", help="mount with `damselfly mount` (FleetNode.mount)")
    p.add_argument("--keep-logs", type=Path, help="copy each run's daemon logs and status here")
    p.add_argument("--workdir", type=Path, default=WORK, help=f"image cache (default {WORK})")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where fleets live during a run")
    p.add_argument(
        "--output", type=Path, help=f"Markdown result (default {OUTPUT}; .json and .png beside it)"
    )
    p.add_argument("--quick", action="store_true", help="smaller: 40 MB, N = 2,4, sweep k = 1,2,3 at N = 4")
    p.add_argument("--from-json", type=Path, help="no runs: render the report and plot of this JSON again")
    args = p.parse_args(argv)
    if args.from_json is not None:
        loaded = load(args.from_json)
        publish_all(args.output or args.from_json.with_suffix(".md"), *loaded)
        return 0
    if args.quick:
        args.mb, args.nodes, args.sweep_nodes = 40, [2, 4], 4
        args.fanouts = [k for k in args.fanouts if k < 4]
    output: Path = args.output or (args.workdir / "p2p-quick.md" if args.quick else OUTPUT)
    preflight(args)
    for sig in SIGNALS:  # each unwinds through the current run's cleanup (`Bench.run`)
        signal.signal(sig, interrupt)
    t_start = time.perf_counter()
    meta = Meta.now()
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = build_image(args.workdir, args.mb)
    log(f"image: {image.size / MB:.1f} MB layer {image.layer[:19]}; B = {args.mbit:g} Mbit/s")
    bench = Bench(image, args)
    runs: dict[str, list[Run]] = {"main": [], "sweep": []}
    plan = list(schedule(args))
    try:
        for i, (part, label, mode, n, k) in enumerate(plan, 1):
            log(f"run {i}/{len(plan)} {label}" + (f" (fan-out {k})" if mode == "p2p" else ""))
            r = bench.run(label, mode, n, k)
            runs[part].append(r)
            if not r.error:
                slow = max(r.per_node, key=lambda x: x.complete_s)
                log(
                    f"  {r.seconds:.1f} s (bound {bound(image.size, n, args.mbit):.1f} s), registry "
                    f"{r.registry_bytes / image.size:.2f} copies, slowest {slow.label} depth {slow.depth}, "
                    f"node CPU {r.node_cpu_s:.1f} s, machine CPU {r.busy:.0%} busy"
                )
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}); the current run's fleet was removed")
        return 130
    meta.elapsed, meta.load, meta.code_at_end = (
        time.perf_counter() - t_start,
        (meta.load[0], loadavg()),
        code_state(),
    )
    if meta.code_at_end != meta.code:
        log(f"the product code changed during the runs: {meta.code} -> {meta.code_at_end}")
    save(output.with_suffix(".json"), image, args, runs, meta)
    publish_all(output, image, args, runs, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
