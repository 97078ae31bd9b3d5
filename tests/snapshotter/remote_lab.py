"""Helpers for tests of converted ("remote") layers: converting and pushing images, the Prepare labels
containerd (through `damselfly rpull` or CRI) sends for them, what `damselfly serve` leaves on purpose —
chain mounts and the detached device daemon, which outlive it so that containers survive its restarts —
and a config for it. `scripts.demolib.serve.release` undoes those by exact path and pid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from p2p.auth import static_credentials
from p2p.manifest import Manifest
from p2p.registry import RegistryClient
from scripts.demolib.procs import loops_below, mount_points
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from snapshotter.device import control
from snapshotter.device.paths import Paths
from snapshotter.errors import ControlError
from snapshotter.labels import LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF
from tests.oci_images import chain_ids


def convert(src: str, dst: str, cache: Path) -> None:
    """``damselfly convert --quiet SRC DST`` (in process); fails the test on an error."""
    r = CliRunner().invoke(
        cli, ["convert", "--quiet", src, dst, "--cache-dir", str(cache)], catch_exceptions=False
    )
    assert r.exit_code == EXIT_OK, r.output


def manifest_of(host: str, ref: str) -> Manifest:
    """The (platform) manifest of `ref` in the loopback registry `host`."""
    with RegistryClient(host, plain_http=True, credentials=static_credentials({})) as client:
        return client.resolve(ref).manifest


@dataclass(frozen=True)
class PreparedLayer:
    """One layer of an image as containerd's unpacker prepares it."""

    chain_id: str  # the snapshot name (containerd.io/snapshot.ref)
    parent: str  # the chain ID below ("" for the bottom layer)
    labels: dict[str, str]
    digest: str
    size: int


def unpack_labels(manifest: Manifest, image_ref: str) -> list[PreparedLayer]:
    """Prepare's arguments for each layer, bottom first: what containerd forwards for `damselfly rpull`
    (the layer's annotations, snapshot.ref, cri.image-ref and cri.layer-digest). A converted image's
    diff_ids are its layer digests, so its chain IDs follow from the manifest alone."""
    chain = chain_ids([d.digest for d in manifest.layers])
    out = []
    for i, desc in enumerate(manifest.layers):
        labels = {
            **dict(desc.annotations),
            LABEL_SNAPSHOT_REF: chain[i],
            LABEL_IMAGE_REF: image_ref,
            LABEL_LAYER_DIGEST: desc.digest,
        }
        out.append(PreparedLayer(chain[i], chain[i - 1] if i else "", labels, desc.digest, desc.size))
    return out


def chain_mounts(root: Path) -> list[str]:
    """Mount points of converted chains under a snapshotter root."""
    top = str(root / "remote") + os.sep
    return [mp for mp in mount_points() if mp.startswith(top)]


def device_loops(state: Path) -> list[str]:
    """Loop devices bound to a device file of the daemon at `state`."""
    return loops_below(state / "dev")


def attached_devices(state: Path) -> list[str]:
    """Devices the daemon at `state` serves ([] when none runs)."""
    try:
        reply = control.call(Paths(str(state)).socket, {"op": "status"}, timeout=10)
    except ControlError:
        return []
    return sorted(reply["status"]["devices"])


def serve_config(
    path: Path,
    state: Path,
    *,
    metrics: str = "",
    background_delay: float = 3600.0,
    device_metrics: str = "",
    log_format: str = "",
) -> Path:
    """A config file for `damselfly serve` with the device daemon's state at `state` (the background
    full download held back, so what a container reads is what the registry serves); `metrics` is
    serve's endpoint, `device_metrics` the daemon's own."""
    text = f'log_format = "{log_format}"\n' if log_format else ""
    text += f'[device]\nstate_dir = "{state}"\nbackground_delay = {background_delay!r}\nread_timeout = 20.0\n'
    if device_metrics:
        text += f'metrics_address = "{device_metrics}"\n'
    if metrics:
        text += f'\n[metrics]\naddress = "{metrics}"\n'
    path.write_text(text)
    return path
