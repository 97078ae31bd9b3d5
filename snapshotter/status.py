"""What `damselfly status` reports: the snapshotter's converted chains and the device daemon's view.

Two sources, each optional, so the command works whatever runs:

- the metadata store of `damselfly serve` (``<root>/metadata.db``), read-only and without `serve`:
  every converted ("remote") layer it recorded, grouped into chains — the layers of an image, bottom
  to top, which one device serves (`snapshotter.remote.layers.Chain`) — with the image each chain's
  top was pulled as, the active and view snapshots (containers) standing on it, and whether its ext4
  is mounted under ``<root>/remote/``;
- the device daemon, over its control socket (``status``): devices, per-blob completeness and
  background downloads, bytes by source, cache size, the last errors. A daemon that does not answer
  is reported as not running, with where it was looked for.

`report` returns the stable JSON form (``damselfly status --json``); its fields are listed in
docs/observability.md, and only ever added to.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .device.client import DeviceClient
from .errors import ControlError, SnapshotterError
from .host.mountinfo import find_mount
from .labels import LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SOURCE
from .remote.layers import chain_of
from .service.records import Kind, Layer
from .version import commit, version

#: Version of the JSON form; fields are only ever added within one.
SCHEMA = 1


@dataclass
class ChainInfo:
    device: str
    layers: list[str]  # blob digests, bottom to top
    snapshots: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name) of its layers
    images: set[str] = field(default_factory=set)
    namespaces: set[str] = field(default_factory=set)
    users: int = 0  # active and view snapshots on it


def _rows(db: Path) -> list[sqlite3.Row]:
    # Read-only, and never creating the file: `serve` owns it (WAL: readers never block its writers).
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT id, namespace, key, kind, parent_id, labels FROM snapshots").fetchall()
    finally:
        conn.close()


def chains(root: Path) -> tuple[dict[str, ChainInfo], str | None]:
    """The converted chains `serve` recorded under `root` (device name -> chain), and an error (the
    store could not be read) or None. No store yet: no chains, no error."""
    db = root / "metadata.db"
    if not db.exists():
        return {}, None
    try:
        rows = _rows(db)
    except sqlite3.Error as e:
        return {}, f"cannot read {db}: {e}"
    by_id = {int(r["id"]): r for r in rows}
    labels = {i: _labels(r["labels"]) for i, r in by_id.items()}

    def ancestors(parent_id: int | None) -> list[Layer]:
        out = []
        seen: set[int] = set()
        while parent_id is not None and parent_id in by_id and parent_id not in seen:
            seen.add(parent_id)
            row = by_id[parent_id]
            out.append(Layer(parent_id, str(row["key"]), labels[parent_id]))
            parent_id = row["parent_id"]
        return out

    remote = {i for i, r in by_id.items() if int(r["kind"]) == Kind.COMMITTED and LABEL_SOURCE in labels[i]}
    parents_of_remote = {by_id[i]["parent_id"] for i in remote}
    found: dict[str, ChainInfo] = {}

    def add(layers: list[Layer], namespace: str, user: bool) -> None:
        try:
            chain = chain_of(layers)
        except SnapshotterError:
            return  # labels that no longer describe a converted layer: serve reports those
        if chain is None or not chain.remote:
            return
        info = found.setdefault(chain.name, ChainInfo(chain.name, [x.digest for x in chain.remote]))
        info.namespaces.add(namespace)
        top = chain.remote[-1]
        info.snapshots.update((namespace, x.name) for x in chain.remote)
        image = next((x.labels.get(LABEL_IMAGE_REF) for x in layers if x.name == top.name), None)
        if image:
            info.images.add(image)
        if user:
            info.users += 1

    for i in sorted(by_id):
        row = by_id[i]
        namespace = str(row["namespace"])
        if i in remote:
            digest = labels[i].get(LABEL_LAYER_DIGEST, "")
            top_of_image = labels[i].get(LABEL_IMAGE_LAYERS, "").split(",") == [digest]
            if top_of_image or i not in parents_of_remote:
                add([Layer(i, str(row["key"]), labels[i]), *ancestors(row["parent_id"])], namespace, False)
        elif int(row["kind"]) in (Kind.ACTIVE, Kind.VIEW):
            add(ancestors(row["parent_id"]), namespace, True)
    return found, None


def _labels(text: str) -> dict[str, str]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _percent(local: int, size: int) -> float:
    return round(100.0 * local / size, 1) if size else 100.0


def _iso(t: float) -> str:
    millis = int((t - int(t)) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{millis:03d}Z"


def daemon_status(state_dir: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """The daemon's ``status`` reply, or None when no daemon answers at `state_dir`."""
    try:
        status: dict[str, Any] = DeviceClient(state_dir).call({"op": "status"}, timeout=timeout)["status"]
    except (ControlError, OSError, KeyError):
        return None
    return status


