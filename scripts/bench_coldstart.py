#!/usr/bin/env python3
"""Cold start over a shaped link (issue 14, item 1, first increment): the demo's image, the registry
behind a `tbf` link, overlayfs against damselfly cold and warm.

    bench_coldstart.py [--quick] [--runs N] [--rates 1000,100] [--work-dir DIR] [--output MD]

Needs root. HelloBench style: seconds from the pull's start to the workload's first output line
(`demolib.coldstart.cold_start`: page cache dropped first; node CPU from the node's cgroup; registry
bytes from the registry's access log). The machinery is the demo's (``scripts/demo.py``: its `Node`,
one containerd + `damselfly serve` in a cgroup) with one difference: here the *registry* is in a
network namespace of its own (`demolib.netlab`), behind a veth shaped with tbf to each rate in turn;
the node stays in the root namespace and reaches it over the lab's bridge.

Columns (per rate; runs alternate: even runs overlayfs first, odd runs damselfly first):

- **overlayfs full pull**: ``ctr image pull`` + ``ctr run`` of the original gzip image on overlayfs,
  the image's content and snapshots removed before;
- **damselfly cold**: `damselfly serve` reset (root and device-daemon state, so the device cache,
  deleted; the daemon stopped), containerd's image and snapshots removed, then ``damselfly rpull`` +
  ``ctr run --snapshotter damselfly``;
- **damselfly warm**: right after a cold run, a view of the image keeps its device attached until the
  background download has every blob complete and verified (``damselfly devices``); then the view and
  the image are removed from containerd (its GC removes the snapshots: the chain is unmounted and the
  device detached) while the device daemon keeps running with its cache; then the same as cold. So
  "warm" = a node that ran this image before and still has all of its blocks in damselfly's cache, but
  neither containerd's content nor snapshots of it, nor anything in the page cache (the cache files
  are read from the disk again). `rpull` still fetches the manifest and config from the registry; the
  layer bytes come from the local cache (the warm runs' ``warm_fetched``, the daemon's own count of
  layer bytes fetched during the run, says so: 0).

Not yet here (later increments of issue 14): the trace-prefetch column, the P2P-parent column, the
second (many-files) image.

Output: ``--output`` (Markdown: machine, command, date, definitions, the table of medians with ratios
to overlayfs), a PNG plot and the raw JSON beside it. Everything it started is stopped and removed at
the end, also on Ctrl-C (SIGINT, SIGTERM) or a failure: processes by pid, mounts and loop devices by
path, the cgroup, the network lab by the names it made, the run directory. Logs stay in
``WORK/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from build_debian_image import DEFAULT_CACHE, BuiltImage, ImageSpec, build_image
from demo import SNAPSHOTTER, Node, remove_stale_lab
from demolib import procs
from demolib.coldstart import LayerSources, StartResult, cold_start
from demolib.netlab import NetLab, NetLabError, NetNode, link_exists, netns_exists
from demolib.registry import Registry, layer_bytes, push_layout
from demolib.report import REPO, git, loadavg, machine
from demolib.serve import damselfly_argv
from matplotlib.figure import Figure  # no pyplot: no global state, Agg writes the PNG

DEFAULT_WORK = REPO / "bench" / "work" / "coldstart"
#: The demo's converted layers: the same image converts to the same blobs, so reuse them.
DEFAULT_CONVERT_CACHE = REPO / "bench" / "work" / "demo" / "cache" / "convert"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "coldstart.md"
HOLD_KEY = "damselfly-bench-hold"
CACHE_TIMEOUT = 900.0
COMMAND = ["python3", "-c", 'print("hello")']
EXPECT = "hello"
COLUMNS = ("overlayfs", "cold", "warm")
TITLES = {
    "overlayfs": "overlayfs full pull",
    "cold": "damselfly cold",
    "warm": "damselfly warm (cache complete)",
}
MB = 1e6


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclasses.dataclass
class Run:
    rate_mbit: float
    column: str
    index: int
    result: StartResult
    #: warm only: seconds from the cold run's end until every blob was complete and verified
    fill_s: float | None = None
    #: warm only: layer bytes the device daemon fetched during the run (0: all from its cache)
    warm_fetched: int | None = None


class Bench:
    def __init__(self, work: Path, convert_cache: Path, image_cache: Path) -> None:
        self.work = work
        self.run_dir = work / "run"
        self.logs = work / "logs"
        self.lab_record = work / "netlab.json"
        self.convert_cache = convert_cache
        self.image_cache = image_cache
        self.lab: NetLab | None = None
        self.link: NetNode | None = None  # the registry's namespace
        self.registry: Registry | None = None
        self.node: Node | None = None
        self.children: list[subprocess.Popen[bytes]] = []
        self.held = False

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

    def start(self) -> None:
        lab = self.lab = NetLab()
        self.lab_record.write_text(json.dumps({"bridge": lab.bridge, "nodes": []}) + "\n")
        link = self.link = lab.add_node("registry")  # unshaped while pushing and converting
        record = {"bridge": lab.bridge, "nodes": [[link.host_veth, link.netns]]}
        self.lab_record.write_text(json.dumps(record) + "\n")
        self.registry = Registry(
            self.run_dir / "registry", self.logs / "registry.log", bind=link.ip, wrap=link.argv
        )
        self.registry.start()
        log(f"network lab {lab.bridge}: registry http://{self.registry.host} in {link.netns}")
        node = self.node = Node(
            "node", self.run_dir, self.logs, "", self.cgroup_name, self.registry, self.children
        )
        node.serve.tables = {"remote": {"plain_http": True}}
        node.cgroup.create()
        node.start()
        log(f"node: containerd {node.containerd.address}, damselfly serve {node.serve.socket}")

    def push_and_convert(self) -> tuple[BuiltImage, str, str]:
        assert self.registry is not None
        image = build_image(ImageSpec(variant="debian", target_mb=1100), self.image_cache)
        name = "demo/python"
        src = f"{self.registry.host}/{name}:latest"
        log(f"pushing {image.layout_dir} to {src}")
        push_layout(
            self.registry.host, Path(image.layout_dir), image.manifest_digest, name, "latest", lambda n: None
        )
        dst = f"{self.registry.host}/{name}:damselfly"
        argv = [
            *damselfly_argv(), "convert", src, dst, "--plain-http", "--cache-dir", str(self.convert_cache)
        ]  # fmt: skip
        log(f"damselfly convert {src} {dst} (cache {self.convert_cache})")
        with (self.logs / "convert.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.children.append(proc)
            status = proc.wait()
            self.children.remove(proc)
        if status != 0:
            raise OSError(f"damselfly convert exited with status {status}; see {self.logs / 'convert.log'}")
        return image, src, dst

    # -- the columns ----------------------------------------------------------------------------------

    def overlayfs(self, src: str) -> StartResult:
        node = self.node
        assert node is not None
        node.containerd.image_rm(src, node.runs_log)
        pull = node.wrap(node.containerd.argv(["image", "pull", "--plain-http", src]))
        run = node.run_argv(src, "bench-full", COMMAND, "overlayfs")
        result = cold_start(node.bench, "overlayfs full pull", pull, run, EXPECT)
        node.containerd.image_rm(src, node.runs_log)
        return result

    def cold(self, dst: str) -> StartResult:
        node = self.node
        assert node is not None
        node.make_cold(dst)  # image and snapshots removed; serve reset: device cache deleted
        return self.lazy(dst, "damselfly cold")

    def lazy(self, dst: str, label: str) -> StartResult:
        node = self.node
        assert node is not None
        pull = node.rpull_argv(dst)
        run = node.run_argv(dst, "bench-lazy", COMMAND, SNAPSHOTTER)
        return cold_start(node.bench, label, pull, run, EXPECT)

    def fill(self, dst: str) -> float:
        """Keep the image's device attached until every blob is complete and verified; then remove the
        view and the image (device detached, daemon and its cache kept). Returns the seconds it took."""
        node = self.node
        assert node is not None
        node.containerd.hold(
            HOLD_KEY, node.containerd.top_chain_id(dst), snapshotter=SNAPSHOTTER, log=node.runs_log
        )
        self.held = True
        started = time.monotonic()
        while True:
            blobs = [b for b in node.serve.devices()["blobs"].values() if not b["local"]]
            if blobs and all(b["complete"] and b["verified"] for b in blobs):
                break
            failed = [b.get("error") for b in blobs if b.get("background") == "failed"]
            if failed:
                raise OSError(f"background download failed: {failed[0]}; see {node.serve.state}/devd.log")
            if time.monotonic() - started > CACHE_TIMEOUT:
                raise OSError(f"the cache of {dst} is not complete after {CACHE_TIMEOUT:.0f}s")
            time.sleep(0.5)
        took = time.monotonic() - started
        node.containerd.unhold(HOLD_KEY, snapshotter=SNAPSHOTTER, log=node.runs_log)
        self.held = False
        node.containerd.image_rm(dst, node.runs_log)
        return took

    def warm(self, dst: str, daemon: int | None) -> tuple[StartResult, int]:
        """Run after `fill` (see the module docstring): the device daemon that filled the cache must
        still be the one running. Returns the result and the layer bytes the daemon fetched during the
        run (its own counter, `LayerSources`: 0 when the cache served every read)."""
        node = self.node
        assert node is not None
        if daemon is None or node.serve.daemon_pid() != daemon:
            raise OSError(f"warm run: the device daemon that filled the cache (pid {daemon}) is gone")
        before = LayerSources.of(node.serve.devices())
        result = self.lazy(dst, "damselfly warm")
        after = LayerSources.of(node.serve.devices())
        fetched = after.registry_bytes + after.peer_bytes - before.registry_bytes - before.peer_bytes
        return result, fetched

    def measure(self, rate: float, runs: int, src: str, dst: str) -> list[Run]:
        assert self.link is not None and self.node is not None
        self.link.set_rate(rate)
        log(f"registry link: tbf {rate:g} Mbit/s")
        out: list[Run] = []
        for i in range(runs):
            order = ("overlayfs", "lazy") if i % 2 == 0 else ("lazy", "overlayfs")
            for kind in order:
                if kind == "overlayfs":
                    r = self.overlayfs(src)
                    out.append(Run(rate, "overlayfs", i, r))
                    report(out[-1])
                    continue
                r = self.cold(dst)
                out.append(Run(rate, "cold", i, r))
                report(out[-1])
                fill_s = self.fill(dst)
                daemon = self.node.serve.daemon_pid()
                log(f"  cache complete and verified {fill_s:.1f}s after the cold run (daemon {daemon})")
                r, fetched = self.warm(dst, daemon)
                out.append(Run(rate, "warm", i, r, fill_s, fetched))
                if fetched:
                    log(f"  warm run: the device daemon fetched {fetched} layer bytes (cache incomplete?)")
                report(out[-1])
                self.node.containerd.image_rm(dst, self.node.runs_log)
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
        steps.append(("registry", self._stop_registry))
        undone += procs.stop_all(steps)
        if node is not None:
            with contextlib.suppress(OSError):
                node.serve.keep_daemon_log(node.devd_log)
            undone += node.cgroup.remove()
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


def report(run: Run) -> None:
    r = run.result
    log(
        f"  {run.rate_mbit:g} Mbit/s, {TITLES[run.column]} (run {run.index + 1}): first output "
        f"{r.first_output_s:.2f}s (pull {r.pull_s:.2f}s), node CPU {r.node_cpu_s:.2f}s, registry "
        f"{r.registry_bytes / MB:.1f} MB in {r.registry_requests} requests"
    )


# -- the report ---------------------------------------------------------------------------------------


def medians(runs: Sequence[Run], rate: float, column: str) -> dict[str, float]:
    rs = [r.result for r in runs if r.rate_mbit == rate and r.column == column]
    return {
        "first_output_s": statistics.median(r.first_output_s for r in rs),
        "node_cpu_s": statistics.median(r.node_cpu_s for r in rs),
        "registry_bytes": statistics.median(r.registry_bytes for r in rs),
        "min_s": min(r.first_output_s for r in rs),
        "max_s": max(r.first_output_s for r in rs),
        "n": len(rs),
    }


def _mb(n: float) -> str:
    """Bytes as MB, small counts (a warm start's manifest and config) with their kB."""
    return f"{n / MB:.1f}" if n >= 0.1 * MB else f"{n / MB:.4f} ({n / 1e3:.1f} kB)"


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.0%}" if base > 0 else "-"


