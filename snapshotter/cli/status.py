"""`damselfly status`: images, chains, devices, per-blob completeness, bytes by source, last errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..config import load
from ..status import daemon_status, report
from ..version import DISTRIBUTION
from .errors import reports_errors
from .serve import CONFIG_OPTION

#: Columns of the tables when the output is not a terminal.
PIPE_WIDTH = 200
#: Errors the table shows (the JSON form has every one the daemon keeps).
SHOWN_ERRORS = 10


@click.command("status")
@CONFIG_OPTION
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The snapshotter's root (overrides [snapshotter] root).",
)
@click.option(
    "--state-dir",
    envvar="DAMSELFLY_STATE_DIR",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The device daemon's state directory (overrides [device] state_dir).",
)
@click.option("--json", "as_json", is_flag=True, help="The stable machine form (docs/observability.md).")
@reports_errors
def status(config_path: Path | None, root: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """Show what is lazy and what is local: images and their chains (from `serve`'s metadata, read
    without it), the device daemon's devices, each blob's completeness and background download, the
    bytes read by source, the node cache and the last fetch errors. Works without `serve`; says so
    when no device daemon runs."""
    cfg = load(config_path)
    root_dir = str(root.absolute()) if root is not None else cfg.snapshotter.root
    state = str(state_dir.absolute()) if state_dir is not None else cfg.device.state_dir
    data = report(root_dir, state, daemon_status(state))
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    # Piped or logged: wide enough for whole digests and device names (a terminal keeps its width).
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    render(data, Console(highlight=False, soft_wrap=True, width=width))


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def render(data: dict[str, Any], console: Console) -> None:
    v = data["version"]
    console.print(f"{DISTRIBUTION} {v['version']} (commit {v['commit']})")
    d = data["daemon"]
    if d["running"]:
        metrics = d.get("metrics") or {}
        where = f", metrics on http://{metrics['address']}/metrics" if metrics.get("address") else ""
        if metrics.get("error"):
            where = f", metrics: {metrics['error']}"
        console.print(f"device daemon: pid {d['pid']}, state {escape(d['state_dir'])}{escape(where)}")
    else:
        console.print(
            f"[bold]device daemon: not running[/] (nothing answers on {escape(d['socket'])}): no device is "
            "served; `damselfly serve` starts one"
        )
    sn = data["snapshotter"]
    if sn["error"]:
        console.print(f"snapshotter metadata: {escape(sn['error'])}")
    elif not sn["found"]:
        console.print(f"snapshotter metadata: none at {escape(sn['metadata'])} (no converted image recorded)")

    chains = Table(title="images and chains", title_justify="left")
    for col in ("image", "device", "layers", "containers", "mounted", "attached"):
        chains.add_column(col)
    for c in data["chains"]:
        chains.add_row(
            escape("\n".join(c["images"]) or "-"),
            c["device"],
            str(len(c["layers"])),
            str(c["users"]),
            "yes" if c["mounted"] else "no",
            "yes" if c["attached"] else "no",
        )
    if data["chains"]:
        console.print(chains)

    if data["devices"]:
        devices = Table(title="devices", title_justify="left")
        for col in ("name", "size", "layers", "writable", "prefetch"):
            devices.add_column(col)
        for dev in data["devices"]:
            prefetch = dev.get("prefetch") or {}
            devices.add_row(
                dev["name"],
                _size(dev.get("size")),
                str(len(dev.get("layers", []))),
                "yes" if dev.get("writable") else "no",
                str(prefetch.get("state", "-")),
            )
        console.print(devices)

    if data["blobs"]:
        blobs = Table(title="blobs", title_justify="left")
        for col in ("blob", "local / size", "%", "complete", "background", "from registry", "from peers"):
            blobs.add_column(col, justify="right" if col not in ("blob", "background") else "left")
        for b in data["blobs"]:
            background = b["background"] or ("local file" if b["local_file"] else "-")
            if b["background_error"]:
                background += f" ({b['background_error'][:40]})"
            blobs.add_row(
                _short(b["digest"]),
                f"{_size(b['local_bytes'])} / {_size(b['size'])}",
                f"{b['percent']:.1f}",
                "yes" if b["complete"] else "no",
                escape(background),
                _size(b["registry_bytes"]),
                _size(b["peer_bytes"]),
            )
        console.print(blobs)

    if data["bytes"] is not None:
        read, fetched = data["bytes"]["read"], data["bytes"]["fetched"]
        console.print(
            "bytes read by devices: "
            + ", ".join(f"{k} {_size(read.get(k, 0))}" for k in ("cache", "registry", "peer"))
            + "; fetched into the cache: "
            + ", ".join(f"{k} {_size(fetched.get(k, 0))}" for k in ("registry", "peer"))
        )
        r = data["reads"]
        console.print(
            f"reads: {r['timeouts']} timed out, {r['errors']} failed, {r['fast_failures']} failed at once "
            f"(cool-down), {r['slow']} took over 10 s, {r['waiting_long']} waiting over 10 s now"
        )
    cache = data["cache"]
    if cache is not None:
        limit = "no limit" if not cache["limit_bytes"] else f"limit {_size(cache['limit_bytes'])}"
        held = cache.get("limit_partial_blobs") or []
        partial = f", {len(held)} blob(s) kept partial by the limit" if held else ""
        used = _size(cache["usage_bytes"])
        console.print(f"node cache: {used} ({limit}{partial}) in {escape(cache['dir'])}")
    if data["errors"]:
        errors = Table(title=f"last errors (of {len(data['errors'])})", title_justify="left")
        for col in ("time", "source", "what", "message"):
            errors.add_column(col)
        for e in data["errors"][-SHOWN_ERRORS:]:
            errors.add_row(
                e["time"], e["source"], _short(e["what"]) if e["what"] else "", escape(e["message"])
            )
        console.print(errors)
