"""The cold-start benchmark's vocabulary and report (``scripts/bench_coldstart.py``): its workloads, its
columns and what each means, one measured `Run`, the medians per (rate, workload, column), issue 14's
targets, the Markdown report and the PNG plot.

Nothing here starts a process: the benchmark measures, this module only reads its `Run` records (the
tests build them by hand).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state, Agg writes the PNG

from .coldstart import StartResult

MB = 1e6
#: The link rate issue 14's targets are stated at.
TARGET_RATE = 1000.0


@dataclass(frozen=True)
class Workload:
    key: str
    command: tuple[str, ...]
    #: The container's first output line: the measured point.
    expect: str
    title: str


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload("hello", ("python3", "-c", 'print("hello")'), "hello", "hello"),
        Workload(
            "imports",
            (
                "python3",
                "-c",
                "import json, email, http.server, sqlite3, xml.dom.minidom, asyncio, unittest; "
                'print("imported")',
            ),
            "imported",
            "many imports",
        ),
    )
}


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    definition: str


#: In table order. The definitions are the report's; the benchmark's module docstring says the same.
COLUMNS: dict[str, Column] = {
    c.key: c
    for c in (
        Column(
            "overlayfs",
            "overlayfs full pull",
            "the image's content and snapshots removed from containerd, page cache dropped; "
            "`ctr image pull` + `ctr run` of the original gzip image on containerd's overlayfs",
        ),
        Column(
            "overlayfs-warm",
            "overlayfs warm",
            "right after a full pull: the image pulled and unpacked (content and snapshots kept), page "
            "cache dropped; `ctr image pull` again (it resolves the manifest at the registry and finds "
            "every blob and snapshot present) + `ctr run`",
        ),
        Column(
            "cold",
            "damselfly cold",
            "`damselfly serve` restarted on an empty root and device-daemon state (no content, snapshots "
            "or device cache of the image), `[remote] prefetch = false` (no trace replay); the clock "
            "starts once the device daemon that serve starts at its own start answers (a node runs serve "
            "long before a pull; the runs table has how long it took); page cache dropped; "
            "`damselfly rpull --state-dir` (the node's device daemon) + `ctr run --snapshotter damselfly`",
        ),
        Column(
            "warm",
            "damselfly warm",
            "right after a cold run: a view of the image keeps its device attached until every blob is "
            "complete and verified (`damselfly devices`), then the view goes (no container or view "
            "left: the chain mount is released and the device detached); the image and its snapshots "
            "stay in containerd, the device daemon keeps running with its complete cache; page cache "
            "dropped; `damselfly rpull` + `ctr run --snapshotter damselfly` (`warm_fetched` in the JSON: "
            "layer bytes the daemon fetched during the run, 0 when the cache served every read)",
        ),
        Column(
            "warm-cache",
            "damselfly warm, device cache only",
            "right after a warm run, the image also removed from containerd (content and snapshots), "
            "the device daemon and its complete cache kept; page cache dropped; `damselfly rpull` + "
            '`ctr run` (the first version\'s "warm")',
        ),
        Column(
            "p2p",
            "damselfly from a P2P parent",
            "as cold, but the node's `[p2p]` is on: its members are itself and a parent, the seed (the "
            "root of every blob's tree): a device daemon in a network namespace of its own on the lab's "
            "bridge, unshaped, whose cache holds the complete image (mounted once at the start, its "
            "background download complete, the mount kept); `rpull --state-dir` (the image config "
            "through the peer network too); the layer bytes' sources are in the runs table",
        ),
        Column(
            "prefetch",
            "damselfly with trace prefetch",
            "before a workload's runs, `damselfly record-trace` ran it once on the node and pushed the "
            "trace to the registry as a referrer of the converted manifest; then as cold, but with "
            "`[remote] prefetch = true` (the default): the chain mount replays the trace. `ctr run` "
            "without `--rm`; once it returned (inside the measured span) `damselfly devices` gives the "
            "prefetch counters and `ctr containers rm` removes the container",
        ),
    )
}
DEFAULT_COLUMNS = ("overlayfs", "overlayfs-warm", "cold", "warm", "p2p", "prefetch")


@dataclass
class Run:
    rate_mbit: float
    workload: str
    column: str
    index: int
    result: StartResult
    #: What the column knows besides the result: fill_s, warm_fetched, layer_sources, prefetch, ...
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "rate_mbit": self.rate_mbit,
            "workload": self.workload,
            "column": self.column,
            "run": self.index + 1,
            "result": dataclasses.asdict(self.result),
            **self.extra,
        }


def run_from_json(d: Mapping[str, Any]) -> Run:
    """`Run.to_json` in reverse."""
    extra = {k: v for k, v in d.items() if k not in ("rate_mbit", "workload", "column", "run", "result")}
    return Run(d["rate_mbit"], d["workload"], d["column"], d["run"] - 1, StartResult(**d["result"]), extra)


def prefetch_summary(status: Mapping[str, Any]) -> dict[str, Any]:
    """The ``prefetch`` counters of every device in a device daemon's status (``damselfly devices``),
    summed, with each device's own; {} when no device has any (the daemon does not prefetch)."""
    per = {
        name: dict(dev["prefetch"])
        for name, dev in status.get("devices", {}).items()
        if isinstance(dev.get("prefetch"), Mapping)
    }
    if not per:
        return {}
    out: dict[str, Any] = {
        k: sum(int(p.get(k, 0)) for p in per.values())
        for k in ("fetched_bytes", "read_units", "read_units_prefetched", "read_units_waited")
    }
    out["state"] = ",".join(sorted({str(p.get("state", "?")) for p in per.values()}))
    out["devices"] = per
    return out


