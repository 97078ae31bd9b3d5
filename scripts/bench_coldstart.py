#!/usr/bin/env python3
"""Cold start over a shaped link (issue 14, item 1): the demo's image, the registry behind a `tbf` link,
two workloads; overlayfs (full pull, warm) against damselfly (cold, warm, from a P2P parent, with trace
prefetch).

    bench_coldstart.py [--quick] [--runs N] [--rates 1000,100] [--workloads hello,imports]
                       [--columns overlayfs,overlayfs-warm,cold,warm,p2p,prefetch] [--trace-seconds N]
                       [--work-dir DIR] [--output MD]
    bench_coldstart.py --from-json EARLIER.json --output MD    # only the report, from a raw record

Needs root. HelloBench style: seconds from the pull's start to the workload's first output line
(`demolib.coldstart.cold_start`: page cache dropped first; node CPU from the node's cgroup; registry
bytes from the registry's access log). The machinery is the demo's (``scripts/demo.py``: its `Node`,
one containerd + `damselfly serve` in a cgroup) with one difference: here the *registry* is in a
network namespace of its own (`demolib.netlab`), behind a veth shaped with tbf to each rate in turn;
the node stays in the root namespace and reaches it over the lab's bridge. For the P2P column, a
second damselfly (a device daemon, `demolib.coldnode.PeerParent`) runs in a third namespace on the
same bridge, unshaped: the parent. ``damselfly rpull`` always gets ``--state-dir`` (the node's own
device daemon, as on a real node, where both use the default).

Workloads (`demolib.coldreport.WORKLOADS`), both on the demo's Debian + python3 image:
``python3 -c 'print("hello")'`` and a many-files one, ``python3 -c 'import json, email, http.server,
sqlite3, xml.dom.minidom, asyncio, unittest; print("imported")'``.

Columns (`demolib.coldreport.COLUMNS` has the definitions the report prints; ``--columns`` selects):

- **overlayfs** full pull (``ctr image pull`` + ``ctr run``, nothing of the image on the node) and
  **overlayfs-warm** (right after it, content and snapshots kept: the same two commands again);
- **cold**: `damselfly serve` restarted on an empty root and state, ``[remote] prefetch = false``; the
  clock starts once the device daemon serve starts at its start answers; ``damselfly rpull`` + ``ctr
  run --snapshotter damselfly``; then **warm**: a view keeps the device attached until every blob is
  complete and verified, the view goes (the chain mount is released), the image and its snapshots
  stay in containerd, the daemon and its cache stay: rpull + run again; **warm-cache** (not by
  default; the first version's "warm"): then the image removed from containerd too, rpull + run;
- **p2p**: as cold, with ``[p2p]`` on (members: the node and the parent, the parent the seed); the
  parent's cache holds the complete image (``damselfly mount`` once at the start, kept);
- **prefetch**: before each workload's runs, ``damselfly record-trace`` runs it once on the node
  (prefetch off, the link unshaped; its ``ctr run`` keeps runc's state and fifos below the run
  directory and the container in the node's containers cgroup) and pushes the trace to the registry;
  then as cold with ``[remote] prefetch = true`` (the trace is
  replayed at the chain mount). ``ctr run`` without ``--rm``, so that ``damselfly devices`` still has
  the device's prefetch counters once it returned; ``ctr containers rm`` follows, inside the span.
  Needs a damselfly with ``record-trace``: without it, the column is left out of the default columns
  (and refused by ``--columns``).

Order: for each workload (its trace recorded first), for each rate, ``--runs`` runs; a run measures the
groups of columns (overlayfs; damselfly cold + warm; p2p; prefetch) in one order on even runs and in
the reverse order on odd ones. A column whose predecessor is not selected still gets it, unmeasured
(warm needs a cold run before it).

Output: ``--output`` (Markdown: machine, command, date, definitions, the table of medians with ratios
to overlayfs, issue 14's targets and whether each is met, every run), a PNG plot and the raw JSON
beside it. Everything it started is stopped and removed at the end, also on Ctrl-C (SIGINT, SIGTERM)
or a failure: processes by pid, mounts and loop devices by path, the cgroup, the network lab by the
names it made, the run directory. Logs stay in ``WORK/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from build_debian_image import DEFAULT_CACHE, BuiltImage, ImageSpec, build_image
from demo import NAMESPACE, PEER_PORT, SNAPSHOTTER, Node, p2p_tables, remove_stale_lab, write_secret
from demolib import procs
from demolib.coldnode import (
    PeerParent,
    fill_cache,
    has_record_trace,
    knows_prefetch_key,
    run_to_end,
    wait_daemon,
)
from demolib.coldreport import (
    COLUMNS,
    DEFAULT_COLUMNS,
    WORKLOADS,
    Run,
    Workload,
    prefetch_summary,
    progress_line,
    publish,
)
from demolib.coldstart import LayerSources, StartResult, cold_start, drop_caches
from demolib.netlab import NetLab, NetLabError, NetNode, link_exists, netns_exists
from demolib.registry import Registry, free_port, layer_bytes, push_layout
from demolib.report import REPO, git, loadavg, machine
from demolib.serve import damselfly_argv

DEFAULT_WORK = REPO / "bench" / "work" / "coldstart"
#: The demo's converted layers: the same image converts to the same blobs, so reuse them.
DEFAULT_CONVERT_CACHE = REPO / "bench" / "work" / "demo" / "cache" / "convert"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "coldstart.md"
HOLD_KEY = "damselfly-bench-hold"
CACHE_TIMEOUT = 900.0
#: Seconds a device daemon may take to answer after `damselfly serve` (re)started.
DAEMON_TIMEOUT = 60.0
#: Groups of columns measured together, in this order on even runs (the reverse on odd ones).
GROUPS = (("overlayfs", "overlayfs-warm"), ("cold", "warm", "warm-cache"), ("p2p",), ("prefetch",))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


class Bench:
    def __init__(
        self,
        work: Path,
        convert_cache: Path,
        image_cache: Path,
        columns: Sequence[str],
        trace_seconds: float | None,
    ) -> None:
        self.work = work
        self.run_dir = work / "run"
        self.logs = work / "logs"
        self.lab_record = work / "netlab.json"
        self.convert_cache = convert_cache
        self.image_cache = image_cache
        self.columns = set(columns)
        self.trace_seconds = trace_seconds
        self.prefetch_key = knows_prefetch_key()
        self.lab: NetLab | None = None
        self.link: NetNode | None = None  # the registry's namespace
        self.registry: Registry | None = None
        self.node: Node | None = None
        self.parent: PeerParent | None = None
        self.node_peer = ""  # the node's own peer address (p2p column)
        self.secret = self.run_dir / "p2p-secret"
        self.children: list[subprocess.Popen[bytes]] = []
        self.src = self.dst = ""

    # -- setup --------------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        stale = procs.sweep(self.run_dir)
        stale += procs.NodeCgroup(self.cgroup_name).remove()
        stale += remove_stale_lab(self.lab_record)
        if stale:
            log(f"removed what an earlier run left: {'; '.join(stale)}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        for f in self.logs.glob("*.log"):
            f.unlink()

    @property
    def cgroup_name(self) -> str:
        return "damselfly-bench-coldstart"

    def _record_lab(self) -> None:
        """The lab's names, as they are made: a run killed by SIGKILL leaves them to the next one."""
        assert self.lab is not None
        nodes = [[n.host_veth, n.netns] for n in self.lab.nodes]
        self.lab_record.write_text(json.dumps({"bridge": self.lab.bridge, "nodes": nodes}) + "\n")

    def start(self) -> None:
        lab = self.lab = NetLab()
        self._record_lab()
        link = self.link = lab.add_node("registry")  # unshaped while pushing, converting and priming
        self._record_lab()
        self.registry = Registry(
            self.run_dir / "registry", self.logs / "registry.log", bind=link.ip, wrap=link.argv
        )
        self.registry.start()
        log(f"network lab {lab.bridge}: registry http://{self.registry.host} in {link.netns}")
        node = self.node = Node(
            "node", self.run_dir, self.logs, "", self.cgroup_name, self.registry, self.children
        )
        node.serve.tables = self.tables("cold")
        node.cgroup.create()
        node.start()
        log(f"node: containerd {node.containerd.address}, damselfly serve {node.serve.socket}")

    def push_and_convert(self) -> BuiltImage:
        assert self.registry is not None
        image = build_image(ImageSpec(variant="debian", target_mb=1100), self.image_cache)
        name = "demo/python"
        self.src = src = f"{self.registry.host}/{name}:latest"
        log(f"pushing {image.layout_dir} to {src}")
        push_layout(
            self.registry.host, Path(image.layout_dir), image.manifest_digest, name, "latest", lambda n: None
        )
        self.dst = dst = f"{self.registry.host}/{name}:damselfly"
        argv = [
            *damselfly_argv(), "convert", src, dst, "--plain-http", "--cache-dir", str(self.convert_cache)
        ]  # fmt: skip
        log(f"damselfly convert {src} {dst} (cache {self.convert_cache})")
        run_to_end(argv, self.logs / "convert.log", "damselfly convert", self.children, CACHE_TIMEOUT)
        return image

    def start_parent(self) -> None:
        """The P2P parent (`PeerParent`), in a namespace of its own on the bridge, unshaped, its cache
        filled with the whole converted image while the registry's link is unshaped too."""
        assert self.lab is not None and self.registry is not None
        net = self.lab.add_node("parent")
        self._record_lab()
        write_secret(self.secret)
        self.node_peer = f"{self.lab.gateway}:{free_port(self.lab.gateway)}"
        members = [f"{net.ip}:{PEER_PORT}", self.node_peer]
        parent = self.parent = PeerParent(
            net, self.run_dir / "parent", members, self.secret, self.registry.host, self.prefetch_key
        )
        took = parent.prime(self.dst, CACHE_TIMEOUT)
        log(
            f"P2P parent {parent.address} in {net.netns}: its cache of {self.dst} complete and verified "
            f"in {took:.1f}s; the node's peer address {self.node_peer}"
        )

    # -- the node's states ----------------------------------------------------------------------------

    def tables(self, kind: str) -> dict[str, Mapping[str, object]]:
        """The node's serve config for a column: plain HTTP to the registry, trace prefetch for the
        prefetch column only (when this damselfly has the key), the peer network for the p2p column."""
        remote: dict[str, object] = {"plain_http": True}
        if self.prefetch_key:
            remote["prefetch"] = kind == "prefetch"
        out: dict[str, Mapping[str, object]] = {"remote": remote}
        if kind == "p2p":
            assert self.parent is not None
            p2p = p2p_tables(self.node_peer, [self.parent.address, self.node_peer], self.secret)["p2p"]
            out["p2p"] = dict(p2p)
        return out

    def make_cold(self, kind: str) -> dict[str, Any]:
        """No content, snapshots or device cache of the image on the node; `damselfly serve` restarted
        with the config of `kind` (`tables`); returns once its device daemon answers (and, for p2p,
        counts the parent among its live members): {"daemon_wait_s": seconds after serve answered}."""
        node = self.node
        assert node is not None
        node.containerd.image_rm(self.dst, node.runs_log)
        node.serve.tables = self.tables(kind)
        undone = node.serve.reset(keep_log=node.devd_log)
        if undone:
            log(f"  serve reset had to force: {'; '.join(undone)}")
        member = self.parent.address if kind == "p2p" and self.parent is not None else None
        waited = wait_daemon(node.serve, DAEMON_TIMEOUT, member)
        node.containerd.wait_snapshotter(SNAPSHOTTER)
        return {"daemon_wait_s": waited}

    def record_trace(self, w: Workload) -> None:
        """``damselfly record-trace`` of workload `w` on a cold node (prefetch off, registry link
        unshaped: the trace is the same at any rate); the node is left without the image."""
        node = self.node
        assert node is not None and self.link is not None
        self.link.set_rate(None)
        self.make_cold("cold")
        argv = [
            *damselfly_argv(), "record-trace", "--config", str(node.serve.config_path),
            "--address", node.containerd.address, "--namespace", NAMESPACE, "--plain-http",
            *(["--seconds", f"{self.trace_seconds:g}"] if self.trace_seconds else []),
            # the container's state and fifos below ours, the container in the containers' cgroup
            f"--run-arg=--fifo-dir={node.containerd.fifo_dir}",
            f"--run-arg=--runc-root={node.containerd.runc_root}",
            f"--run-arg=--cgroup={node.cgroup.containers_parent}/bench-trace",
            self.dst, "--", *w.command,
        ]  # fmt: skip
        log(f"recording the trace of {w.title!r}: damselfly record-trace {self.dst} -- {' '.join(w.command)}")
        with node.runs_log.open("a") as f:
            f.write(f"\n== record-trace ({w.key}): {' '.join(argv)}\n")
        drop_caches()
        started = time.monotonic()
        run_to_end(
            node.wrap(argv),
            node.runs_log,
            "record-trace",
            self.children,
            CACHE_TIMEOUT,
            node.containerd.env(),
        )
        log(f"  trace recorded and pushed in {time.monotonic() - started:.1f}s")
        node.containerd.image_rm(self.dst, node.runs_log)

    # -- the columns ----------------------------------------------------------------------------------

    def lazy(
        self, w: Workload, label: str, cid: str = "bench-lazy", after_run: Callable[[], None] | None = None
    ) -> tuple[StartResult, dict[str, int]]:
        """``damselfly rpull`` + ``ctr run --snapshotter damselfly``, measured; and the layer bytes the
        device daemon fetched meanwhile, from the registry and from peers (its own counters)."""
        node = self.node
        assert node is not None
        before = LayerSources.of(node.serve.devices())
        # --state-dir: the node's own device daemon (with [p2p], the image config comes through it)
        pull = node.wrap([
            *damselfly_argv(), "rpull", self.dst, "--address", node.containerd.address,
            "--namespace", NAMESPACE, "--plain-http", "--state-dir", str(node.serve.state),
        ])  # fmt: skip
        run = node.run_argv(self.dst, cid, list(w.command), SNAPSHOTTER)
        if after_run is not None:
            run.remove("--rm")  # the caller's after_run removes the container
        result = cold_start(node.bench, label, pull, run, w.expect, after_run)
        after = LayerSources.of(node.serve.devices())
        fetched = {
            "registry_bytes": after.registry_bytes - before.registry_bytes,
            "peer_bytes": after.peer_bytes - before.peer_bytes,
        }
        return result, fetched

    def overlayfs_group(self, w: Workload, rate: float, i: int) -> list[Run]:
        node = self.node
        assert node is not None
        node.containerd.image_rm(self.src, node.runs_log)
        pull = node.wrap(node.containerd.argv(["image", "pull", "--plain-http", self.src]))
        run = node.run_argv(self.src, "bench-full", list(w.command), "overlayfs")
        out = []
        measured = "overlayfs" in self.columns
        label = "overlayfs full pull" + ("" if measured else " (preparation, not measured)")
        r = cold_start(node.bench, label, pull, run, w.expect)
        if measured:
            out.append(report(Run(rate, w.key, "overlayfs", i, r)))
        if "overlayfs-warm" in self.columns:
            r = cold_start(node.bench, "overlayfs warm", pull, run, w.expect)
            out.append(report(Run(rate, w.key, "overlayfs-warm", i, r)))
        node.containerd.image_rm(self.src, node.runs_log)
        return out

    def damselfly_group(self, w: Workload, rate: float, i: int) -> list[Run]:
        node = self.node
        assert node is not None
        out = []
        extra = self.make_cold("cold")
        measured = "cold" in self.columns
        r, fetched = self.lazy(w, "damselfly cold" + ("" if measured else " (preparation, not measured)"))
        if measured:
            out.append(report(Run(rate, w.key, "cold", i, r, {**extra, "layer_sources": fetched})))
        if self.columns & {"warm", "warm-cache"}:
            fill_s = fill_cache(
                node.containerd,
                node.serve,
                self.dst,
                snapshotter=SNAPSHOTTER,
                hold_key=HOLD_KEY,
                timeout=CACHE_TIMEOUT,
                log=node.runs_log,
            )
            daemon = node.serve.daemon_pid()
            log(f"  cache complete and verified {fill_s:.1f}s after the cold run (daemon {daemon})")
            for column in ("warm", "warm-cache"):
                if column not in self.columns:
                    continue
                if column == "warm-cache":
                    node.containerd.image_rm(self.dst, node.runs_log)
                r, fetched = self.lazy(w, COLUMNS[column].title)
                if node.serve.daemon_pid() != daemon:
                    raise OSError(f"{column} run: the device daemon that filled the cache ({daemon}) is gone")
                warm_fetched = fetched["registry_bytes"] + fetched["peer_bytes"]
                if warm_fetched:
                    log(f"  {column}: the daemon fetched {warm_fetched} layer bytes (incomplete cache?)")
                extra = {"fill_s": fill_s, "warm_fetched": warm_fetched, "layer_sources": fetched}
                out.append(report(Run(rate, w.key, column, i, r, extra)))
        node.containerd.image_rm(self.dst, node.runs_log)
        return out

    def p2p_group(self, w: Workload, rate: float, i: int) -> list[Run]:
        node, parent = self.node, self.parent
        assert node is not None and parent is not None
        extra = self.make_cold("p2p")
        uploaded = parent.sources().uploaded_bytes
        r, fetched = self.lazy(w, COLUMNS["p2p"].title)
        extra |= {
            "layer_sources": fetched,
            "parent_uploaded_bytes": parent.sources().uploaded_bytes - uploaded,
        }
        node.containerd.image_rm(self.dst, node.runs_log)
        return [report(Run(rate, w.key, "p2p", i, r, extra))]

    def prefetch_group(self, w: Workload, rate: float, i: int) -> list[Run]:
        node = self.node
        assert node is not None
        extra = self.make_cold("prefetch")
        cid = "bench-prefetch"
        seen: dict[str, Any] = {}

        def after_run() -> None:
            try:
                seen.update(prefetch_summary(node.serve.devices()))
            finally:
                node.containerd.ctr("containers", "rm", cid, log=node.runs_log)

        r, fetched = self.lazy(w, COLUMNS["prefetch"].title, cid, after_run)
        extra |= {"layer_sources": fetched, "prefetch": seen}
        node.containerd.image_rm(self.dst, node.runs_log)
        return [report(Run(rate, w.key, "prefetch", i, r, extra))]

    def measure(self, w: Workload, rate: float, runs: int) -> list[Run]:
        assert self.link is not None
        self.link.set_rate(rate)
        log(f"registry link: tbf {rate:g} Mbit/s; workload {w.title!r}")
        do: dict[str, Callable[[Workload, float, int], list[Run]]] = {
            "overlayfs": self.overlayfs_group,
            "cold": self.damselfly_group,
            "p2p": self.p2p_group,
            "prefetch": self.prefetch_group,
        }
        groups = [g[0] for g in GROUPS if self.columns & set(g)]
        out: list[Run] = []
        for i in range(runs):
            for g in groups if i % 2 == 0 else groups[::-1]:
                out += do[g](w, rate, i)
        return out

    # -- teardown -------------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        undone: list[str] = []
        for proc in list(self.children):
            note = procs.stop_popen(proc, signal.SIGINT, 60.0)
            undone += [note] if note else []
        steps: list[tuple[str, Callable[[], list[str]]]] = []
        node = self.node
        if node is not None:
            steps += [
                ("containerd", node.containerd.stop),
                ("damselfly serve", node.serve.stop),
                ("device daemon", node.serve.release),
            ]
        if self.parent is not None:
            steps.append(("P2P parent", self.parent.stop))
        steps.append(("registry", self._stop_registry))
        undone += procs.stop_all(steps)
        if node is not None:
            with contextlib.suppress(OSError):
                node.serve.keep_daemon_log(node.devd_log)
            undone += node.cgroup.remove()
        if self.parent is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.parent.log, self.logs / "parent-devd.log")
        undone += procs.sweep(self.run_dir)
        if self.lab is not None:
            try:
                self.lab.close()
                self.lab_record.unlink(missing_ok=True)
            except NetLabError as e:
                undone.append(f"network lab: {'; '.join(e.problems)}")
        if self.run_dir.exists() and not procs.mounts_below(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return undone

    def _stop_registry(self) -> list[str]:
        note = self.registry.stop() if self.registry is not None else None
        return [f"registry: {note}"] if note else []

    def leftovers(self) -> list[str]:
        found = [f"process {pid}: {' '.join(a)[:100]}" for pid, a in procs.processes_naming(self.run_dir)]
        found += [f"mount {mp}" for mp in procs.mounts_below(self.work)]
        found += [f"loop device {dev}" for dev in procs.loops_below(self.work)]
        if self.node is not None:
            found += [f"cgroup {d}" for d in self.node.cgroup.dirs()]
            found += [f"device daemon {p}" for p in self.node.serve.daemon_pids if procs.alive(p)]
        if self.lab is not None:
            found += [f"link {self.lab.bridge}"] if link_exists(self.lab.bridge) else []
            for net in self.lab.nodes:
                found += [f"network namespace {net.netns}"] if netns_exists(net.netns) else []
        if self.run_dir.exists():
            found.append(f"directory {self.run_dir}")
        return found


def report(run: Run) -> Run:
    log("  " + progress_line(run))
    return run


def _names(text: str, known: Sequence[str], what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown or not names:
        p.error(f"{what}: {', '.join(unknown) or 'none given'}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one run, the first rate only (development)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rates", default="1000,100", help="registry link rates, Mbit/s, comma-separated")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    p.add_argument(
        "--columns", default=None, help=f"of {', '.join(COLUMNS)} (default: {', '.join(DEFAULT_COLUMNS)})"
    )
    p.add_argument("--trace-seconds", type=float, default=None, help="record-trace --seconds")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--convert-cache", type=Path, default=DEFAULT_CONVERT_CACHE)
    p.add_argument("--image-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument(
        "--from-json", type=Path, help="only write the report of an earlier run's JSON to --output"
    )
    a = p.parse_args(argv)
    if a.from_json is not None:
        publish(json.loads(a.from_json.read_text()), a.output)
        log(f"wrote {a.output} and its .png, .json from {a.from_json}")
        return 0
    runs = 1 if a.quick else a.runs
    rates = [float(r) for r in a.rates.split(",") if r.strip()][: 1 if a.quick else None]
    if runs < 1 or not rates:
        p.error("need at least one run and one rate")
    workloads = _names(a.workloads, list(WORKLOADS), "unknown workloads", p)
    remarks: list[str] = []
    if a.columns is None:
        columns = list(DEFAULT_COLUMNS)
        if not has_record_trace():
            columns.remove("prefetch")
            log("this damselfly has no record-trace: the prefetch column is left out")
            remarks.append(
                "damselfly with trace prefetch: not measured (this damselfly has no `record-trace`)"
            )
    else:
        chosen = _names(a.columns, list(COLUMNS), "unknown columns", p)
        columns = [c for c in COLUMNS if c in chosen]  # the table's order
        if "prefetch" in columns and not has_record_trace():
            p.error("--columns prefetch: this damselfly has no record-trace")
    if os.geteuid() != 0:
        log("needs root: containerd, mounts, loop devices, network namespaces")
        return 1
    work = a.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    lock = (work / ".lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another bench_coldstart is running in {work}")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    command = "python scripts/bench_coldstart.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(f"nproc {os.cpu_count()}"),
        "command": command,
        "code": (git("rev-parse", "--short", "HEAD") or "?")
        + (" + uncommitted changes" if git("status", "--porcelain") else ""),
        "load_start": loadavg(),
    }
    bench = Bench(work, a.convert_cache.resolve(), a.image_cache.resolve(), columns, a.trace_seconds)
    if not bench.prefetch_key:
        remarks.append("this damselfly has no `[remote] prefetch` key: the node's config leaves it out")
    log(f"columns {', '.join(columns)}; workloads {', '.join(workloads)}; rates {rates}; {runs} run(s)")
    status = 0
    try:
        bench.prepare()
        bench.start()
        image = bench.push_and_convert()
        if "p2p" in columns:
            bench.start_parent()
        all_runs: list[Run] = []
        for key in workloads:
            w = WORKLOADS[key]
            if "prefetch" in columns:
                bench.record_trace(w)
            for rate in rates:
                all_runs += bench.measure(w, rate, runs)
        meta["minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
        meta["load_end"] = loadavg()
        out: Path = a.output
        raw: dict[str, Any] = {
            "meta": {**meta, "columns": columns, "workloads": workloads, "rates": rates, "remarks": remarks},
            "image": {
                **image.to_json(),
                "converted_layer_bytes": layer_bytes(bench.dst),
                "ref": bench.src,
                "dst": bench.dst,
            },
            "runs": [r.to_json() for r in all_runs],
        }
        publish(raw, out)
        print(out.read_text())
        log(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
    except Interrupted as e:
        log(f"interrupted ({e})")
        status = 130
    except Exception as e:
        log(f"failed: {type(e).__name__}: {e}; logs in {bench.logs}")
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not leave half of it behind
        log("cleanup (Ctrl-C is ignored until done)")
        undone = bench.cleanup()
        if undone:
            log(f"had to force: {'; '.join(undone)}")
        left = bench.leftovers()
        if left:
            log(f"left behind (remove by hand): {'; '.join(left)}")
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
