"""Layers applied to one image file in place (`Ext4LayerBuilder`, `imagefile.Snapshot`,
`imagefile.write_diff_in_place`) against the way it replaces: each layer on a kernel copy of the whole
image, the diff taken between the two files. The blobs must be the same bytes, layer for layer, on
images that remove, replace and re-add files across layers (so later layers reuse the blocks earlier
ones freed), and when the lower layers come from the layer cache. Also: the regular files' extents as
read from the unmounted image against what the kernel says (``filefrag``), and the range arithmetic."""

from __future__ import annotations

import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from snapshotter.convert import ext4layer, ext4meta, imagefile
from snapshotter.convert.converter import ConvertOptions, ConvertResult, convert
from snapshotter.host.mkfs import mkfs_ext4
from tests.oci_images import (
    Image,
    Layer,
    busybox_image,
    content,
    directory,
    file,
    hardlink,
    lower_hardlink_image,
    opaque,
    semantics_image,
    symlink,
    whiteout,
    write_layout,
)

from .conftest import KernelResources

KiB = 1024


def _set(ranges: list[tuple[int, int]]) -> set[int]:
    return {x for s, e in ranges for x in range(s, e)}


def _ranges(rng: random.Random) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    for _ in range(rng.randrange(0, 8)):
        start = pos + rng.randrange(0, 6)
        end = start + rng.randrange(1, 6)
        out.append((start, end))
        pos = end + 1
    return out


def test_subtract_and_intersect_are_set_difference_and_intersection() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        a, b = _ranges(rng), _ranges(rng)
        assert _set(imagefile.subtract(a, b)) == _set(a) - _set(b)
        assert _set(imagefile.intersect(a, b)) == _set(a) & _set(b)
        for s, e in imagefile.subtract(a, b) + imagefile.intersect(a, b):
            assert s < e


def _filefrag(path: Path) -> list[tuple[int, int]]:
    """The file's physical extents in bytes, as the kernel reports them (FIEMAP through filefrag)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", str(path)], check=True, capture_output=True, text=True)
    got = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", line)
        if m:
            got.append((int(m.group(1)) * 4096, (int(m.group(2)) + 1) * 4096))
    return sorted(got)


def test_regular_files_extents_are_what_the_kernel_reports(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "img"
    mkfs_ext4(str(image), 1 << 30, metadata_csum=False)
    mnt = kernel.mount_point(tmp_path / "mnt")
    subprocess.run(["mount", "-o", "loop,nodelalloc", str(image), str(mnt)], check=True)
    try:
        rng = random.Random(3)
        (mnt / "small").write_bytes(b"x" * 100)
        (mnt / "empty").write_bytes(b"")
        (mnt / "d").mkdir()
        (mnt / "d" / "big").write_bytes(rng.randbytes(3 << 20))
        os.symlink("d/big", mnt / "link")
        # Two files written a block at a time, in turn, over holes: dozens of extents each, more
        # than the inode holds, so the tree has a level of index blocks.
        with open(mnt / "frag1", "wb") as f1, open(mnt / "frag2", "wb") as f2:
            for i in range(60):
                for f in (f1, f2):
                    f.seek(i * 64 * KiB)
                    f.write(rng.randbytes(4 * KiB))
                    f.flush()
                    os.fsync(f.fileno())
        os.sync()
        names = ["small", "empty", "d/big", "frag1", "frag2"]
        want = {os.stat(mnt / n).st_ino: _filefrag(mnt / n) for n in names}
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    got = ext4meta.regular_files(str(image)).by_inode
    assert {ino: sorted(r) for ino, r in got.items()} == {ino: r for ino, r in want.items() if r}
    assert max(len(r) for r in got.values()) >= 60  # the index level was read


def churn_image() -> Image:
    """Layers that remove what the ones before made and fill the freed room again."""
    base = Layer(
        (
            directory("data"),
            directory("data/keep"),
            *(file(f"data/a{i}", content(48 * KiB + i * 100, i)) for i in range(40)),
            *(file(f"data/keep/k{i}", content(5 * KiB, 100 + i)) for i in range(30)),
            file("data/big", content(2 << 20, 9)),
        )
    )
    second = Layer(
        (
            *(whiteout(f"data/a{i}") for i in range(0, 40, 2)),
            whiteout("data/big"),
            opaque("data/keep"),
            *(file(f"data/keep/n{i}", content(7 * KiB, 200 + i)) for i in range(20)),
            *(file(f"data/b{i}", content(30 * KiB, 300 + i)) for i in range(25)),
            hardlink("data/a1-again", "data/a1"),
        )
    )
    third = Layer(
        (
            *(whiteout(f"data/b{i}") for i in range(25)),
            file("data/a1", content(10 * KiB, 400)),  # replaces a file two of whose names remain
            *(file(f"data/c{i}", content(60 * KiB, 500 + i)) for i in range(40)),
            symlink("data/to-c0", "c0"),
            directory("data/keep", mode=0o700),
        )
    )
    fourth = Layer(
        (*(whiteout(f"data/c{i}") for i in range(0, 40, 3)), file("data/d", content(1 << 20, 600)))
    )
    return busybox_image(base, second, third, fourth)


def _convert(
    monkeypatch: pytest.MonkeyPatch, in_place: bool, layout: Path, out: Path, cache: Path
) -> ConvertResult:
    monkeypatch.setattr(ext4layer, "IN_PLACE", in_place)
    return convert(str(layout), str(out), ConvertOptions(cache_dir=str(cache)))


@pytest.mark.parametrize("which", ["semantics", "lower-hardlink", "churn"])
def test_in_place_gives_the_blobs_of_whole_copies(
    kernel: KernelResources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    image = {"semantics": semantics_image, "lower-hardlink": lower_hardlink_image, "churn": churn_image}[
        which
    ]()
    src = write_layout(image, tmp_path / "src")
    copies = _convert(monkeypatch, False, src.layout, tmp_path / "copies", tmp_path / "c1")
    in_place = _convert(monkeypatch, True, src.layout, tmp_path / "in-place", tmp_path / "c2")
    assert not any(x.reused for x in in_place.layers)
    assert [x.blob_digest for x in in_place.layers] == [x.blob_digest for x in copies.layers]
    assert in_place.manifest_digest == copies.manifest_digest


def test_in_place_from_lowers_out_of_the_layer_cache(
    kernel: KernelResources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second image shares the first's lower layers: they come from the cache, expanded into an
    image that is then looked at whole (its files and snapshot) before the new layers go on it."""
    first = write_layout(churn_image(), tmp_path / "first")
    layers = churn_image().layers
    extra = Layer((file("data/e", content(200 * KiB, 700)), whiteout("data/keep")))
    second = write_layout(Image((*layers[:3], extra, layers[3])), tmp_path / "second")
    results = {}
    for in_place in (False, True):
        cache = tmp_path / f"cache-{in_place}"
        _convert(monkeypatch, in_place, first.layout, tmp_path / f"first-{in_place}", cache)
        results[in_place] = _convert(
            monkeypatch, in_place, second.layout, tmp_path / f"second-{in_place}", cache
        )
        assert [x.reused for x in results[in_place].layers] == [True, True, True, False, False]
    assert [x.blob_digest for x in results[True].layers] == [x.blob_digest for x in results[False].layers]