def medians(runs: Sequence[Run], rate: float, workload: str, column: str) -> dict[str, float] | None:
    """Medians (and the min and max time) of one cell; None if it has no run."""
    rs = [r.result for r in runs if (r.rate_mbit, r.workload, r.column) == (rate, workload, column)]
    if not rs:
        return None
    return {
        "first_output_s": statistics.median(r.first_output_s for r in rs),
        "node_cpu_s": statistics.median(r.node_cpu_s for r in rs),
        "registry_bytes": statistics.median(r.registry_bytes for r in rs),
        "min_s": min(r.first_output_s for r in rs),
        "max_s": max(r.first_output_s for r in rs),
        "n": len(rs),
    }


@dataclass(frozen=True)
class Target:
    name: str
    #: The measured figure, as the report prints it ("-": a column it needs was not measured).
    measured: str
    met: bool | None


def targets(runs: Sequence[Run], rate: float, workload: str) -> list[Target]:
    """Issue 14's four targets for one (rate, workload), from the medians."""

    def get(column: str, key: str = "first_output_s") -> float | None:
        m = medians(runs, rate, workload, column)
        return None if m is None else m[key]

    full, full_warm, cold, warm, pre = (
        get(c) for c in ("overlayfs", "overlayfs-warm", "cold", "warm", "prefetch")
    )
    out = []
    if full and cold is not None:
        out.append(
            Target(
                "damselfly cold <= 10% of overlayfs' time to first output",
                f"{cold / full:.0%}",
                cold <= 0.1 * full,
            )
        )
    else:
        out.append(Target("damselfly cold <= 10% of overlayfs' time to first output", "-", None))
    if warm is not None and full_warm is not None:
        out.append(
            Target(
                "damselfly warm <= overlayfs warm",
                f"{warm:.2f} s vs {full_warm:.2f} s ({warm / full_warm:.0%})",
                warm <= full_warm,
            )
        )
    else:
        out.append(Target("damselfly warm <= overlayfs warm", "-", None))
    gap = "trace prefetch closes >= 90% of the cold-warm gap, (cold - prefetch) / (cold - warm)"
    if cold is not None and warm is not None and pre is not None and cold > warm:
        closed = (cold - pre) / (cold - warm)
        out.append(Target(gap, f"{closed:.0%}", closed >= 0.9))
    else:
        out.append(Target(gap, "-", None))
    cpu_full, cpu_cold = get("overlayfs", "node_cpu_s"), get("cold", "node_cpu_s")
    name = "node CPU-seconds of damselfly cold <= 30% of overlayfs'"
    if cpu_full and cpu_cold is not None:
        out.append(Target(name, f"{cpu_cold / cpu_full:.0%}", cpu_cold <= 0.3 * cpu_full))
    else:
        out.append(Target(name, "-", None))
    return out


def _mb(n: float) -> str:
    """Bytes as MB, small counts (a warm start's manifest and config) with their kB."""
    return f"{n / MB:.1f}" if n >= 0.1 * MB else f"{n / MB:.4f} ({n / 1e3:.1f} kB)"


def _ratio(x: float, base: Mapping[str, float] | None, key: str) -> str:
    """`x` as a share of the `key` of `base` (medians), "-" without a base."""
    return f"{x / base[key]:.0%}" if base and base[key] else "-"


def fmt_bytes(n: float) -> str:
    """``17.6 MB``, ``3.1 kB``, ``0 B``."""
    if n >= 0.1 * MB:
        return f"{n / MB:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n else "0 B"


