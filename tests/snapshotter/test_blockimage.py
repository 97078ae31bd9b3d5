"""Block images built from a directory: the mounted image is the source tree, and tools accept the layout."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockformat.annotations import MEDIA_TYPE_LAYER, LayerAnnotations
from blockformat.chunkfile import BlobInfo
from blockformat.errors import CorruptBlobError
from blockformat.layer import LayerReader
from blockformat.source import FileSource
from blockformat.stack import Stack
from snapshotter.errors import ImageError, MountError
from snapshotter.host.loop import loops_for
from snapshotter.host.mounts import mount_loop, umount_loop
from snapshotter.image.blockimage import (
    MIN_VSIZE,
    build_layer_from_dir,
    measure_tree,
    read_oci_layout,
    write_device_file,
    write_oci_layout,
)
from tests import trees

from .conftest import KernelResources

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_block_image.py"
FIXED_MTIME = 1_600_000_000


# -- a source tree with every kind of entry ------------------------------------------------------


_WORDS = (b"damselfly ", b"block ", b"layer\n", b"ext4 ", b"chunk ", b"stack\n")
_TEXT = b"".join(random.Random(0).choice(_WORDS) for _ in range(200_000))  # ~1.2 MiB of text


def _content(rng: random.Random, size: int) -> bytes:
    """Half compressible text, half random bytes, so both chunk kinds occur."""
    half = size // 2
    text = _TEXT * (half // len(_TEXT) + 2)
    start = rng.randrange(len(_TEXT))
    return text[start : start + half] + rng.randbytes(size - half)


def make_tree(root: Path, files: int = 300, seed: int = 7) -> None:
    """A deterministic tree: mixed sizes (empty to 3 MiB, one sparse), nested dirs, symlinks, hard links,
    a fifo, a device node, xattrs, odd names, modes (setuid, setgid, sticky, 0) and owners."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    dirs = [root]
    for i in range(24):
        d = rng.choice(dirs) / f"dir{i}"
        d.mkdir()
        dirs.append(d)
    sizes = [0, 1, 100, 4095, 4096, 4097, 65536, 65537]
    for i in range(files):
        size = sizes[i] if i < len(sizes) else rng.choice([rng.randrange(20000), rng.randrange(300000)])
        p = rng.choice(dirs) / f"file{i}.dat"
        p.write_bytes(_content(rng, size))
        os.chmod(p, rng.choice([0o644, 0o755, 0o600, 0o640, 0o444]))
        os.chown(p, *rng.choice([(0, 0), (1000, 1000), (1000, 100), (65534, 65534)]))
    (root / "big1.bin").write_bytes(_content(rng, 1536 * 1024))
    (root / "big2.bin").write_bytes(_content(rng, 3 * MiB + 123))
    with open(root / "sparse.bin", "wb") as f:  # a hole in the middle reads back as zeros
        f.write(b"head" * 1000)
        f.seek(6 * MiB)
        f.write(b"tail" * 1000)
    # Modes and owners that matter to containers.
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "setgid").write_bytes(b"")
    os.chmod(root / "setgid", 0o2755)
    (root / "nothing").write_bytes(b"secret")
    os.chmod(root / "nothing", 0)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    home = root / "home" / "user"
    home.mkdir(parents=True)
    os.chown(home, 1000, 1000)
    os.chmod(home, 0o700)
    (home / ".profile").write_text("export PATH\n")
    os.chown(home / ".profile", 1000, 1000)
    # Links of every kind.
    (root / "rel-link").symlink_to("dir0/../big1.bin")
    (root / "abs-link").symlink_to("/etc/passwd")  # absolute: resolved inside the image, dangles here
    (root / "dangling").symlink_to("no/such/target")
    (root / "dir-link").symlink_to("home")
    (root / "long-link").symlink_to("x/" * 60 + "target")  # > 60 bytes: stored outside the inode
    os.lchown(root / "rel-link", 1000, 1000)
    os.link(root / "big1.bin", root / "hard-link")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    # Names.
    (root / "with space and ümlaut").write_text("name\n")
    (root / ("n" * 255)).write_text("long name\n")
    os.setxattr(root / "big2.bin", "user.damselfly", b"xattr value")
    # Fixed times (the directories last, as creating entries changes them).
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(FIXED_MTIME * 10**9,) * 2, follow_symlinks=False)


def assert_same_tree(source: Path, mounted: Path) -> None:
    """The mounted image holds the source tree: type, mode, owner, mtime, content, link target,
    device numbers, hardlink groups and xattrs of every entry (`tests.trees`); mtimes in whole seconds
    (what the image keeps) and without directories, as creating lost+found etc. touches them."""
    want = trees.snapshot(source, dir_mtimes=False, mtime_unit_ns=10**9)
    trees.assert_same(want, trees.snapshot(mounted, dir_mtimes=False, mtime_unit_ns=10**9))


