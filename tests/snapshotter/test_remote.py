"""Converted ("remote") layers in the snapshotter: labels, fallbacks, chain mounts, users counted in the
store, restarts — with a real converted image in a real loopback registry, a real device daemon, real
loop devices and mounts. The containerd conformance behaviours that make sense with a remote lower
(Basic, ViewReadonly, LayerFileUpdate, RemoveDirectoryInLowerLayer, Chown, DeletedFilesInChildSnapshot,
MoveFileFromLowerLayer, DirectoryPermissionOnCommit, RemoveIntermediateSnapshot) run here on converted
parents; containerd itself drives the snapshotter in tests/e2e/test_snapshotter_e2e.py.
"""

from __future__ import annotations

import concurrent.futures
import errno
import itertools
import logging
import os
import signal
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from blockformat.annotations import KEY_BLOB_DIGEST, KEY_INDEX_DIGEST, KEY_REPOSITORY, KEY_VERSION, KEY_VSIZE
from p2p.reference import parse_reference
from scripts.demolib.registry import free_port
from scripts.demolib.serve import daemon_pid
from scripts.demolib.serve import release as release_remote
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.api.containerd.types import mount_pb2
from snapshotter.config import Config, DeviceSection, parse
from snapshotter.device.supervisor import DeviceDaemon
from snapshotter.errors import (
    AlreadyExistsError,
    ConfigError,
    FailedPreconditionError,
    ImageError,
    NotFoundError,
)
from snapshotter.host.mountinfo import find_mount
from snapshotter.labels import (
    LABEL_BLOB_SIZE,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_SNAPSHOT_REF,
    LABEL_SOURCE,
)
from snapshotter.metrics import REGISTRY
from snapshotter.remote.blobcheck import RemoteOptions
from snapshotter.remote.layers import FallbackError, candidate, chain_of
from snapshotter.remote.snapshots import RemoteSnapshots
from snapshotter.service.metadata import MetaStore
from snapshotter.service.overlay import Mount, OverlayDriver
from snapshotter.service.records import Kind, Layer
from snapshotter.service.snapshots import Snapshots
from tests import oci_images as oi
from tests.p2p.registry_server import RegistryServer

from . import serving
from .remote_lab import (
    PreparedLayer,
    attached_devices,
    chain_mounts,
    convert,
    device_loops,
    manifest_of,
    serve_config,
    unpack_labels,
)

NS = "remote-test"

# -- the converted image every test uses -----------------------------------------------------------


def base_layer() -> oi.Layer:
    return oi.Layer(
        (
            oi.file("a/f1", b"one\n"),
            oi.file("a/sub/deep", b"deep\n"),
            oi.file("rmdir/x", b"x\n"),
            oi.file("rmdir/sub/y", b"y\n"),
            oi.file("owned", b"owned\n", uid=0, gid=0),
            oi.file("del1", b"deleted by a child\n"),
            oi.file("del2", b"deleted by the converted layer above\n"),
            oi.file("move/src", b"moved\n"),
            oi.directory("perm", mode=0o700),
        ),
        created_by="ADD base /",
    )


def update_layer() -> oi.Layer:
    return oi.Layer(
        (oi.file("a/f1", b"two\n"), oi.file("l2only", b"l2\n"), oi.whiteout("del2")),
        created_by="ADD update /",
    )


@dataclass(frozen=True)
class Converted:
    ref: str
    layers: list[PreparedLayer]

    @property
    def top(self) -> PreparedLayer:
        return self.layers[-1]


@pytest.fixture(scope="module")
def converted(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    tmp = tmp_path_factory.mktemp("image")
    built = oi.write_layout(oi.Image((base_layer(), update_layer())), tmp / "layout")
    ref = f"{registry.host}/remote/fixture:conv"
    convert(str(built.layout), ref, tmp / "cache")
    return Converted(ref, unpack_labels(manifest_of(registry.host, ref), ref))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceDaemon]:
    """The device daemon of the module (started lazily by the first chain mount); stopped at the end."""
    if os.geteuid() != 0:
        pytest.fail("needs root: loop devices, mounts, FUSE")
    state = tmp_path_factory.mktemp("state")
    d = DeviceDaemon(
        str(state), DeviceSection(state_dir=str(state), read_timeout=20.0, background_delay=3600.0)
    )
    try:
        yield d
    finally:
        d.close()
        release_remote(state / "nothing", state)
        leaks = device_loops(state) + [p for p in map(str, d.started_pids) if os.path.exists(f"/proc/{p}")]
        assert not leaks, leaks


