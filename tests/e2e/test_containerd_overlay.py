"""containerd's own overlayfs snapshotter on the test images: the fixtures work end to end (registry →
``ctr image pull`` → a view of the image's chain → a tree; ``ctr run``), and the tree containerd makes of
`semantics_image()` is the one its layers describe and the one `applytar` makes, except where containerd
1.6 departs from the image-spec (asserted here, so a change in containerd shows):

- ``trusted.*`` xattrs in a layer are never applied ("admin attributes from archive not supported");
- a hardlink to a file of a lower layer fails the pull (its overlay applier links inside the new upper
  directory only);
- a whiteout of a directory recreated in the same layer lets the lower children show again (the
  applier makes a fresh, non-opaque directory in the new upper). (A directory entry over a lower
  directory replaces that directory's xattrs there; applytar does the same, so the trees agree.)

The converter's tests compare against `overlay_tree` the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.demolib.procs import processes as _processes
from snapshotter.convert.applytar import apply_layer
from snapshotter.convert.layerstream import open_layer_stream
from tests import oci_images as oi
from tests import trees
from tests.p2p.registry_server import RegistryServer

from .containerd import (
    SHIM,
    SHIM_SOCKET_DIR,
    Containerd,
    ContainerdError,
    mount_all,
    overlay_tree,
)

MiB = 1 << 20


def applied_tree(built: oi.BuiltImage, root: Path) -> trees.Tree:
    """The tree of `built` made by applying its layer blobs in order with `applytar` onto `root`."""
    root.mkdir()
    for layer in built.layers:
        with open(layer.path, "rb") as f:
            apply_layer(open_layer_stream(f, layer.media_type, layer=layer.digest), root, layer=layer.digest)
    return trees.snapshot(root)


def push(registry: RegistryServer, built: oi.BuiltImage, repository: str) -> str:
    return oi.push_image(registry.host, built, repository, "v1")


@pytest.fixture(scope="module")
def semantics(tmp_path_factory: pytest.TempPathFactory) -> oi.BuiltImage:
    return oi.write_layout(oi.semantics_image(), tmp_path_factory.mktemp("semantics") / "layout")


@pytest.fixture(scope="module")
def semantics_ref(registry: RegistryServer, semantics: oi.BuiltImage) -> str:
    return push(registry, semantics, f"e2e/semantics-{os.getpid()}")


@pytest.fixture(scope="module")
def semantics_overlay(containerd: Containerd, semantics_ref: str) -> trees.Tree:
    return overlay_tree(containerd, semantics_ref)


# -- the tree ------------------------------------------------------------------------------------


def test_overlay_tree_of_the_semantics_image_is_the_applied_tree(
    semantics_overlay: trees.Tree, semantics: oi.BuiltImage, tmp_path: Path
) -> None:
    want = applied_tree(semantics, tmp_path / "applied")
    assert want["xattrs/trusted"].xattrs[0][0] == "trusted.damselfly"
    # containerd 1.6 (archive/tar_unix.go setxattr) refuses trusted.* from layers; the rest must match.
    trees.assert_same(
        want.without_xattrs("trusted."), semantics_overlay, what="containerd overlay vs applytar"
    )


def test_overlay_tree_is_what_the_layers_describe(semantics_overlay: trees.Tree) -> None:
    t = semantics_overlay
    # Whiteouts of a file and a directory; the opaque directory shows only the upper layers' children.
    assert not any(p.startswith(("lower/file-to-whiteout", "lower/dir-to-whiteout")) for p in t.paths())
    assert [p for p in t.paths() if p.startswith("lower/opaque/")] == [
        "lower/opaque/added-in-layer-2",
        "lower/opaque/new",
    ]
    assert "links/dangling" not in t  # whited out by layer 2
    # File → dir → file, and dir → file → dir (the lowest dir's child does not come back).
    assert t["lower/file-becomes-dir"].kind == "file"
    assert t["lower/file-becomes-dir"].sha256 == oi.sha256_digest(b"a file again\n").removeprefix("sha256:")
    assert "lower/file-becomes-dir/inside" not in t
    assert (t["lower/dir-becomes-file"].kind, t["lower/dir-becomes-file"].mode) == ("dir", 0o711)
    assert [p for p in t.paths() if p.startswith("lower/dir-becomes-file/")] == [
        "lower/dir-becomes-file/link"
    ]
    # Content and metadata changes in upper layers; a directory that changes owner keeps its children.
    assert (t["lower/changes-mode"].mode, t["lower/changes-mode"].uid) == (0o600, 1000)
    assert (t["meta/dir"].mode, t["meta/dir"].uid, t["meta/dir"].gid) == (0o700, 1000, 1000)
    assert "meta/dir/kept" in t
    # Hardlinks, symlinks stored as given.
    assert frozenset({"links/original", "links/hard-1", "links/sub/hard-2"}) in t.hardlinks
    assert t["links/original"].mode == 0o4750
    targets = {p: t[p].target for p in ("links/relative", "links/absolute", "links/escape", "links/to-dir")}
    assert targets == {
        "links/relative": "../etc/passwd",
        "links/absolute": "/etc/passwd",
        "links/escape": "../../../../etc/passwd",
        "links/to-dir": "../lower",
    }
    assert (t["links/absolute"].uid, t["links/absolute"].gid) == (1234, 5678)
    # Xattrs (trusted.* is dropped by containerd, see the module docstring).
    assert dict(t["xattrs/capability"].xattrs) == {"security.capability": oi.CAP_NET_BIND_RAW}
    assert dict(t["xattrs/user"].xattrs) == {
        "user.binary": bytes(range(256)),
        "user.damselfly": b"value",
        "user.empty": b"",
    }
    assert dict(t["xattrs/trusted"].xattrs) == {"user.also": b"1"}
    assert dict(t["xattrs"].xattrs) == {"user.dir": b"on a directory"}
    # Modes, devices, owners, times.
    modes = {p.removeprefix("modes/"): t[p].mode for p in t.paths() if p.startswith("modes/")}
    assert modes == {
        "all-bits": 0o7777,
        "none": 0,
        "setgid": 0o2755,
        "setgid-dir": 0o2775,
        "setgid-dir/inherits-nothing": 0o644,
        "setuid": 0o4755,
        "sticky": 0o1777,
    }
    devices = {p: (t[p].kind, t[p].rdev) for p in t.paths() if p.startswith("devices/")}
    assert devices == {
        "devices/big-minor": ("block", (259, 70000)),
        "devices/fifo": ("fifo", None),
        "devices/loop": ("block", (7, 0)),
        "devices/null": ("char", (1, 3)),
        "devices/tty-ish": ("char", (4, 64)),
    }
    owners = {p: (t[p].uid, t[p].gid) for p in t.paths() if p.startswith("owners/")}
    assert owners == {
        "owners/above-16-bit": (70000, 100000),
        "owners/above-ustar": (3_000_000, 4_000_000),
        "owners/nobody": (65534, 65534),
    }
    times = {p.removeprefix("times/"): t[p].mtime_ns for p in t.paths() if p.startswith("times/")}
    assert times == {
        "before-1970": 0,  # out of range: the epoch, as containerd's boundTime makes it
        "max-ns": 1_650_000_000_999_999_999,
        "one-ns": 1_650_000_000_000_000_001,
        "whole-second": 1_650_000_000_000_000_000,
        "year-2100": 4_102_444_800_000_000_042,
    }
    # Files: sparse (holes read as zeros), zeros, big, empty; names.
    sparse = bytearray(32 * MiB)
    for offset, data in (
        (0, b"head" * 1024),
        (10 * MiB + 123, oi.content(8192, 1)),
        (32 * MiB - 100, b"t" * 100),
    ):
        sparse[offset : offset + len(data)] = data
    assert t["files/sparse"].sha256 == oi.sha256_digest(bytes(sparse)).removeprefix("sha256:")
    assert t["files/sparse-all-hole"].size == 4 * MiB
    assert t["files/big"].sha256 == oi.sha256_digest(oi.content(6 * MiB, 5)).removeprefix("sha256:")
    assert t["files/empty"].size == 0
    assert "names/" + oi.LONG_NAME in t
    assert "names/" + oi.DEEP_DIR + "/deep-file" in t
    assert {"names/ümlaut ß", "names/日本語.txt", "names/emoji-🐟", "names/with space\tand tab"} <= set(
        t.paths()
    )


def test_absolute_names_apply_relative_to_the_root(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    built = oi.write_layout(oi.absolute_names_image(), tmp_path / "layout")
    got = overlay_tree(containerd, push(registry, built, f"e2e/absolute-{os.getpid()}"))
    assert got["abs/file"].sha256 == oi.sha256_digest(b"absolute name\n").removeprefix("sha256:")
    trees.assert_same(applied_tree(built, tmp_path / "applied"), got)


def test_containerd_overlay_cannot_apply_a_hardlink_to_a_lower_layer(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    built = oi.write_layout(oi.lower_hardlink_image(), tmp_path / "layout")
    ref = push(registry, built, f"e2e/lower-hardlink-{os.getpid()}")
    with pytest.raises(ContainerdError, match="link"):
        containerd.pull(ref)
    # The image-spec allows it, and applytar applies it: the converter's tests use this image alone.
    applied = applied_tree(built, tmp_path / "applied")
    assert frozenset({"data/target", "data/dir/link-to-lower"}) in applied.hardlinks


def test_containerd_overlay_departs_from_the_spec_for_lower_directories(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path
) -> None:
    image = oi.busybox_image(
        oi.Layer(
            (
                oi.directory("x", xattrs={"user.a": b"1"}),
                oi.file("x/old", b"o"),
                oi.directory("w"),
                oi.file("w/lower-child", b"c"),
            )
        ),
        oi.Layer(
            (
                oi.directory("x", xattrs={"user.b": b"2"}),
                oi.file("x/new", b"n"),
                oi.whiteout("w"),
                oi.directory("w"),
                oi.file("w/new", b"n"),
            ),
            auto_parents=False,
        ),
    )
    built = oi.write_layout(image, tmp_path / "layout")
    got = overlay_tree(containerd, push(registry, built, f"e2e/lower-dirs-{os.getpid()}"))
    assert trees.diff(applied_tree(built, tmp_path / "applied"), got) == [
        "extra 'w/lower-child': file 0644 0:0 " + oi.sha256_digest(b"c")[7:19],
    ]


# -- running containers --------------------------------------------------------------------------


def test_ctr_run_runs_the_busybox_layer(containerd: Containerd, semantics_ref: str) -> None:
    containerd.pull(semantics_ref)
    r = containerd.run(semantics_ref, ["/bin/sh", "-c", "echo hello $DAMSELFLY; cat /lower/opaque/new"])
    assert r.stdout.splitlines() == ["hello semantics", "the only child after the opaque marker"]
    assert containerd.run(semantics_ref).stdout.strip() == oi.SEMANTICS_MESSAGE  # the image's Cmd
    assert containerd.ctr("containers", "ls", "-q").stdout.strip() == ""  # --rm removed them


def test_ctr_failures_carry_the_containerd_log(containerd: Containerd) -> None:
    with pytest.raises(ContainerdError, match="containerd log:") as err:
        containerd.ctr("image", "pull", "--plain-http", "127.0.0.1:9/nothing/here:v1", timeout=30)
    assert "exited 1" in str(err.value)


# -- the fixture itself ----------------------------------------------------------------------------


@pytest.fixture
def busybox_ref(registry: RegistryServer, tmp_path: Path) -> str:
    built = oi.write_layout(oi.busybox_image(), tmp_path / "busybox")
    return push(registry, built, f"e2e/busybox-{os.getpid()}")


def _shims_of(c: Containerd) -> list[int]:
    return [pid for pid, argv in _processes() if os.path.basename(argv[0]) == SHIM and c.address in argv]


def test_containerd_keeps_to_its_directory_and_proxy_plugins_load(tmp_path: Path) -> None:
    c = Containerd(proxy_plugins={"damselfly": str(tmp_path / "snapshotter.sock")})
    try:
        config = c.config()
        assert "/run/containerd" not in config and "/var/lib/containerd" not in config
        assert (
            f'[proxy_plugins."damselfly"]\n  type = "snapshot"\n  address = "{tmp_path}/snapshotter.sock"'
            in config
        )
        c.start()
        plugins = c.ctr("plugins", "ls").stdout.splitlines()
        assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", "damselfly"] for line in plugins)
        assert {p.name for p in c.dir.iterdir()} == {
            *("config.toml", "containerd.log", "containerd.sock", "containerd.sock.ttrpc"),
            *("fifo", "mnt", "opt", "root", "runc", "state"),
        }
    finally:
        assert c.stop() == []
    assert c.leaks() == []


def test_stop_removes_running_containers_shims_mounts_and_sockets(busybox_ref: str) -> None:
    host_dirs = {d: os.path.exists(d) for d in (str(SHIM_SOCKET_DIR.parent), "/var/lib/containerd")}
    c = Containerd()
    try:
        c.start()
        c.pull(busybox_ref)
        c.run(busybox_ref, ["/bin/sleep", "600"], container_id="sleeper", detach=True)
        (shim,) = _shims_of(c)
        address_file = next((c.state / "io.containerd.runtime.v2.task").glob("*/sleeper/address"))
        shim_socket = address_file.read_text().strip().removeprefix("unix://")
        assert shim_socket.startswith(f"{SHIM_SOCKET_DIR}/") and os.path.exists(shim_socket)
        assert stat.S_ISSOCK(os.lstat(shim_socket).st_mode)
        # A view the test mounted and never unmounted.
        chain = c.image_chain_id(busybox_ref)
        mounts = json.loads(c.ctr("snapshots", "view", "--mounts", "left-behind", chain).stdout)
        target = c.mounts_dir / "left-behind"
        target.mkdir()
        mount_all(mounts, target)
        assert (target / "bin" / "busybox").exists()
    finally:
        forced = c.stop()
    text = "\n".join(forced)
    assert "runc delete --force sleeper" in text
    assert f"shim {shim} killed" in text
    assert f"umount {target}" in text
    assert c.leaks() == []
    assert not os.path.lexists(shim_socket)
    assert {d: os.path.exists(d) for d in host_dirs} == host_dirs


def test_tree_diff_names_what_differs(semantics_overlay: trees.Tree) -> None:
    """The assertion message a converter test shows: each difference in words, expected first."""
    changed = dict(semantics_overlay.nodes)
    changed["modes/setuid"] = dataclasses.replace(changed["modes/setuid"], mode=0o755)
    del changed["files/empty"]
    broken = trees.Tree(changed, frozenset())
    with pytest.raises(AssertionError) as err:
        trees.assert_same(semantics_overlay, broken)
    message = str(err.value)
    assert "differs 'modes/setuid': mode '4755' != '0755'" in message
    assert "missing 'files/empty'" in message
    assert (
        "hardlink group only in expected: ['links/hard-1', 'links/original', 'links/sub/hard-2']" in message
    )


@pytest.fixture(autouse=True)
def _no_stray_shims(containerd: Containerd) -> Iterator[None]:
    yield
    assert _shims_of(containerd) == [], "a test left a container running in the module's containerd"


def test_applied_tree_helper_applies_in_order(tmp_path: Path) -> None:
    """`applied_tree` is the applytar reference: a whiteout in layer 2 removes layer 1's file."""
    image = oi.Image(
        (
            oi.Layer((oi.file("a/x", b"1"), oi.file("a/y", b"2"))),
            oi.Layer((oi.whiteout("a/x"),), compression="none"),
        )
    )
    t = applied_tree(oi.write_layout(image, tmp_path / "layout"), tmp_path / "root")
    assert t.paths() == ["a", "a/y"]