# -- a built, reconstructed and mounted image ----------------------------------------------------


@dataclass(frozen=True)
class Built:
    src: Path
    blob: Path
    info: BlobInfo
    annotations: LayerAnnotations
    layout: Path
    manifest_digest: str
    workdir: Path


def _build(root: Path, src: Path, **kwargs: object) -> Built:
    workdir = root / "work"
    workdir.mkdir()
    blob = root / "layer.blob"
    info, annotations = build_layer_from_dir(src, blob, workdir=workdir, **kwargs)  # type: ignore[arg-type]
    layout = root / "layout"
    digest = write_oci_layout(
        layout, [(blob, info, annotations)], config_extra={"config": {"Cmd": ["/bin/sh"]}}
    )
    return Built(src, blob, info, annotations, layout, digest, workdir)


def _mount_built(kernel: KernelResources, built: Built, root: Path) -> Iterator[Path]:
    """Reconstruct the device from the layout's blob alone, loop-mount it ro,noload, yield the mount."""
    image = read_oci_layout(built.layout, "latest")
    layer = image.layers[0]
    with FileSource(layer.path) as source:
        stack = Stack([LayerReader(source, layer.annotations.index_digest)])
        device = root / "device.img"
        write_device_file(stack, device)
    target = kernel.mount_point(root / "mnt")
    mount_loop(device, target, "ext4", ["ro", "noload"])
    try:
        yield target
    finally:
        umount_loop(target)
    assert loops_for(device) == []


@pytest.fixture(scope="module")
def built(kernel_module: KernelResources) -> Built:
    src = kernel_module.dir / "src"
    make_tree(src)
    return _build(kernel_module.dir, src)


@pytest.fixture(scope="module")
def mounted(kernel_module: KernelResources, built: Built) -> Iterator[Path]:
    yield from _mount_built(kernel_module, built, kernel_module.dir)


# -- tests ---------------------------------------------------------------------------------------


def test_the_mounted_image_is_the_source_tree(built: Built, mounted: Path) -> None:
    assert_same_tree(built.src, mounted)
    assert (mounted / "lost+found").is_dir()
    root = os.lstat(mounted)
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (0o755, 0, 0)


def test_hard_links_stay_one_inode(mounted: Path) -> None:
    assert os.lstat(mounted / "hard-link").st_ino == os.lstat(mounted / "big1.bin").st_ino
    assert os.lstat(mounted / "big1.bin").st_nlink == 2


def test_the_hole_of_a_sparse_file_reads_as_zeros(mounted: Path) -> None:
    data = (mounted / "sparse.bin").read_bytes()
    assert data[:4000] == b"head" * 1000
    assert data[4000 : 6 * MiB] == bytes(6 * MiB - 4000)
    assert data[6 * MiB :] == b"tail" * 1000


def test_the_layer_holds_only_used_blocks(built: Built) -> None:
    tree = measure_tree(built.src)
    assert built.annotations.vsize == tree.vsize() >= MIN_VSIZE
    assert built.annotations.size == built.info.uncompressed_size
    # mkfs metadata adds little to the file data; free space and unused inode tables add nothing.
    assert built.info.uncompressed_size < tree.data_bytes + 4 * MiB
    assert built.info.blob_size < built.info.uncompressed_size


def test_build_leaves_only_the_blob(built: Built) -> None:
    assert os.listdir(built.workdir) == []
    assert not [n for n in os.listdir(built.blob.parent) if n.endswith(".tmp")]


def test_the_layer_verifies_against_its_annotated_index_digest(built: Built) -> None:
    with FileSource(built.blob) as source:
        layer = LayerReader(source, built.annotations.index_digest)
        assert layer.vsize == built.annotations.vsize
    wrong = "sha256:" + "0" * 64
    with FileSource(built.blob) as source, pytest.raises(CorruptBlobError):
        LayerReader(source, wrong)