def report(root: str, state_dir: str, daemon: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON form of ``damselfly status`` (docs/observability.md), from `serve`'s store under `root`
    and the daemon's status reply `daemon` (None: no daemon answered at `state_dir`)."""
    found, error = chains(Path(root))
    devices_by_name: Mapping[str, Any] = daemon.get("devices", {}) if daemon else {}
    blobs: Mapping[str, Any] = daemon.get("blobs", {}) if daemon else {}
    client = DeviceClient(state_dir)
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "version": {"version": version(), "commit": commit()},
        "snapshotter": {
            "root": root,
            "metadata": os.path.join(root, "metadata.db"),
            "found": os.path.exists(os.path.join(root, "metadata.db")),
            "error": error,
        },
        "daemon": {
            "running": daemon is not None,
            "pid": None if daemon is None else daemon.get("pid"),
            "state_dir": state_dir,
            "socket": client.paths.socket,
            "metrics": None if daemon is None else daemon.get("metrics"),
            "p2p": None if daemon is None else daemon.get("p2p"),
        },
    }
    out["chains"] = [
        {
            "device": c.device,
            "images": sorted(c.images),
            "namespaces": sorted(c.namespaces),
            "layers": c.layers,
            "snapshots": sorted(name for _ns, name in c.snapshots),
            "users": c.users,
            "mounted": find_mount(os.path.realpath(os.path.join(root, "remote", c.device))) is not None,
            "attached": c.device in devices_by_name,
        }
        for c in sorted(found.values(), key=lambda c: (sorted(c.images), c.device))
    ]
    out["images"] = sorted(
        ({"image": image, "device": c.device} for c in found.values() for image in c.images),
        key=lambda x: (x["image"], x["device"]),
    )
    out["devices"] = [{"name": name, **d} for name, d in sorted(devices_by_name.items())]
    used_by: dict[str, list[str]] = {}
    for name, d in sorted(devices_by_name.items()):
        for digest in d.get("layers", []):
            used_by.setdefault(digest, []).append(name)
    out["blobs"] = [_blob(digest, b, used_by.get(digest, [])) for digest, b in sorted(blobs.items())]
    if daemon is None:
        out.update(bytes=None, reads=None, cache=None, errors=[])
        return out
    fetched = (daemon.get("p2p") or {}).get("fetched_bytes", {})
    out["bytes"] = {
        "read": daemon.get("read_bytes", {}),
        "fetched": {"registry": fetched.get("registry", 0), "peer": fetched.get("peer", 0)},
    }
    out["reads"] = {
        "count": daemon.get("reads", {}),
        "timeouts": daemon.get("read_timeouts", 0),
        "errors": daemon.get("read_errors", 0),
        "fast_failures": daemon.get("read_fast_failures", 0),
        "slow": daemon.get("slow_reads", 0),
        "waiting_long": daemon.get("reads_waiting_long", 0),
    }
    out["cache"] = daemon.get("cache")
    out["errors"] = [{**e, "time": _iso(float(e["time"]))} for e in daemon.get("errors", [])]
    return out


def _blob(digest: str, b: Mapping[str, Any], devices: list[str]) -> dict[str, Any]:
    size = int(b.get("size", 0))
    local_file = bool(b.get("local"))
    local = size if local_file else int(b.get("present_bytes", 0))
    return {
        "digest": digest,
        "devices": devices,
        "size": size,
        "local_bytes": local,
        "percent": _percent(local, size),
        "complete": local_file or bool(b.get("complete")),
        "verified": local_file or bool(b.get("verified")),
        "local_file": local_file,
        "background": b.get("background"),
        "background_error": b.get("error"),
        "registry_bytes": int(b.get("registry_bytes", 0)),
        "peer_bytes": int(b.get("peer_bytes", 0)),
        "repairs": int(b.get("repairs", 0)),
    }
