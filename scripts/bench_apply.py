#!/usr/bin/env python3
"""Benchmark of the layer applier alone (`applytar.apply_layer`) on a layer of many small files, against
an earlier revision.

    bench_apply.py [--runs 5] [--small-files 30000] [--payload-mb 400] [--pax] [--baseline REV] [--keep]
                   [--image-cache DIR] [--workdir DIR]

1. gets the busybox image with a layer of ``--small-files`` text files (``scripts/build_debian_image.py``,
   cached in ``bench/work/images/``) and inflates that layer once into ``<workdir>/layer-<digest>.tar``; with
   ``--pax`` also a copy whose every entry has PAX ``mtime``/``atime`` records with nanoseconds (the
   PAX path's worst case: real layers carry PAX headers for long names, big values and fine times);
2. per run and tar, for this checkout and ``--baseline REV`` (a git worktree, as in ``bench_convert``)
   one after the other: a child process makes a fresh ext4 image, mounts it over a loop device with the
   converter's options and applies the tar the way the converter does (read ahead in a thread, dirty
   pages flushed in another, the applier pinned to one CPU) — only ``apply_layer`` is timed; then it
   unmounts, canonicalises the image and hashes its data;
3. prints medians (seconds, entries/s) and whether every run of every revision made the same image —
   they must: where ext4 puts blocks follows the order of the applier's calls (and maybe the sizes of
   its writes).

Needs root (mount, chown). The tar is read from the page cache (it was just written or read), so the
figures are the applier's and the kernel's, not the disk's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

from bench_convert import REPO, BenchError, baseline_tree
from build_debian_image import DEFAULT_CACHE, ImageBuildError, ImageSpec, build_image

# (In the child these come from the revision being measured: its tree is first on PYTHONPATH.)
from snapshotter.convert import ext4meta
from snapshotter.convert.applytar import apply_layer
from snapshotter.convert.ext4layer import (
    MOUNT_OPTIONS,
    FsIdentity,
    _Flusher,
    _load_every_group,
    _remove_lost_found,
    release_mounts,
    run_like_every_time,
)
from snapshotter.convert.layerstream import ReadAhead
from snapshotter.host.mkfs import mkfs_ext4
from snapshotter.host.mounts import mount_loop, umount_loop

DEFAULT_WORK = REPO / "bench" / "work" / "apply"
#: The image the child applies onto: room for 400 MB of small files and their inodes.
VSIZE = 2 << 30


def child(tar: str, work: str) -> dict[str, object]:
    """One timed apply of `tar` onto a fresh filesystem in `work` (run with the revision's code)."""
    image, mnt = os.path.join(work, "fs.img"), os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    ident = FsIdentity.derive("bench_apply")
    mkfs_ext4(
        image, VSIZE, uuid=ident.uuid, hash_seed=ident.hash_seed, fake_time=ext4meta.FAKE_TIME,
        prezeroed=True, metadata_csum=False,
    )  # fmt: skip
    before = ext4meta.used_inodes(image)
    try:
        loop = mount_loop(image, mnt, "ext4", MOUNT_OPTIONS)
        try:
            _load_every_group(loop)
            held = _remove_lost_found(mnt)
            with open(tar, "rb", buffering=0) as f, ReadAhead(f) as ahead, _Flusher(mnt):

                def timed() -> tuple[float, int]:
                    t0 = time.perf_counter()
                    stats = apply_layer(ahead, mnt, layer=os.path.basename(tar), hold_removed=True)
                    return time.perf_counter() - t0, stats.entries

                seconds, entries = run_like_every_time(timed)
            if held is not None:
                os.close(held)
        finally:
            umount_loop(mnt)
        ext4meta.canonicalize(image, before)
        digest = _data_digest(image)
    finally:
        release_mounts(work)  # (an apply that failed midway)
        if os.path.exists(image):
            os.unlink(image)
    return {"seconds": seconds, "entries": entries, "image": digest}


def _data_digest(path: str) -> str:
    """sha256 over the data extents of a sparse file (each with its offset): the holes are not read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(start.to_bytes(8, "little"))
            f.seek(start)
            left = stop - start
            while left > 0:
                data = f.read(min(left, 1 << 22))
                h.update(data)
                left -= len(data)
            pos = stop
    return h.hexdigest()[:16]


def layer_tar(args: argparse.Namespace, work: Path) -> Path:
    """The small-files layer of the benchmark image, inflated into `work` (kept between invocations)."""
    spec = ImageSpec(variant="busybox", payload_mb=args.payload_mb, small_files=args.small_files)
    image = build_image(spec, args.image_cache)
    layer = max(image.layers, key=lambda x: x.uncompressed_size)
    out = work / f"layer-{layer.digest.split(':')[-1][:12]}.tar"
    if not out.exists():
        blob = Path(image.layout_dir) / "blobs" / layer.digest.replace(":", "/")
        inflate = zlib.decompressobj(wbits=31)
        with open(blob, "rb") as src, open(f"{out}.part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(inflate.decompress(chunk))
            dst.write(inflate.flush())
        os.replace(f"{out}.part", out)
    return out


def pax_copy(tar: Path) -> Path:
    """`tar` with PAX ``mtime`` and ``atime`` records (nanoseconds) on every entry."""
    out = tar.with_name(tar.stem + "-pax.tar")
    if not out.exists():
        with tarfile.open(tar) as src, tarfile.open(f"{out}.part", "w", format=tarfile.PAX_FORMAT) as dst:
            for i, m in enumerate(src):
                m.pax_headers = {
                    "mtime": f"{int(m.mtime)}.{i * 7919 % 10**9:09d}",
                    "atime": f"{int(m.mtime)}.5",
                }
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        os.replace(f"{out}.part", out)
    return out


def run_child(tar: Path, work: Path, tree: Path) -> dict[str, object]:
    job = work / "run"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(tar), str(job)]
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the tree's packages before the editable install
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=str(tree))
    shutil.rmtree(job, ignore_errors=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise BenchError(f"apply of {tar.name} with {tree} failed:\n{tail}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="applies per tar and revision (default: 5)")
    parser.add_argument("--small-files", type=int, default=30000, help="files in the layer (default: 30000)")
    parser.add_argument("--payload-mb", type=int, default=400, help="the layer's MB of tar (default: 400)")
    parser.add_argument("--pax", action="store_true", help="also time the layer with PAX records")
    parser.add_argument("--baseline", default=None, metavar="REV", help="also apply with this revision")
    parser.add_argument("--keep", action="store_true", help="keep the --baseline checkout")
    parser.add_argument("--image-cache", default=str(DEFAULT_CACHE), help=f"default: {DEFAULT_CACHE}")
    parser.add_argument("--workdir", default=str(DEFAULT_WORK), help=f"default: {DEFAULT_WORK}")
    parser.add_argument("--child", nargs=2, metavar=("TAR", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if os.geteuid() != 0:
        print("bench_apply: applying a layer needs root (mount, chown); run as root", file=sys.stderr)
        return 1
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        tars = [layer_tar(args, work)]
        if args.pax:
            tars.append(pax_copy(tars[0]))
        before = baseline_tree(args.baseline, work) if args.baseline else None
    except (BenchError, ImageBuildError) as e:
        print(f"bench_apply: {e}", file=sys.stderr)
        return 1
    trees = [("now", REPO)] + ([("baseline", before)] if before is not None else [])
    results: dict[tuple[str, str], list[dict[str, object]]] = {}
    try:
        for i in range(args.runs):
            for tar in tars:
                for label, tree in trees:  # one after the other: the machine's state is shared
                    r = run_child(tar, work, tree)
                    results.setdefault((tar.name, label), []).append(r)
                    print(f"bench_apply: run {i + 1}/{args.runs} {tar.name} {label}: {r['seconds']:.3f} s, "
                          f"image {r['image']}", file=sys.stderr)  # fmt: skip
    except BenchError as e:
        print(f"bench_apply: {e}", file=sys.stderr)
        return 1
    finally:
        if before is not None and not args.keep:  # the checkout goes; the worktree entry with it
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False
            )
    print(f"| tar | revision | median s | min s | max s | entries/s | runs | image |\n|{'---|' * 8}")
    same = True
    for tar in tars:
        images = {str(r["image"]) for label, _ in trees for r in results[(tar.name, label)]}
        same &= len(images) == 1
        for label, _ in trees:
            rs = results[(tar.name, label)]
            secs = [float(str(r["seconds"])) for r in rs]
            med = statistics.median(secs)
            rate = int(str(rs[0]["entries"])) / med
            print(f"| {tar.name} | {label} | {med:.3f} | {min(secs):.3f} | {max(secs):.3f} | {rate:,.0f} | "
                  f"{len(rs)} | {', '.join(sorted({str(r['image']) for r in rs}))} |")  # fmt: skip
    print(f"\nevery run made the same image: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