def notes(run: Run) -> str:
    """What the column knows besides the result (the runs table's last cell, the progress log)."""
    e = run.extra
    parts = []
    if "daemon_wait_s" in e:
        parts.append(f"daemon answered {e['daemon_wait_s']:.2f} s after serve")
    src = e.get("layer_sources")
    if src:
        parts.append(
            f"layer bytes fetched: {fmt_bytes(src['registry_bytes'])} from the registry, "
            f"{fmt_bytes(src['peer_bytes'])} from peers"
        )
    if "parent_uploaded_bytes" in e:
        parts.append(f"the parent uploaded {fmt_bytes(e['parent_uploaded_bytes'])}")
    if "fill_s" in e:
        parts.append(f"cache complete {e['fill_s']:.1f} s after the cold run")
    pre = e.get("prefetch")
    if pre:
        units = pre["read_units"]
        share = f"{pre['read_units_prefetched'] / units:.0%}" if units else "-"
        parts.append(
            f"prefetch {pre['state']}: {fmt_bytes(pre['fetched_bytes'])} fetched, "
            f"{pre['read_units_prefetched']}/{units} read units prefetched ({share}), "
            f"{pre.get('read_units_waited', '?')} waited"
        )
    elif "prefetch" in e:
        parts.append("no prefetch counters in `damselfly devices`")
    return "; ".join(parts)


def progress_line(run: Run) -> str:
    """One line about a run, for the benchmark's progress log."""
    r = run.result
    return (
        f"{run.rate_mbit:g} Mbit/s, {WORKLOADS[run.workload].title}, {COLUMNS[run.column].title} "
        f"(run {run.index + 1}): first output {r.first_output_s:.2f}s (pull {r.pull_s:.2f}s), node CPU "
        f"{r.node_cpu_s:.2f}s, registry {fmt_bytes(r.registry_bytes)} in {r.registry_requests} requests"
        + (f"; {notes(run)}" if run.extra else "")
    )