def test_read_oci_layout_returns_manifest_config_and_annotations(built: Built) -> None:
    image = read_oci_layout(built.layout)
    assert image.manifest.digest == built.manifest_digest
    (layer,) = image.layers
    assert layer.annotations == built.annotations
    assert layer.descriptor.media_type == MEDIA_TYPE_LAYER
    assert layer.descriptor.digest == built.info.blob_digest
    assert layer.descriptor.size == built.info.blob_size == os.path.getsize(layer.path)
    assert image.config["rootfs"] == {"type": "layers", "diff_ids": [built.info.blob_digest]}
    assert (image.config["architecture"], image.config["os"]) == ("amd64", "linux")
    assert image.config["config"] == {"Cmd": ["/bin/sh"]}
    index = json.loads((built.layout / "index.json").read_text())
    assert index["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    assert json.loads((built.layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}


def test_skopeo_accepts_and_copies_the_layout(built: Built, tmp_path: Path) -> None:
    out = subprocess.run(
        ["skopeo", "inspect", f"oci:{built.layout}:latest"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["Digest"] == built.manifest_digest
    assert doc["Layers"] == [built.info.blob_digest]
    assert (doc["Architecture"], doc["Os"]) == ("amd64", "linux")
    # A copy keeps the layer bytes, media type and annotations (what a push to a registry does).
    copy = subprocess.run(
        ["skopeo", "copy", f"oci:{built.layout}:latest", f"oci:{tmp_path / 'copy'}:v1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert copy.returncode == 0, copy.stderr
    copied = read_oci_layout(tmp_path / "copy", "v1")
    assert copied.manifest.digest == built.manifest_digest
    assert copied.layers[0].annotations == built.annotations


def test_write_oci_layout_replaces_a_ref_and_keeps_the_others(built: Built, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    layers = [(built.blob, built.info, built.annotations)]
    first = write_oci_layout(layout, layers, "latest")
    second = write_oci_layout(layout, layers, "v2", config_extra={"config": {"Env": ["A=1"]}})
    again = write_oci_layout(layout, layers, "latest")
    assert first == again != second
    index = json.loads((layout / "index.json").read_text())
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert sorted(refs) == ["latest", "v2"]
    with pytest.raises(ImageError, match="holds 2 images"):
        read_oci_layout(layout)
    assert read_oci_layout(layout, "v2").manifest.digest == second
    with pytest.raises(ImageError, match="has no image 'v3'"):
        read_oci_layout(layout, "v3")
    assert not [n for n in os.listdir(layout / "blobs" / "sha256") if n.startswith(".tmp")]


def test_read_oci_layout_refuses_a_damaged_manifest(built: Built, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_oci_layout(layout, [(built.blob, built.info, built.annotations)])
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="does not match its descriptor"):
        read_oci_layout(layout)


def test_read_oci_layout_refuses_a_layer_that_is_not_a_damselfly_layer(built: Built, tmp_path: Path) -> None:
    plain = LayerAnnotations(built.annotations.index_digest, 1, 4096)
    layout = tmp_path / "layout"
    write_oci_layout(layout, [(built.blob, built.info, plain)])
    manifest_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    # Rewrite the manifest without annotations, as a plain OCI image would have it.
    mpath = layout / "blobs" / "sha256" / manifest_entry["digest"].removeprefix("sha256:")
    doc = json.loads(mpath.read_bytes())
    del doc["layers"][0]["annotations"]
    raw = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(raw)
    manifest_entry.update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_entry]}))
    with pytest.raises(ImageError, match="is not a damselfly layer"):
        read_oci_layout(layout)


def test_read_oci_layout_of_a_plain_directory_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not an OCI image layout"):
        read_oci_layout(tmp_path)


def test_a_missing_source_directory_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is not a directory"):
        build_layer_from_dir(tmp_path / "missing", tmp_path / "blob", workdir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_too_small_vsize_fails_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(12 * MiB))
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MountError, match="Could not allocate block"):
        build_layer_from_dir(src, out / "blob", workdir=work, vsize=8 * MiB)
    assert os.listdir(work) == []
    assert os.listdir(out) == []


def test_a_bad_codec_is_an_image_error_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ImageError, match="cannot write the layer"):
        build_layer_from_dir(src, tmp_path / "blob", workdir=work, codec="gzip-9000")
    assert os.listdir(work) == []
    assert not (tmp_path / "blob").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.slow
def test_an_image_of_5000_files_mounts_complete(kernel: KernelResources, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, files=300, seed=11)
    crowded = src / "crowded"  # one directory of 3,000 entries: a hashed (htree) directory
    crowded.mkdir()
    for i in range(3000):
        (crowded / f"entry-{i:05d}").write_bytes(str(i).encode() * (i % 7))
    for d in range(20):
        sub = src / "spread" / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(100):
            (sub / f"f{i}").write_bytes(os.urandom(i * 37))
    os.utime(crowded, ns=(FIXED_MTIME * 10**9,) * 2)
    count = sum(len(f) + len(d) for _, d, f in os.walk(src))
    assert count >= 5000
    built = _build(tmp_path, src)
    for target in _mount_built(kernel, built, tmp_path):
        assert_same_tree(src, target)


def test_make_block_image_script(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello").write_text("hello\n")
    layout = tmp_path / "layout"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(src),
            str(layout),
            "--ref",
            "v1",
            "--codec",
            "zstd",
            "--chunk-size",
            "16384",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    image = read_oci_layout(layout, "v1")
    assert image.manifest.digest in run.stdout
    with FileSource(image.layers[0].path) as source:
        info = LayerReader(source, image.layers[0].annotations.index_digest).chunks.info()
    assert (info.codec, info.chunk_size) == ("zstd", 16384)
    assert sorted(os.listdir(layout)) == ["blobs", "index.json", "oci-layout"]

    bad = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing"), str(layout)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("make_block_image: error: ")
    assert "is not a directory" in bad.stderr
