"""scripts/build_debian_image.py: the image builder behind the demo and the conversion benchmark.

The busybox variant (no network, ~1 s) stands in for the Debian one: both go through the same tree
tarrer, layer cache, payload generator, top layer and layout writer; only debootstrap is left out of the
default suite (minutes, and the mirror). The tree tarrer's special cases (devices, fifos, xattrs, hard
links, setuid) and the chroot cleanup get their own tests, with real device nodes and a real mount.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from p2p.manifest import OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, Index, Manifest, parse_manifest
from snapshotter.convert.applytar import apply_layer
from snapshotter.convert.layerstream import open_layer_stream

REPO = Path(__file__).resolve().parents[2]


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_debian_image", REPO / "scripts" / "build_debian_image.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


bdi = _load_builder()


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    # CI runs as root; device nodes, chown and mounts need it. Without root: a failure, never a skip.
    if os.geteuid() != 0:
        pytest.fail("these tests need root (mknod, chroot, mount)")


@pytest.fixture(scope="module")
def busybox_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("images")
    return bdi.build_image(bdi.ImageSpec(variant="busybox", payload_mb=3), cache, ref="test", quiet=True)


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / digest.replace(":", "/")).read_bytes()


def _read_image(layout: Path) -> tuple[Index, Manifest, dict[str, object]]:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = parse_manifest((layout / "index.json").read_bytes(), None, str(layout))
    assert isinstance(index, Index) and index.media_type == OCI_INDEX
    (entry,) = index.manifests
    raw = _blob(layout, entry.digest)
    assert len(raw) == entry.size
    manifest = parse_manifest(raw, entry.media_type, str(layout))
    assert isinstance(manifest, Manifest) and manifest.digest == entry.digest  # digest of the exact bytes
    config_raw = _blob(layout, manifest.config.digest)
    assert "sha256:" + hashlib.sha256(config_raw).hexdigest() == manifest.config.digest
    return index, manifest, json.loads(config_raw)


def _layer_tars(layout: Path, manifest: Manifest) -> list[bytes]:
    return [zlib.decompress(_blob(layout, d.digest), 31) for d in manifest.layers]


def _members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return tf.getmembers()


def test_layout_parses_and_diff_ids_are_the_uncompressed_layer_digests(busybox_image: Any) -> None:
    layout = Path(busybox_image.layout_dir)
    index, manifest, config = _read_image(layout)
    assert index.manifests[0].annotations == {"org.opencontainers.image.ref.name": "test"}
    assert manifest.media_type == OCI_MANIFEST and manifest.config.media_type == OCI_CONFIG
    assert len(manifest.layers) == 3  # base, payload, top
    for desc in manifest.layers:
        blob = _blob(layout, desc.digest)
        assert desc.media_type == OCI_LAYER_GZIP
        assert len(blob) == desc.size
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc.digest
    tars = _layer_tars(layout, manifest)
    assert config["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars],
    }
    assert config["config"]["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])
    assert len(config["history"]) == 3
    image = busybox_image
    assert image.uncompressed_size == sum(len(t) for t in tars)
    assert image.compressed_size == sum(d.size for d in manifest.layers)


def test_layers_hold_base_payload_and_top_change(busybox_image: Any) -> None:
    layout = Path(busybox_image.layout_dir)
    _, manifest, _ = _read_image(layout)
    base, payload, top = (_members(t) for t in _layer_tars(layout, manifest))
    by_name = {m.name: m for m in base}
    busybox = by_name["bin/busybox"]
    assert busybox.isreg() and busybox.mode == 0o755 and (busybox.uid, busybox.gid) == (0, 0)
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "/bin/busybox"
    assert by_name["tmp"].mode == 0o1777
    assert [m.name for m in base] == sorted(m.name for m in base)  # a directory sorts before its children
    files = [m for m in payload if m.isreg()]
    assert sum(m.size for m in files) == 3_000_000
    assert all(m.name == "opt" or m.name.startswith("opt/payload") for m in payload)
    assert {"lnk", "sym"} <= {("lnk" if m.islnk() else "sym" if m.issym() else "") for m in payload}
    assert [(m.name, m.isreg(), m.size) for m in top] == [
        ("etc", False, 0),
        ("etc/motd", True, top[1].size),
        ("etc/.wh.issue.net", True, 0),
    ]


def test_image_applied_like_a_runtime_runs_with_the_top_change(busybox_image: Any, tmp_path: Path) -> None:
    layout = Path(busybox_image.layout_dir)
    _, manifest, _ = _read_image(layout)
    root = tmp_path / "root"
    root.mkdir()
    for i, desc in enumerate(manifest.layers):
        with open(layout / "blobs" / desc.digest.replace(":", "/"), "rb") as f:
            apply_layer(open_layer_stream(f, desc.media_type, layer=f"layer {i}"), root, layer=f"layer {i}")
    assert not (root / "etc/issue.net").exists()
    assert "changed by the top layer" in (root / "etc/motd").read_text()
    done = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo hello from $(cat /etc/passwd | head -n1 | cut -d: -f1)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == "hello from root\n"


def test_second_build_is_cached_and_another_cache_builds_the_same_bytes(
    busybox_image: Any, tmp_path: Path
) -> None:
    cache = Path(busybox_image.layout_dir).parent
    spec = bdi.ImageSpec(variant="busybox", payload_mb=3)
    again = bdi.build_image(spec, cache, ref="test", quiet=True)
    assert again.cached and again.manifest_digest == busybox_image.manifest_digest
    elsewhere = bdi.build_image(spec, tmp_path / "other", ref="test", quiet=True)
    assert not elsewhere.cached
    assert elsewhere.manifest_digest == busybox_image.manifest_digest
    assert not [p for p in (tmp_path / "other").rglob("*") if p.name.startswith((".tmp-", ".busybox-"))]


def test_target_size_sizes_the_payload(tmp_path: Path) -> None:
    image = bdi.build_image(
        bdi.ImageSpec(variant="busybox", target_mb=6, top_layer=False), tmp_path, quiet=True
    )
    assert [layer.kind for layer in image.layers] == ["base-busybox", "payload"]
    assert 6_000_000 <= image.uncompressed_size < 6_000_000 + 1_500_000


def test_tree_tar_keeps_devices_fifos_xattrs_hardlinks_and_modes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dev").mkdir(parents=True)
    os.mknod(tree / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(tree / "dev/loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mkfifo(tree / "fifo", 0o600)
    (tree / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(tree / "suid", 1234, 70000)  # before chmod: chown clears setuid
    os.chmod(tree / "suid", 0o4755)
    os.link(tree / "suid", tree / "suid-link")
    os.setxattr(tree / "suid", "user.note", b"\xff\x00binary")
    os.symlink("../outside", tree / "sym")
    os.utime(tree / "fifo", ns=(5 * 10**18, 5 * 10**18))  # far future: clamped

    cache = bdi.LayerCache(tmp_path / "cache", bdi.Ui(quiet=True))
    info = cache.build("t", "test", "tree", "isal", None, lambda tf: bdi.add_tree(tf, str(tree)))
    raw = cache.blob_path("t").read_bytes()
    tar = zlib.decompress(raw, 31)
    assert info.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert info.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    members = {m.name: m for m in _members(tar)}
    assert info.entries == len(members) == 7
    assert members["dev/null"].ischr() and (members["dev/null"].devmajor, members["dev/null"].devminor) == (
        1,
        3,
    )
    assert members["dev/loop9"].isblk() and members["dev/loop9"].devminor == 9
    assert members["fifo"].isfifo() and members["fifo"].mtime == bdi.MTIME_CLAMP
    suid = members["suid"]
    assert suid.isreg() and suid.mode == 0o4755 and (suid.uid, suid.gid) == (1234, 70000)
    assert suid.pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == b"\xff\x00binary"
    assert members["suid-link"].islnk() and members["suid-link"].linkname == "suid"
    assert members["sym"].issym() and members["sym"].linkname == "../outside"
    assert (suid.uname, suid.gname) == ("", "")


@pytest.fixture
def chroot_with_mounts(tmp_path: Path) -> Iterator[Path]:
    """A fake debootstrap target with /proc and /proc/sys-like nested mounts left behind."""
    target = tmp_path / "target"
    (target / "proc").mkdir(parents=True)
    (target / "etc").mkdir()
    (target / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target / "proc")], check=True)
    (target / "proc/sys").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target / "proc/sys")], check=True)
    yield target
    for point in (target / "proc/sys", target / "proc"):  # only if the test failed to remove them
        subprocess.run(["umount", str(point)], capture_output=True, check=False)


def test_remove_chroot_unmounts_deepest_first_then_deletes(chroot_with_mounts: Path) -> None:
    target = chroot_with_mounts.resolve()
    assert bdi.mounts_under(target) == [str(target / "proc/sys"), str(target / "proc")]
    bdi.remove_chroot(target)
    assert bdi.mounts_under(target) == []
    assert not target.exists()


def test_cli_prints_the_layout_and_a_json_summary(busybox_image: Any) -> None:
    cache = Path(busybox_image.layout_dir).parent
    args = ["--variant", "busybox", "--payload-mb", "3", "--ref", "test", "--cache-dir", str(cache)]
    script = str(REPO / "scripts" / "build_debian_image.py")
    plain = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
    assert plain.stdout == busybox_image.layout_dir + "\n"
    assert "cached" in plain.stderr
    summary = subprocess.run(
        [sys.executable, script, *args, "--json"], capture_output=True, text=True, check=True
    )
    doc = json.loads(summary.stdout)
    assert doc["manifest_digest"] == busybox_image.manifest_digest
    assert doc["uncompressed_size"] == busybox_image.uncompressed_size