def render(
    runs: Sequence[Run],
    rates: Sequence[float],
    workloads: Sequence[str],
    columns: Sequence[str],
    image: str,
    meta: Mapping[str, Any],
    remarks: Sequence[str] = (),
) -> str:
    """The Markdown report: where and how, the definitions, the medians with ratios to the overlayfs
    full pull, issue 14's targets, every run."""
    n = max((int(m["n"]) for r in runs if (m := medians(runs, r.rate_mbit, r.workload, r.column))), default=0)
    lines = [
        "# Cold start over a shaped link: overlayfs vs damselfly",
        "",
        f"Generated {meta['date']} by `scripts/bench_coldstart.py` in {meta['minutes']} min; code at "
        f"{meta['code']}; load average {meta['load_start']} at start, {meta['load_end']} at end.",
        "",
        f"- machine: {meta['machine']}",
        f"- command: `{meta['command']}`",
        f"- image: {image}",
        "- workloads (on the same image): "
        + "; ".join(f"{WORKLOADS[w].title}: `{shlex.join(WORKLOADS[w].command)}`" for w in workloads),
        "- link: `docker-registry` in its own network namespace behind a veth with tbf (both directions) "
        "at the rate of the row; the node (containerd, `damselfly serve`, its device daemon) in the root "
        "namespace, unshaped, reaching the registry over the lab's bridge",
        "- time: seconds from the pull's start (`ctr image pull` / `damselfly rpull`) to the first line the "
        "container printed (`ctr run`); node CPU: user + system seconds of the node's cgroup (containerd, "
        "shims, `damselfly serve`, device daemon, ctr, rpull; not the container, not a P2P parent) until "
        "`ctr run` returned; registry bytes: body bytes in the registry's access log over the same span",
        f"- medians of {n} run{'s' if n != 1 else ''} per cell (min-max of the time in brackets); "
        "within each rate and workload "
        "the groups of columns (overlayfs full pull then warm; damselfly cold then warm; P2P; prefetch) "
        "go in one order on even runs and in the reverse order on odd ones",
        "",
        "Columns:",
        "",
        *[f"- **{COLUMNS[c].title}**: {COLUMNS[c].definition}" for c in columns],
        *([""] + [f"- {x}" for x in remarks] if remarks else []),
        "",
        "| link | workload | column | first output s | vs overlayfs | node CPU s | vs overlayfs | "
        "registry MB | vs overlayfs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        for w in workloads:
            base = medians(runs, rate, w, "overlayfs")
            for c in columns:
                m = medians(runs, rate, w, c)
                if m is None:
                    continue
                lines.append(
                    f"| {rate:g} Mbit/s | {WORKLOADS[w].title} | {COLUMNS[c].title} | "
                    f"{m['first_output_s']:.2f} ({m['min_s']:.2f}-{m['max_s']:.2f}) | "
                    f"{_ratio(m['first_output_s'], base, 'first_output_s')} | "
                    f"{m['node_cpu_s']:.2f} | {_ratio(m['node_cpu_s'], base, 'node_cpu_s')} | "
                    f"{_mb(m['registry_bytes'])} | "
                    f"{_ratio(m['registry_bytes'], base, 'registry_bytes')} |"
                )
    lines += [
        "",
        "## Issue 14's targets",
        "",
        f'Stated at {TARGET_RATE:g} Mbit/s; other rates are shown for information. Medians; "-": a column '
        "the target needs was not measured.",
        "",
        "| link | workload | target | measured | met |",
        "|---|---|---|---|---|",
    ]
    for rate in rates:
        for w in workloads:
            for t in targets(runs, rate, w):
                met = "-" if t.met is None else ("yes" if t.met else "**no**")
                if rate != TARGET_RATE and t.met is not None:
                    met = f"({'yes' if t.met else 'no'}: not the target's rate)"
                lines.append(f"| {rate:g} Mbit/s | {WORKLOADS[w].title} | {t.name} | {t.measured} | {met} |")
    lines += [
        "",
        "## Runs",
        "",
        "| link | workload | column | run | first output s | pull s | total s | node CPU s | registry MB | "
        "requests | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        r = run.result
        lines.append(
            f"| {run.rate_mbit:g} Mbit/s | {WORKLOADS[run.workload].title} | {COLUMNS[run.column].title} | "
            f"{run.index + 1} | {r.first_output_s:.2f} | {r.pull_s:.2f} | {r.total_s:.2f} | "
            f"{r.node_cpu_s:.2f} | {_mb(r.registry_bytes)} | {r.registry_requests} | {notes(run)} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    runs: Sequence[Run],
    rates: Sequence[float],
    workloads: Sequence[str],
    columns: Sequence[str],
    path: Path,
    title: str,
) -> None:
    """Three panels, one above the other (time to first output, node CPU, registry MB), each with a
    group of bars per (rate, workload) and one bar per column: the medians."""
    groups = [(rate, w) for rate in rates for w in workloads]
    fig = Figure(figsize=(max(9.0, 2.0 + 0.45 * len(groups) * len(columns)), 12.0))
    panels = (
        ("first_output_s", "seconds to first output"),
        ("node_cpu_s", "node CPU-seconds"),
        ("registry_bytes", "registry MB served (log scale)"),
    )
    width = 0.85 / len(columns)
    handles: list[Any] = []
    labels: list[str] = []
    for k, (key, panel_title) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, k + 1)
        for j, c in enumerate(columns):
            xs, values = [], []
            for i, (rate, w) in enumerate(groups):
                m = medians(runs, rate, w, c)
                if m is None:
                    continue
                xs.append(i + (j - (len(columns) - 1) / 2) * width)
                values.append(m[key] / MB if key == "registry_bytes" else m[key])
            bars = ax.bar(xs, values, width, label=COLUMNS[c].title)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
        ax.set_xticks(range(len(groups)), [f"{rate:g} Mbit/s\n{WORKLOADS[w].title}" for rate, w in groups])
        ax.set_title(panel_title)
        ax.margins(y=0.15)
        if key == "registry_bytes":
            ax.set_yscale("log")
        if k == 0:
            handles, labels = ax.get_legend_handles_labels()
    fig.suptitle(title)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.97), ncols=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.935))
    fig.savefig(path, dpi=110)


def publish(raw: Mapping[str, Any], out: Path) -> None:
    """Write the benchmark's raw record `raw` (meta, image, runs: what `bench_coldstart` measured) to
    `out` with the suffix ``.json``, and its report to `out` (Markdown) and ``.png`` beside it."""
    meta, image = raw["meta"], raw["image"]
    runs = [run_from_json(d) for d in raw["runs"]]
    rates, workloads, columns = meta["rates"], meta["workloads"], meta["columns"]
    desc = (
        f"the demo's Debian bookworm minbase + python3 + payload, {image['uncompressed_size'] / MB:.0f} MB "
        f"uncompressed, {image['compressed_size'] / MB:.0f} MB gzip ({len(image['layers'])} layers), "
        f"{image['converted_layer_bytes'] / MB:.0f} MB converted (lz4)"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    out.write_text(render(runs, rates, workloads, columns, desc, meta, meta.get("remarks", [])))
    title = (
        f"Cold start, {image['uncompressed_size'] / 1e9:.1f} GB Debian + python3 image, registry behind "
        "tbf (medians)"
    )
    plot(runs, rates, workloads, columns, out.with_suffix(".png"), title)
