"""Kubernetes pull secrets reach damselfly through its CRI image-service proxy (``[cri]``).

The test plays kubelet against real parts: an htpasswd docker-registry that refuses anonymous reads
holds a converted image; a private containerd 1.6 runs its CRI plugin with damselfly as its
snapshotter (``disable_snapshot_annotations = false``); `damselfly serve` (and the device daemon it
starts) has no Docker config.json at all (``DOCKER_CONFIG`` is an empty directory). A ``PullImage``
sent to damselfly's CRI socket with the pull secret's ``AuthConfig`` is forwarded to containerd, which
pulls the manifest and config with it while damselfly takes every layer as a remote snapshot — its
Prepare check and then the container's block reads authenticate with the credentials of that call,
kept in memory only. Without them, the Prepare check falls back and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from p2p.auth import static_credentials
from p2p.errors import AuthError
from p2p.registry import RegistryClient
from scripts.demolib.serve import release as release_remote
from snapshotter.api.runtime.v1 import api_pb2 as cri
from snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from snapshotter.device import control
from snapshotter.device.paths import Paths
from snapshotter.labels import LABEL_SOURCE
from tests import oci_images as oi
from tests.conftest import ALICE
from tests.p2p.registry_server import RegistryServer
from tests.snapshotter import serving
from tests.snapshotter.remote_lab import attached_devices, convert

from .conftest import ContainerdFactory
from .containerd import Containerd

SNAPSHOTTER = "damselfly"
K8S = "k8s.io"  # the CRI plugin's namespace
MESSAGE = "read lazily with the pod's pull secret\n"


@dataclass
class Node:
    containerd: Containerd
    served: serving.Served
    cri: cri_grpc.ImageServiceStub
    state: Path
    docker_config: Path


@pytest.fixture
def converted(
    registry: RegistryServer,
    basic_registry: RegistryServer,
    tmp_path: Path,
    repo: str,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """A converted busybox image with a file of its own, in the htpasswd registry only (converted with
    alice's config.json, which only the conversion sees)."""
    extra = oi.Layer((oi.file("etc/message", MESSAGE.encode()),))
    src = oi.push_image(
        registry.host, oi.write_layout(oi.busybox_image(extra), tmp_path / "layout"), repo, "v1"
    )
    login = tmp_path / "login"
    login.mkdir()
    (login / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"username": ALICE.username, "password": ALICE.password}}})
    )
    dst = f"{basic_registry.host}/{repo}:damselfly"
    with monkeypatch.context() as m:
        m.setenv("DOCKER_CONFIG", str(login))
        convert(src, dst, tmp_path / "cache")
    return dst


@contextlib.contextmanager
def _node(
    make_containerd: ContainerdFactory, directory: Path, cri_auths: dict[str, tuple[str, str]] | None = None
) -> Iterator[Node]:
    state = directory / "state"
    empty = directory / "docker-config"  # no config.json: credentials come from PullImage or nowhere
    empty.mkdir()
    # containerd's address is known before it starts: `serve` (which names it) must be up first, or
    # containerd's first dial of the proxy snapshotter fails and backs off.
    c = make_containerd(
        start=False,
        proxy_plugins={SNAPSHOTTER: str(directory / "run" / "snapshotter.sock")},
        namespace=K8S,
        cri_snapshotter=SNAPSHOTTER,
        cri_auths=cri_auths,
    )
    config = directory / "config.toml"
    config.write_text(
        f'[device]\nstate_dir = "{state}"\nbackground_delay = 3600.0\nread_timeout = 20.0\n\n'
        f'[cri]\nenabled = true\nlisten = "{directory / "cri.sock"}"\ncontainerd = "{c.address}"\n'
    )
    env = {**os.environ, "DOCKER_CONFIG": str(empty)}
    served = serving.start(directory, "--config", str(config), env=env)
    channel = grpc.insecure_channel(f"unix:{directory / 'cri.sock'}")
    try:
        c.start()
        yield Node(c, served, cri_grpc.ImageServiceStub(channel), state, empty)
        forced = c.stop()  # before the snapshotter goes: containerd may still call it
        assert not forced, forced
    finally:
        channel.close()
        served.stop()
        # the device daemon and any chain mount outlive `serve` on purpose; undone by pid and path
        release_remote(served.root, state)


