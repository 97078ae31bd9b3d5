"""Two nodes, each a containerd 1.6 with its own `damselfly serve` and device daemon, on loopback, with the
peer network on: node A runs a converted image; then the registry refuses every blob read, and node B
still cold-starts it with `damselfly rpull` + ``ctr run --snapshotter damselfly``, every byte of its
layers and its image config coming from A.

The registry sits behind a fault proxy (`tests.p2p.faultproxy.FaultProxy`) and both nodes name it only
through the proxy (the image reference, hence rpull, the snapshotter's Prepare checks and the device
daemons). What is refused, after A's cache is complete: **every GET of a blob** (``/v2/*/blobs/*``:
the layers and the image config), answered 503. What still passes:

- manifests (``/manifests/``): rpull resolves the reference at the registry; peers serve no manifests;
- HEADs of layer blobs: the snapshotter checks at Prepare that a converted layer's blob is there
  (`snapshotter.remote.blobcheck`); a HEAD moves no blob byte.

B's rpull gets the image config through its device daemon (`DeviceClient.document`), which asks the
config's tree and, the registry refusing, the other members: A, whose own rpull left the config in its
node's document store. Which node is the root of which blob's tree is the rendezvous hash's choice (no
seeds): a root whose registry refuses asks the other members too (`BlobNode.route`).

Each node keeps its device of the image open with a sleeping container while the test reads its
status (`holding`): a blob's counters live as long as some device uses it. A downloads its blobs in full
at once (``background_delay = 0``) and the refusal starts only when its cache is complete, so which
bytes B's container reads does not matter; B downloads nothing in the background.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.demolib.serve import release as release_remote
from tests import oci_images as oi
from tests.p2p.faultproxy import Fault, FaultProxy
from tests.p2p.peerlab import free_ports, node_config, wait_for, write_secret
from tests.p2p.registry_server import RegistryServer
from tests.snapshotter import remote_lab, serving

from .conftest import ContainerdFactory
from .nodes import SNAPSHOTTER, Node, holding

pytestmark = pytest.mark.slow

NS = "e2e-p2p"
MiB = 1 << 20
#: Spans many 64 KiB chunks of the converted layer (incompressible, so the blob is as big).
BIG_SIZE = 12 * MiB
MOTD = b"served by a peer\n"
REFUSED = 10**6  # times the fault applies: for the rest of the test


@dataclass(frozen=True)
class Image:
    ref: str  # the converted image, named through the fault proxy
    repo: str
    layers: list[str]  # its layer blob digests (converted: busybox, the big file)
    big_sha256: str


@pytest.fixture
def image(registry: RegistryServer, proxy: FaultProxy, tmp_path: Path, repo: str) -> Image:
    big = oi.content(BIG_SIZE, seed=7)
    layer = oi.Layer(
        (oi.directory("data"), oi.file("data/big", big), oi.file("etc/motd", MOTD)), created_by="ADD big"
    )
    src = oi.push_image(
        registry.host, oi.write_layout(oi.busybox_image(layer), tmp_path / "src"), repo, "src"
    )
    remote_lab.convert(src, f"{registry.host}/{repo}:damselfly", tmp_path / "convert-cache")
    ref = f"{proxy.host}/{repo}:damselfly"
    layers = [str(d.digest) for d in remote_lab.manifest_of(proxy.host, ref).layers]
    return Image(ref, repo, layers, hashlib.sha256(big).hexdigest())


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    """The registry behind the fault proxy: the only way the nodes reach it."""
    with FaultProxy(registry.host) as p:
        yield p


def write_node_config(
    path: Path, state: Path, listen: str, peers: list[str], secret: Path, **p2p: Any
) -> Path:
    """`damselfly serve`'s config: ``[device]`` (`remote_lab.serve_config`) plus ``[remote]`` and ``[p2p]``
    (`peerlab.node_config`)."""
    background_delay = float(p2p.pop("background_delay"))
    device = remote_lab.serve_config(path, state, background_delay=background_delay).read_text()
    network = node_config(path, listen, peers, secret, **p2p).read_text()
    path.write_text(device + "\n" + network)
    return path


class Fleet:
    """Nodes A and B: each its own `damselfly serve` (root, socket, device state, peer port) and its own
    containerd whose proxy plugin is it. A starts with the fixture; B only when the test says so
    (`start_b`): while A pulls, B is down, so A is every tree's root and B holds nothing — B's start
    is cold. A downloads its blobs in full at once; B downloads nothing in the background (what it
    fetches is what its container reads)."""

    def __init__(self, make_containerd: ContainerdFactory, tmp_path: Path) -> None:
        self.make_containerd = make_containerd
        self.secret = write_secret(tmp_path / "fleet-secret")
        self.members = [f"127.0.0.1:{p}" for p in free_ports(2)]
        self.started: list[tuple[Path, serving.Served]] = []
        self.made: list[Node] = []

    def start(self, name: str, address: str, background_delay: float) -> Node:
        d = Path(tempfile.mkdtemp(prefix=f"dfly-p2p-{name}-", dir="/tmp"))  # short: sun_path
        config = write_node_config(
            d / "config.toml",
            d / "state",
            address,
            self.members,
            self.secret,
            background_delay=background_delay,
        )
        self.started.append((d, serving.start(d, "--config", str(config))))
        c = self.make_containerd(proxy_plugins={SNAPSHOTTER: str(self.started[-1][1].socket)}, namespace=NS)
        self.made.append(Node(name, d, self.started[-1][1], c, NS))
        return self.made[-1]

    def start_b(self) -> Node:
        return self.start("b", self.members[1], 3600.0)

    def close(self) -> list[str]:
        """Both containerds first (they may still call their snapshotters), then each `serve`, and what
        serve leaves on purpose (chain mounts, the device daemon: by path and pid)."""
        problems: list[str] = []
        for node in self.made:
            problems += node.containerd.stop()
        for d, served in self.started:
            served.stop()
            problems += release_remote(served.root, d / "state")
            serving.unmount_under(d)
            shutil.rmtree(d, ignore_errors=True)
        return problems


@pytest.fixture
def fleet(make_containerd: ContainerdFactory, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(make_containerd, tmp_path)
    try:
        f.start("a", f.members[0], 0.0)
        yield f
    finally:
        problems = f.close()
    assert not problems, problems


def remote_layers(rpull_output: str) -> list[str]:
    return re.findall(r"^layer \d+/\d+ [0-9a-f]{12}: (\w+)", rpull_output, re.MULTILINE)


def blob_entries(node: Node, image: Image) -> dict[str, dict[str, Any]]:
    blobs = node.devices()["blobs"]
    missing = [d for d in image.layers if d not in blobs]
    assert not missing, f"node {node.name} has no blob {missing}: {blobs}"
    return {d: blobs[d] for d in image.layers}


READ_IMAGE = ["/bin/busybox", "sh", "-c", "/bin/busybox sha256sum /data/big && cat /etc/motd"]


def expected_output(image: Image) -> str:
    return f"{image.big_sha256}  /data/big\n{MOTD.decode()}"


def layer_gets(proxy: FaultProxy, image: Image) -> list[tuple[str, str, str]]:
    """Every GET of a layer blob the proxy saw: (method, path, fault kind or "")."""
    return [s for s in list(proxy.seen) if s[0] == "GET" and any(d in s[1] for d in image.layers)]


def test_b_cold_starts_from_a_peer_while_the_registry_refuses_its_layers(
    fleet: Fleet, image: Image, proxy: FaultProxy
) -> None:
    (a,) = fleet.made
    # -- node A: a container reads the image; A's cache of its layers completes ----------------------
    assert remote_layers(a.rpull(image.ref)) == ["remote", "remote"]
    with holding(a, image.ref):
        run = a.containerd.run(image.ref, READ_IMAGE, snapshotter=SNAPSHOTTER)
        assert run.stdout == expected_output(image)
        wait_for(
            lambda: all(e.get("complete") for e in blob_entries(a, image).values()),
            120,
            "node A's cache of every layer blob",
        )
        for digest, entry in blob_entries(a, image).items():
            # B is not up: A is every tree's root and fetched its layers from the registry.
            assert entry["registry_bytes"] > 0 and entry["peer_bytes"] == 0, (digest, entry)
            assert entry["verified"] is True, (digest, entry)
        fetched_by_a = layer_gets(proxy, image)
        assert fetched_by_a and not [s for s in fetched_by_a if s[2]], fetched_by_a

        # -- the registry refuses every GET of a layer blob from now on ------------------------------
        proxy.add(Fault("status", path_contains="/blobs/", method="GET", status=503, times=REFUSED))
        blob_url = f"{proxy.url}/v2/{image.repo}/blobs/{image.layers[-1]}"
        assert httpx.get(blob_url, timeout=10).status_code == 503  # the refusal is in force
        seen_before_b = len(proxy.seen)

        # -- node B: a cold start from A's blocks alone ----------------------------------------------
        b = fleet.start_b()
        assert remote_layers(b.rpull(image.ref)) == ["remote", "remote"]
        try:
            with holding(b, image.ref):
                run = b.containerd.run(image.ref, READ_IMAGE, snapshotter=SNAPSHOTTER)
                got = blob_entries(b, image)
                network = b.devices()["p2p"]
                uploaded = a.devices()["p2p"]["upload_bytes"]
        except AssertionError as e:
            e.add_note(f"{b.logs()}\n{a.logs()}")
            raise

    assert run.stdout == expected_output(image)
    for digest, entry in got.items():
        assert entry["registry_bytes"] == 0 and entry["peer_bytes"] > 0, (digest, entry)
    assert network["fetched_bytes"]["registry"] == 0, network
    # From peers: the layers' bytes B read, and the image config (rpull's, through B's daemon).
    config_size = remote_lab.manifest_of(proxy.host, image.ref).config.size
    layers_from_peers = sum(e["peer_bytes"] for e in got.values())
    assert network["fetched_bytes"]["peer"] == layers_from_peers + config_size, (network, got)
    assert uploaded >= network["fetched_bytes"]["peer"], (uploaded, network)
    # No blob byte left the registry after the refusal: every GET of one was answered 503.
    asked = [s for s in list(proxy.seen)[seen_before_b:] if s[0] == "GET"]
    leaked = [s for s in asked if "/blobs/" in s[1] and s[2] != "status"]
    assert not leaked, leaked
    print(
        f"B read {network['fetched_bytes']['peer']} bytes from A; the registry refused "
        f"{proxy.faults_applied('status')} blob GETs (1 of them the test's); B's GETs there: {asked}"
    )