_keys = itertools.count()


class Lab:
    """A snapshotter (store, driver, remote layers) on its own root, as `damselfly serve` builds it."""

    def __init__(self, root: Path, daemon: DeviceDaemon, options: RemoteOptions | None = None) -> None:
        self.root = root
        self.daemon = daemon
        self.store = MetaStore(root / "metadata.db")
        self.driver = OverlayDriver(root)
        self.remote = RemoteSnapshots(self.store, root, daemon, options)
        self.snapshots = Snapshots(self.store, self.driver, self.remote)
        self.mounted: list[Path] = []

    @property
    def state(self) -> Path:
        return Path(self.daemon.paths.state)

    def pull(self, image: Converted, upto: int | None = None) -> str:
        """Prepare every layer as containerd's unpacker would; each must be taken as a remote layer."""
        for layer in image.layers[:upto]:
            with pytest.raises(AlreadyExistsError):
                self.snapshots.prepare(
                    NS, f"extract-{next(_keys)} {layer.chain_id}", layer.parent, layer.labels
                )
        return image.layers[(upto or len(image.layers)) - 1].chain_id

    def prepare(self, key: str, parent: str) -> list[Mount]:
        return self.snapshots.prepare(NS, key, parent, {})

    def view(self, key: str, parent: str) -> list[Mount]:
        return self.snapshots.view(NS, key, parent, {})

    @contextmanager
    def mounted_at(self, mounts: Sequence[Mount], name: str) -> Iterator[Path]:
        target = self.root.parent / "mnt" / name
        target.mkdir(parents=True, exist_ok=True)
        for m in mounts:
            opts = ",".join(m.options)
            if m.type == "bind":
                argv = ["mount", "-o", opts, "--", m.source, str(target)]
            else:
                argv = ["mount", "-t", m.type, "-o", opts, "--", m.source, str(target)]
            subprocess.run(argv, check=True, capture_output=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", "--", str(target)], check=True, capture_output=True)

    def remove_all(self) -> None:
        while True:
            infos = self.snapshots.walk(NS, [])
            if not infos:
                return
            parents = {i.parent for i in infos}
            for info in infos:
                if info.name not in parents:
                    self.snapshots.remove(NS, info.name)

    def close(self) -> None:
        self.remote.close()
        self.store.close()


@pytest.fixture
def lab(tmp_path: Path, daemon: DeviceDaemon) -> Iterator[Lab]:
    lab = Lab(tmp_path / "root", daemon)
    try:
        yield lab
        lab.remove_all()
        assert chain_mounts(lab.root) == [], "a chain mount outlived its last user"
        assert os.listdir(lab.root / "remote") == []
        assert device_loops(lab.state) == []
        assert attached_devices(lab.state) == []
    finally:
        lab.close()
        for mp in chain_mounts(lab.root):
            subprocess.run(["umount", "--lazy", "--", mp], capture_output=True, check=False)


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("damselfly_remote_fallbacks_total", {"reason": reason}) or 0.0


# -- labels, pure ----------------------------------------------------------------------------------


def test_labels_name_the_blob_and_its_source(converted: Converted) -> None:
    bottom, top = converted.layers
    cand = candidate(top.parent, top.labels)
    assert cand is not None
    ref = parse_reference(converted.ref)
    assert (cand.ref, cand.digest, cand.registry, cand.repository) == (
        top.chain_id,
        top.digest,
        ref.registry,
        ref.repository,
    )
    # No image ref: the converter's repository annotation; no layer digest on the bottom layer: the
    # chain ID, which is the blob digest of a converted image's first layer.
    labels = {k: v for k, v in bottom.labels.items() if k not in (LABEL_IMAGE_REF, LABEL_LAYER_DIGEST)}
    cand = candidate("", labels)
    assert cand is not None
    assert (cand.digest, cand.source) == (bottom.digest, bottom.labels[KEY_REPOSITORY])
    # nerdctl's generic path passes only the layer's annotations: the converter's blob-digest names the
    # blob of an upper layer too.
    labels = {k: v for k, v in top.labels.items() if k not in (LABEL_IMAGE_REF, LABEL_LAYER_DIGEST)}
    cand = candidate(top.parent, labels)
    assert cand is not None
    assert (cand.digest, cand.source) == (top.digest, top.labels[KEY_REPOSITORY])
    # Plain layers are not candidates (and are no fallback either).
    assert candidate("", {LABEL_SNAPSHOT_REF: "sha256:" + "0" * 64, LABEL_IMAGE_REF: "x/y"}) is None
    assert candidate("", {k: v for k, v in top.labels.items() if k != LABEL_SNAPSHOT_REF}) is None


@pytest.mark.parametrize(
    ("change", "reason", "words"),
    [
        ({KEY_VERSION: "9"}, "labels", "version 9"),
        ({KEY_VSIZE: "lots"}, "labels", "malformed"),
        ({KEY_INDEX_DIGEST: None}, "labels", "index-digest"),
        ({LABEL_LAYER_DIGEST: None, KEY_BLOB_DIGEST: None}, "labels", "cri.layer-digest"),
        ({LABEL_LAYER_DIGEST: "md5:xyz"}, "labels", "md5:xyz"),
        ({LABEL_IMAGE_REF: None, KEY_REPOSITORY: None}, "source", "no source"),
    ],
)
def test_labels_that_cannot_be_used_are_a_fallback(
    converted: Converted, change: dict[str, str | None], reason: str, words: str
) -> None:
    top = converted.top
    labels = {**top.labels, **{k: v for k, v in change.items() if v is not None}}
    for k in [k for k, v in change.items() if v is None]:
        labels.pop(k, None)
    with pytest.raises(FallbackError) as e:
        candidate(top.parent, labels)
    assert e.value.reason == reason
    assert words in e.value.why


def test_chain_splits_plain_layers_above_converted_ones(converted: Converted) -> None:
    bottom, top = converted.layers
    recorded = {LABEL_SOURCE: "127.0.0.1:1/r", LABEL_BLOB_SIZE: "10"}
    r1 = Layer(1, bottom.chain_id, {**bottom.labels, **recorded})
    r2 = Layer(2, top.chain_id, {**top.labels, **recorded})
    plain = Layer(3, "plain", {})
    chain = chain_of([plain, r2, r1])
    assert chain is not None
    assert [p.name for p in chain.plain] == ["plain"]
    assert [r.name for r in chain.remote] == [bottom.chain_id, top.chain_id]  # bottom to top
    assert chain_of([plain]) is None
    with pytest.raises(ImageError, match="below the converted layer"):
        chain_of([r2, plain])
    broken = Layer(4, "broken", {LABEL_SOURCE: "127.0.0.1:1/r"})
    with pytest.raises(ImageError, match="no longer describe a converted layer"):
        chain_of([broken])


# -- Prepare: remote layers and fallbacks ----------------------------------------------------------


def test_converted_layers_are_recorded_as_remote_committed_snapshots(lab: Lab, converted: Converted) -> None:
    before = REGISTRY.get_sample_value("damselfly_remote_layers_total") or 0.0
    top = lab.pull(converted)
    assert REGISTRY.get_sample_value("damselfly_remote_layers_total") == before + 2
    info = lab.snapshots.stat(NS, top)
    assert (info.kind, info.parent) == (Kind.COMMITTED, converted.layers[0].chain_id)
    assert info.labels[LABEL_SOURCE] == parse_reference(converted.ref).name
    assert int(info.labels[LABEL_BLOB_SIZE]) == converted.top.size
    assert lab.snapshots.usage(NS, top).size == 0
    assert chain_mounts(lab.root) == []  # nothing is mounted for committed layers
    # Preparing the same layer again (another pull) finds it: AlreadyExists, one record.
    lab.pull(converted)
    assert [i.name for i in lab.snapshots.walk(NS, [])] == [x.chain_id for x in converted.layers]
    # A duplicate key is still a duplicate key, and a missing parent still NotFound.
    with pytest.raises(NotFoundError):
        lab.snapshots.prepare(NS, "x", "sha256:" + "1" * 64, converted.top.labels)


def test_fallbacks_are_logged_counted_and_prepare_goes_on(
    lab: Lab, converted: Converted, caplog: pytest.LogCaptureFixture
) -> None:
    bottom, top = converted.layers
    caplog.set_level(logging.WARNING, logger="snapshotter.remote.snapshots")

    # Bad labels: a normal active snapshot comes back (containerd then unpacks the layer itself).
    before = fallbacks("labels")
    mounts = lab.snapshots.prepare(NS, "bad", "", {**bottom.labels, KEY_VERSION: "7"})
    assert mounts[0].type == "bind"
    assert lab.snapshots.stat(NS, "bad").kind is Kind.ACTIVE
    assert fallbacks("labels") == before + 1
    [record] = [r for r in caplog.records if "bad" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert bottom.chain_id in record.getMessage() and "version 7" in record.getMessage()

    # A plain parent: converted layers stack only on converted layers.
    lab.snapshots.commit(NS, "plain", "bad", {})
    before = fallbacks("parent")
    lab.snapshots.prepare(NS, "on-plain", "plain", top.labels)
    assert fallbacks("parent") == before + 1
    assert "is not a converted layer" in caplog.text


def test_unreachable_registry_falls_back_once_per_cooldown(
    lab: Lab, converted: Converted, caplog: pytest.LogCaptureFixture
) -> None:
    bottom = converted.layers[0]
    dead = f"127.0.0.1:{free_port()}"
    before = fallbacks("unreachable")
    labels = {**bottom.labels, LABEL_IMAGE_REF: f"{dead}/remote/fixture:conv"}
    lab.snapshots.prepare(NS, "k1", "", labels)
    assert fallbacks("unreachable") == before + 1
    assert f"registry {dead} is unreachable" in caplog.text
    # The next layer does not wait for the dead registry again.
    t0 = time.monotonic()
    lab.snapshots.prepare(NS, "k2", "", {**labels, LABEL_SNAPSHOT_REF: "sha256:" + "2" * 64})
    assert time.monotonic() - t0 < 1.0
    assert fallbacks("unreachable") == before + 2
    assert "not asked again" in caplog.text


def test_disabled_remote_layers_fall_back_visibly(
    tmp_path: Path, daemon: DeviceDaemon, converted: Converted
) -> None:
    lab = Lab(tmp_path / "root", daemon, RemoteOptions(enabled=False))
    try:
        before = fallbacks("disabled")
        lab.snapshots.prepare(NS, "k", "", converted.layers[0].labels)
        assert fallbacks("disabled") == before + 1
        lab.remove_all()
    finally:
        lab.close()


# -- chains: one mount, shared, counted in the store -----------------------------------------------


def test_one_chain_mount_is_shared_and_released_with_its_last_user(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    for i in range(3):
        lab.prepare(f"c{i}", top)
    lab.view("v", top)
    [mp] = chain_mounts(lab.root)
    assert len(attached_devices(lab.state)) == 1
    assert len(device_loops(lab.state)) == 1
    for key in ("c0", "v", "c1"):
        lab.snapshots.remove(NS, key)
        assert chain_mounts(lab.root) == [mp]
    lab.snapshots.remove(NS, "c2")
    assert chain_mounts(lab.root) == []
    assert attached_devices(lab.state) == []
    assert device_loops(lab.state) == []
    # The bottom layer alone is another chain: another device.
    lab.prepare("on-bottom", converted.layers[0].chain_id)
    [other] = chain_mounts(lab.root)
    assert other != mp


def test_concurrent_prepares_and_removes_never_lose_a_needed_mount(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)

    def cycle(i: int) -> str:
        mounts = lab.prepare(f"p{i}", top)
        lower = next(o for o in mounts[0].options if o.startswith("lowerdir="))[len("lowerdir=") :]
        ok = (Path(lower) / "a" / "f1").read_text()
        lab.snapshots.remove(NS, f"p{i}")
        return ok

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert list(pool.map(cycle, range(12))) == ["two\n"] * 12


def test_commit_releases_the_chain_and_a_mixed_chain_stacks_plain_above_converted(
    lab: Lab, converted: Converted
) -> None:
    top = lab.pull(converted)
    with lab.mounted_at(lab.prepare("work", top), "work") as root:
        (root / "written").write_text("by a container\n")
        (root / "a" / "f1").write_text("three\n")
    lab.snapshots.commit(NS, "committed", "work", {})
    assert chain_mounts(lab.root) == []  # its only user became a layer
    mounts = lab.view("mixed", "committed")
    lowers = next(o for o in mounts[0].options if o.startswith("lowerdir="))[len("lowerdir=") :].split(":")
    with lab.store.read(NS) as tx:
        committed_id = tx.get("committed").id
    assert lowers == [str(lab.driver.fs_path(committed_id)), *chain_mounts(lab.root)]
    with lab.mounted_at(mounts, "mixed") as root:
        assert (root / "written").read_text() == "by a container\n"
        assert (root / "a" / "f1").read_text() == "three\n"
        assert (root / "l2only").read_text() == "l2\n"


# -- containerd's conformance behaviours on converted parents --------------------------------------


def test_basic_on_a_converted_parent(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    with lab.mounted_at(lab.prepare("a1", top), "a1") as root:
        assert (root / "a" / "f1").read_text() == "two\n"  # the upper converted layer wins
        assert (root / "a" / "sub" / "deep").read_text() == "deep\n"
        assert (root / "l2only").read_text() == "l2\n"
        assert not (root / "del2").exists()  # whited out by the upper converted layer
        (root / "new").write_text("new\n")
        (root / "a" / "f2").write_text("f2\n")
    lab.snapshots.commit(NS, "c1", "a1", {})
    with lab.mounted_at(lab.prepare("a2", "c1"), "a2") as root:
        assert sorted(os.listdir(root)) == [
            "a",
            "del1",
            "l2only",
            "move",
            "new",
            "owned",
            "perm",
            "rmdir",
        ]
        assert (root / "a" / "f2").read_text() == "f2\n"
        assert (root / "a" / "f1").read_text() == "two\n"
    lab.snapshots.commit(NS, "c2", "a2", {})
    info = lab.snapshots.stat(NS, "c2")
    assert (info.kind, info.parent) == (Kind.COMMITTED, "c1")


def test_view_of_a_converted_chain_is_read_only(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    mounts = lab.view("v", top)
    assert (mounts[0].type, mounts[0].options) == ("bind", ("ro", "rbind"))
    with lab.mounted_at(mounts, "v") as root:
        with pytest.raises(OSError) as e:
            (root / "x").write_text("no")
        assert e.value.errno == errno.EROFS
        assert (root / "a" / "f1").read_text() == "two\n"
    with lab.mounted_at(lab.view("v-bottom", converted.layers[0].chain_id), "vb") as root:
        assert (root / "a" / "f1").read_text() == "one\n"  # each converted layer is its own snapshot
        assert (root / "del2").exists()


def test_layer_file_update_on_a_converted_parent(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    parent = top
    for i, text in enumerate(["three\n", "four\n"]):
        with lab.mounted_at(lab.prepare(f"u{i}", parent), f"u{i}") as root:
            (root / "a" / "f1").write_text(text)
        lab.snapshots.commit(NS, f"U{i}", f"u{i}", {})
        parent = f"U{i}"
    for name, want in (
        (converted.layers[0].chain_id, "one\n"),
        (top, "two\n"),
        ("U0", "three\n"),
        ("U1", "four\n"),
    ):
        with lab.mounted_at(lab.view(f"view-{want.strip()}", name), f"view-{want.strip()}") as root:
            assert (root / "a" / "f1").read_text() == want


def test_remove_directory_delete_and_move_in_a_child_of_a_converted_layer(
    lab: Lab, converted: Converted
) -> None:
    """RemoveDirectoryInLowerLayer, DeletedFilesInChildSnapshot, MoveFileFromLowerLayer."""
    top = lab.pull(converted)
    with lab.mounted_at(lab.prepare("w", top), "w") as root:
        subprocess.run(["rm", "-rf", "--", str(root / "rmdir")], check=True)
        (root / "del1").unlink()
        (root / "move" / "src").rename(root / "move" / "dst")
    lab.snapshots.commit(NS, "W", "w", {})
    with lab.mounted_at(lab.view("after", "W"), "after") as root:
        assert not (root / "rmdir").exists()
        assert not (root / "del1").exists()
        assert os.listdir(root / "move") == ["dst"]
        assert (root / "move" / "dst").read_text() == "moved\n"
    with lab.mounted_at(lab.view("before", top), "before") as root:
        assert sorted(os.listdir(root / "rmdir")) == ["sub", "x"]
        assert (root / "del1").exists()
        assert os.listdir(root / "move") == ["src"]


def test_chown_and_directory_permission_on_a_converted_parent(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    with lab.mounted_at(lab.prepare("c", top), "c") as root:
        assert (root / "owned").stat().st_uid == 0
        os.chown(root / "owned", 1000, 1001)
        os.chown(root / "a" / "sub", 33, 33)
        assert (root / "perm").stat().st_mode & 0o777 == 0o700
        (root / "perm" / "inside").write_text("x")
    lab.snapshots.commit(NS, "C", "c", {})
    with lab.mounted_at(lab.view("cv", "C"), "cv") as root:
        st = (root / "owned").stat()
        assert (st.st_uid, st.st_gid) == (1000, 1001)
        assert (root / "a" / "sub").stat().st_uid == 33
        assert (root / "perm").stat().st_mode & 0o777 == 0o700
        assert (root / "perm" / "inside").read_text() == "x"


def test_removing_a_converted_layer_with_children_fails(lab: Lab, converted: Converted) -> None:
    bottom, top = converted.layers
    lab.pull(converted)
    with pytest.raises(FailedPreconditionError):
        lab.snapshots.remove(NS, bottom.chain_id)
    lab.prepare("child", top.chain_id)
    with pytest.raises(FailedPreconditionError):
        lab.snapshots.remove(NS, top.chain_id)
    assert len(chain_mounts(lab.root)) == 1  # the failed removal released nothing
    lab.snapshots.remove(NS, "child")
    lab.snapshots.remove(NS, top.chain_id)
    lab.snapshots.remove(NS, bottom.chain_id)
    assert lab.snapshots.walk(NS, []) == []


# -- restarts --------------------------------------------------------------------------------------


def mount_id(target: str) -> int:
    info = find_mount(target)
    assert info is not None, f"{target} is not mounted"
    return info.mount_id


def test_restart_keeps_mounts_in_use_and_releases_the_rest(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    lab.prepare("running", top)
    [mp] = chain_mounts(lab.root)
    before = mount_id(mp)
    stray = lab.root / "remote" / "img-00000000000000000000000000000000"
    stray.mkdir()  # what a crash between mkdir and attach leaves

    again = RemoteSnapshots(lab.store, lab.root, lab.daemon)  # a restarted service, same root
    again.reconcile()
    assert chain_mounts(lab.root) == [mp]
    assert mount_id(mp) == before  # untouched: a running container never notices
    assert not stray.exists()

    # A crash between losetup and mount: the loop device is found through sysfs and reused.
    [loop] = device_loops(lab.state)
    subprocess.run(["umount", mp], check=True)
    again.reconcile()
    assert chain_mounts(lab.root) == [mp]
    assert device_loops(lab.state) == [loop]

    # A chain whose mount and loop device vanished (a reboot) while the store needs it comes back.
    subprocess.run(["umount", mp], check=True)
    subprocess.run(["losetup", "--detach", *device_loops(lab.state)], check=True)
    again.reconcile()
    assert chain_mounts(lab.root) == [mp]
    again.close()


def test_a_killed_device_daemon_is_started_again_and_chains_remounted(lab: Lab, converted: Converted) -> None:
    top = lab.pull(converted)
    lab.prepare("running", top)
    pid = daemon_pid(lab.state)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    lab.remote.reconcile()
    assert daemon_pid(lab.state) not in (None, pid)
    with lab.mounted_at(lab.view("fresh", top), "fresh") as root:
        assert (root / "a" / "f1").read_text() == "two\n"


# -- damselfly serve: the wire, the log, /metrics --------------------------------------------------


def prepare_headerless(
    stub: pb_grpc.SnapshotsStub, key: str, parent: str, labels: dict[str, str] | None = None
) -> list[mount_pb2.Mount]:
    """Prepare as containerd 1.6 sends it to a proxy snapshotter: no namespace header."""
    return list(stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels or {})).mounts)


def remove_everything(stub: pb_grpc.SnapshotsStub) -> None:
    """Remove every snapshot (any namespace), children first, as containerd's GC would."""
    while infos := [i for r in stub.List(pb.ListSnapshotsRequest()) for i in r.info]:
        parents = {i.parent for i in infos}
        for i in infos:
            if i.name not in parents:
                stub.Remove(pb.RemoveSnapshotRequest(key=i.name))


def test_serve_answers_already_exists_logs_fallbacks_exposes_metrics_and_restarts(
    tmp_path: Path, converted: Converted
) -> None:
    state = tmp_path / "state"
    port = free_port()
    config = serve_config(tmp_path / "config.toml", state, metrics=f"127.0.0.1:{port}")
    served = serving.start(tmp_path, "--config", str(config))
    try:
        stub = served.stub
        bottom, top = converted.layers
        # containerd 1.6 sends no namespace header: its keys carry the namespace.
        for i, layer in enumerate(converted.layers):
            with pytest.raises(grpc.RpcError) as e:
                prepare_headerless(
                    stub, f"default/{i + 1}/extract {layer.chain_id}", layer.parent, layer.labels
                )
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        prepare_headerless(stub, "default/9/extract bad", bottom.chain_id, {**top.labels, KEY_VERSION: "8"})
        mounts = prepare_headerless(stub, "default/10/container", top.chain_id)
        with serving.mounted(mounts, tmp_path / "mnt") as root:
            assert (root / "l2only").read_text() == "l2\n"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'damselfly_remote_fallbacks_total{reason="labels"} 1.0' in metrics
        assert "damselfly_remote_layers_total 2.0" in metrics
        # The container's chain, and the fallback's: its parent is the bottom converted layer.
        assert "damselfly_chain_mounts 2.0" in metrics
        log = served.log_text()
        assert f"WARNING snapshotter.remote.snapshots: converted layer {top.chain_id}" in log
        assert "falls back to a normal pull" in log and "version 8" in log

        # A clean stop leaves the device daemon and the chains to the snapshots that use them ...
        mounted = chain_mounts(served.root)
        assert served.stop() == 0
        assert daemon_pid(state) is not None
        assert chain_mounts(served.root) == mounted
        # ... and the restarted service takes them over as they are.
        served = serving.start(tmp_path, "--config", str(config))
        assert "reconciled converted chains: 2 needed, 2 mounted, 0 released" in served.log_text()
        with serving.mounted(
            served.stub.Mounts(pb.MountsRequest(key="default/10/container")).mounts, tmp_path / "mnt"
        ) as root:
            assert (root / "a" / "f1").read_text() == "two\n"

        remove_everything(served.stub)
        assert chain_mounts(served.root) == []
        assert served.stop() == 0
        assert daemon_pid(state) is None, "an idle device daemon outlived a clean stop"
    finally:
        served.stop()
        undone = release_remote(served.root, state)
        serving.unmount_under(tmp_path)
    assert undone == [], undone


# -- the integration files -------------------------------------------------------------------------


def test_containerd_snippet_and_systemd_unit_match_the_defaults() -> None:
    scripts = Path(__file__).resolve().parents[2] / "scripts"
    snippet = tomllib.loads((scripts / "containerd-config.toml").read_text())
    assert snippet["proxy_plugins"]["damselfly"] == {
        "type": "snapshot",
        "address": Config().snapshotter.address,
    }
    unit = (scripts / "systemd" / "damselfly.service").read_text().splitlines()
    # Stopping the unit must leave the device daemon (and the containers' devices) running.
    assert "KillMode=process" in unit
    assert "Before=containerd.service" in unit
    assert any(line.startswith("ExecStart=") and line.endswith("damselfly serve") for line in unit)
    # Ready when the socket serves (sd_notify), and not the first thing the OOM killer takes.
    assert "Type=notify" in unit
    assert "OOMScoreAdjust=-999" in unit


def test_config_checks_the_remote_device_and_metrics_keys() -> None:
    cfg = parse(
        '[remote]\ncheck_timeout = 2\n[device]\nbackground_delay = 0\n[metrics]\naddress = "127.0.0.1:9464"\n'
    )
    assert (cfg.remote.check_timeout, cfg.device.background_delay, cfg.metrics.address) == (
        2.0,
        0.0,
        "127.0.0.1:9464",
    )
    for bad, words in (
        ("[remote]\ncheck_timeout = 0\n", "must be positive"),
        ("[device]\nbackground_rate = -1\n", "must not be negative"),
        ('[metrics]\naddress = "9464"\n', "host:port"),
        ('[remote]\nenabled = "yes"\n', "must be a bool"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse(bad)