@pytest.fixture
def node_dir() -> Iterator[Path]:
    """A short directory for `damselfly serve` (socket paths must fit in sun_path)."""
    d = Path(tempfile.mkdtemp(prefix="dfly-cri-", dir="/tmp"))
    try:
        yield d
    finally:
        serving.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)


def _snapshot_labels(c: Containerd, name: str) -> dict[str, str]:
    out = c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", name, namespace=K8S).stdout
    labels: dict[str, str] = json.loads(out).get("Labels") or {}
    return labels


def test_pull_secret_from_cri_pullimage_serves_prepare_and_lazy_reads(
    make_containerd: ContainerdFactory, node_dir: Path, converted: str, basic_registry: RegistryServer
) -> None:
    anonymous = static_credentials({})
    with RegistryClient(basic_registry.host, credentials=anonymous) as anon, pytest.raises(AuthError):
        anon.resolve(converted)  # the registry refuses anonymous reads

    with _node(make_containerd, node_dir) as node:
        c = node.containerd
        request = cri.PullImageRequest(
            image=cri.ImageSpec(image=converted),
            auth=cri.AuthConfig(username=ALICE.username, password=ALICE.password),
            sandbox_config=cri.PodSandboxConfig(
                metadata=cri.PodSandboxMetadata(name="app", uid="uid-1", namespace="default")
            ),
        )
        pulled = node.cri.PullImage(request, timeout=180)
        assert pulled.image_ref.startswith("sha256:")

        # Every layer is a remote snapshot of damselfly's, none was downloaded by containerd.
        chain = c.image_chain_id(converted, namespace=K8S)
        assert LABEL_SOURCE in _snapshot_labels(c, chain)
        manifest = json.loads(c.content(c.image_target(converted, namespace=K8S), namespace=K8S))
        content = c.ctr("content", "ls", "-q", namespace=K8S).stdout.split()
        assert not {layer["digest"] for layer in manifest["layers"]} & set(content), "a layer was downloaded"

        # The other image-service calls go through the proxy unchanged.
        status = node.cri.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=converted)), timeout=30
        )
        assert status.image.id == pulled.image_ref and converted in status.image.repo_tags
        listed = node.cri.ListImages(cri.ListImagesRequest(), timeout=30)
        assert pulled.image_ref in [i.id for i in listed.images]
        assert node.cri.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30).image_filesystems

        # The container's reads are block reads from the registry, with the PullImage's credentials.
        out = c.run(converted, ["/bin/cat", "/etc/message"], snapshotter=SNAPSHOTTER, namespace=K8S)
        assert out.stdout == MESSAGE
        assert attached_devices(node.state), "no device was attached for the chain"
        # the daemon fetched bytes from the registry (it has no other source)
        blobs = control.call(Paths(str(node.state)).socket, {"op": "status"}, timeout=10)["status"]["blobs"]
        assert sum(b.get("registry_bytes", 0) for b in blobs.values()) > 0

        # Held in memory only: no config.json appeared, no secret in any log.
        assert list(node.docker_config.iterdir()) == []
        logs = node.served.log_text() + (node.state / "devd.log").read_text(errors="replace")
        assert "kept in memory" in logs
        assert ALICE.password not in logs and ALICE.basic_header().split()[1] not in logs

        node.cri.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=converted)), timeout=60)
        gone = node.cri.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=converted)), timeout=30)
        assert not gone.HasField("image")


def test_without_the_pull_secret_the_prepare_check_falls_back_and_says_why(
    make_containerd: ContainerdFactory, node_dir: Path, converted: str, basic_registry: RegistryServer
) -> None:
    # containerd has credentials of its own for the registry (its registry.configs), damselfly none:
    # containerd's pull gets the manifest, damselfly's check of the first layer is refused.
    host = basic_registry.host
    with _node(make_containerd, node_dir, {host: (ALICE.username, ALICE.password)}) as node:
        with pytest.raises(grpc.RpcError) as e:
            node.cri.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=converted)), timeout=180)
        assert e.value.code() is not grpc.StatusCode.UNAVAILABLE, e.value  # containerd answered
        log = node.served.log_text()
        assert "falls back to a normal pull" in log, log
        # htpasswd is basic auth: "registry requires basic authentication; no credentials for HOST"
        assert f"no credentials for {host}" in log or f"no credentials were found for {host}" in log, log
        assert "image pull secret through damselfly's CRI socket" in log
        assert attached_devices(node.state) == []