def render(
    runs: Sequence[Run], rates: Sequence[float], image: BuiltImage, converted: int, meta: dict[str, str]
) -> str:
    lines = [
        "# Cold start over a shaped link: overlayfs vs damselfly (baseline)",
        "",
        f"Generated {meta['date']} by `scripts/bench_coldstart.py` in {meta['minutes']} min; code at "
        f"{meta['code']}; load average {meta['load_start']} at start, {meta['load_end']} at end.",
        "",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- image: the demo's Debian bookworm minbase + python3 + payload, "
        f"{image.uncompressed_size / MB:.0f} MB uncompressed, {image.compressed_size / MB:.0f} MB gzip "
        f"({len(image.layers)} layers), {converted / MB:.0f} MB converted (lz4); workload "
        f"`{shlex.join(COMMAND)}`",
        "- link: `docker-registry` in its own network namespace behind a veth with tbf (both directions) "
        "at the rate of the row; the node (containerd, `damselfly serve`, its device daemon) in the root "
        "namespace, unshaped, reaching the registry over the lab's bridge",
        "- time: seconds from the pull's start (`ctr image pull` / `damselfly rpull`) to the first line the "
        "container printed (`ctr run`); node CPU: user + system seconds of the node's cgroup (containerd, "
        "shims, `damselfly serve`, device daemon, ctr, rpull; not the container) until `ctr run` returned; "
        "registry bytes: body bytes in the registry's access log over the same span",
        "- overlayfs full pull: image content and snapshots removed, page cache dropped; "
        "`ctr image pull` + `ctr run` on overlayfs",
        "- damselfly cold: page cache dropped, no content, snapshots or device cache of the image "
        "(`damselfly serve` restarted on an empty root and state: its device daemon starts on demand)",
        "- damselfly warm: the node ran the image before and its device cache is complete (every blob "
        "complete and verified, `damselfly devices`), the device daemon still running; containerd's "
        "image and snapshots removed (chain unmounted, device detached), page cache dropped. `rpull` "
        "still resolves the image at the registry (the requests column); the layer bytes come from the "
        "device cache (the warm runs' JSON has `warm_fetched`: the layer bytes the daemon fetched, 0)",
        f"- medians of {max(int(medians(runs, rates[0], c)['n']) for c in COLUMNS)} runs per cell "
        "(min-max of the time in brackets); within each rate, overlayfs and the damselfly pair "
        "(cold, then warm) alternate which goes first",
        "- not yet measured (later increments of issue 14): damselfly with trace prefetch, damselfly from "
        "a P2P parent, the second (many-files) image",
        "",
        "| link | column | first output s | vs overlayfs | node CPU s | vs overlayfs | registry MB | "
        "vs overlayfs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        base = medians(runs, rate, "overlayfs")
        for column in COLUMNS:
            m = medians(runs, rate, column)
            lines.append(
                f"| {rate:g} Mbit/s | {TITLES[column]} | {m['first_output_s']:.2f} "
                f"({m['min_s']:.2f}-{m['max_s']:.2f}) | "
                f"{_ratio(m['first_output_s'], base['first_output_s'])} | "
                f"{m['node_cpu_s']:.2f} | {_ratio(m['node_cpu_s'], base['node_cpu_s'])} | "
                f"{_mb(m['registry_bytes'])} | {_ratio(m['registry_bytes'], base['registry_bytes'])} |"
            )
    lines += [
        "",
        "Issue 14's targets at 1 Gbit/s: damselfly cold <= 10% of overlayfs' time to first output, "
        "node CPU <= 30% of overlayfs'.",
        "",
        "## Runs",
        "",
        "| link | column | run | first output s | pull s | total s | node CPU s | registry MB | requests |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        r = run.result
        lines.append(
            f"| {run.rate_mbit:g} Mbit/s | {TITLES[run.column]} | {run.index + 1} | {r.first_output_s:.2f} | "
            f"{r.pull_s:.2f} | {r.total_s:.2f} | {r.node_cpu_s:.2f} | {_mb(r.registry_bytes)} | "
            f"{r.registry_requests} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], rates: Sequence[float], path: Path) -> None:
    fig = Figure(figsize=(13, 4.2))
    panels = (
        ("first_output_s", "seconds to first output"),
        ("node_cpu_s", "node CPU-seconds"),
        ("registry_bytes", "registry MB served"),
    )
    width = 0.8 / len(COLUMNS)
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for j, column in enumerate(COLUMNS):
            values = [medians(runs, rate, column)[key] for rate in rates]
            if key == "registry_bytes":
                values = [v / MB for v in values]
            xs = [i + (j - (len(COLUMNS) - 1) / 2) * width for i in range(len(rates))]
            bars = ax.bar(xs, values, width, label=TITLES[column])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(rates)), [f"{r:g} Mbit/s" for r in rates])
        ax.set_title(title)
        if key == "registry_bytes":
            ax.set_yscale("log")
        if k == 0:
            ax.legend(fontsize=8)
    fig.suptitle("Cold start, 1.1 GB Debian + python3 image, registry behind tbf (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one run per cell (debugging)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rates", default="1000,100", help="registry link rates, Mbit/s, comma-separated")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--convert-cache", type=Path, default=DEFAULT_CONVERT_CACHE)
    p.add_argument("--image-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    a = p.parse_args(argv)
    runs = 1 if a.quick else a.runs
    rates = [float(r) for r in a.rates.split(",") if r.strip()]
    if runs < 1 or not rates:
        p.error("need at least one run and one rate")
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
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(f"nproc {os.cpu_count()}"),
        "command": command,
        "code": (git("rev-parse", "--short", "HEAD") or "?")
        + (" + uncommitted changes" if git("status", "--porcelain") else ""),
        "load_start": loadavg(),
    }
    bench = Bench(work, a.convert_cache.resolve(), a.image_cache.resolve())
    status = 0
    try:
        bench.prepare()
        bench.start()
        image, src, dst = bench.push_and_convert()
        converted = layer_bytes(dst)
        all_runs: list[Run] = []
        for rate in rates:
            all_runs += bench.measure(rate, runs, src, dst)
        meta["minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
        meta["load_end"] = loadavg()
        out: Path = a.output
        out.parent.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = {
            "meta": meta,
            "image": {**image.to_json(), "converted_layer_bytes": converted, "ref": src, "dst": dst},
            "runs": [{**dataclasses.asdict(r), "run": r.index + 1} for r in all_runs],
        }
        out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        out.write_text(render(all_runs, rates, image, converted, meta))
        plot(all_runs, rates, out.with_suffix(".png"))
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
