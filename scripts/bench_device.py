#!/usr/bin/env python3
"""Benchmark of the block device: FUSE + loop + ext4 (damselfly) against the same ext4 on a plain loop.

DESIGN.md §8 item 3, issue 4 ("Done when": ``scripts/bench_device.py``). With a full cache — nothing
touches a network — it measures reading the image's root filesystem

- through damselfly (column ``damselfly``): ``damselfly device-daemon`` (its own daemon, own state
  directory under ``bench/work/device/``) serves the device file on its FUSE mount; a loop device
  (read-only, buffered, as ``damselfly mount`` makes it) is attached to that file and ext4 is mounted
  ``ro,noload``. The layer comes through the daemon's node blob cache, complete: before the daemon starts,
  the script fills its cache from the layer blob with ``CachedBlob.ensure`` and ``verify_complete`` (what
  the background download does after a lazy pull), and the device is attached as a registry layer of an
  unreachable registry (``127.0.0.1:9``), so a read that needed the network would fail, not fetch;
- through damselfly reading the OCI layout's blob file directly (column ``damselfly, layout file``;
  ``damselfly mount LAYOUT_DIR``): the same, but every chunk's SHA-256 is checked on every decode, since
  the file is not the cache's (a sealed cache blob was verified once, ``CachedBlob.sealed``);
- on a plain loop device: the same device, written by ``write_device_file`` from the same layer stack to
  a sparse file on the work directory's filesystem, loop-attached and mounted the same way,

side by side: every run of every workload measures both, alternating which goes first, medians of
``--reps`` runs (3). Workloads:

1. sequential, big files: ``fio --rw=read --bs=1M`` (buffered, so the kernel's readahead works as for a
   real program) over the image's big files (>= 300 MB in total), 1 reader and 4 readers on disjoint files;
2. tree read: walk the whole tree and read every regular file (1 MiB reads, buffered; 1 and 4 threads);
3. random 4 KiB reads: ``fio --rw=randread --bs=4k --direct=1`` (O_DIRECT, so the ext4 page cache never
   answers) over the big files, every block at most once (fio's random map), up to ``--runtime``
   seconds, 1 reader and 4 readers on disjoint files;
4. sparse random 4 KiB reads: O_DIRECT reads of the block at every 64 KiB of the big files, shuffled, each
   once (a fio replay log; 1 reader): nearly every read needs a chunk no earlier read decoded — the cost
   of a lone random read (no aim).

What is cold and what is warm: before every single measurement the script syncs and writes 3 to
``/proc/sys/vm/drop_caches`` — the ext4 page cache, the loop devices' buffers, the FUSE device file's page
cache and every backing file's page cache are dropped — and then reads the *backing store* of the
configuration into the page cache again: the layer blob for damselfly, the data extents of the plain
image file for the plain loop (``--backing cold`` skips that: both then read from disk; the cache's data
file is damselfly's backing store when the layer comes through the cache). So the layers above the backing
store are cold and the backing store is warm: what is measured is the cost of the stack (FUSE round
trips, chunk verification and decompression in the daemon), not the disk. The daemon keeps running
between runs (its small decoded-chunk LRU is not reset; it holds 8 x 64 KiB per layer).

The image is built once and cached in ``bench/work/device/``: a tree of real files from /usr (whole
directories, >= 400 MB) plus big real files from /usr (16-48 MiB each, >= 320 MB) copied into a staging
directory, ``build_layer_from_dir`` (mkfs.ext4 -d, lz4, the default chunk size), ``write_oci_layout``.

``--variant NAME:key=value,...`` adds a damselfly configuration as another column (each variant gets its
own daemon); keys: ``threads`` (FUSE request threads), ``io_threads`` (read pool), ``readahead_kb`` (the
device files' readahead), ``store=0`` (no FUSE_NOTIFY_STORE of decoded neighbours), ``cache_chunks``
(decoded-chunk LRU per layer), ``inline_read=1`` (serve reads on the request thread, no pool hand-off) —
set by patching the classes inside a daemon process this script starts, never in the source —
``layout=1`` (read the layout's blob file, not the cache), and ``loop_dio=1`` (loop device with direct
I/O), ``loop_ra_kb`` (read_ahead_kb of the loop device). ``--profile`` afterwards runs random and
sequential reads once more
against a daemon with an in-process stack sampler (and ``perf record`` when perf is installed) and
reports where its threads spend their time.

Needs root, /dev/fuse, loop devices, and ``fio`` (Debian package ``fio``). Run
``.venv/bin/python scripts/bench_device.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import dis
import functools
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/bench_device.py` from anywhere
    sys.path.insert(0, str(REPO))

from demolib.report import git, loadavg, machine, publish  # noqa: E402

from blockformat import layer as layer_mod  # noqa: E402
from blockformat.chunkfile import DEFAULT_CHUNK_SIZE  # noqa: E402
from blockformat.extents import HOLE, ZERO  # noqa: E402
from blockformat.layer import LayerReader  # noqa: E402
from blockformat.source import FileSource  # noqa: E402
from blockformat.stack import Stack  # noqa: E402
from p2p.cache import BlobCache  # noqa: E402
from snapshotter.config import DeviceSection  # noqa: E402
from snapshotter.device import (  # noqa: E402
    control,
    fuseabi,
    pagestore,
)
from snapshotter.device import daemon as daemon_mod  # noqa: E402
from snapshotter.device import fuse as fuse_mod  # noqa: E402
from snapshotter.device import manager as manager_mod  # noqa: E402
from snapshotter.device.paths import Paths  # noqa: E402
from snapshotter.errors import ControlError, MountError  # noqa: E402
from snapshotter.host.loop import loop_info  # noqa: E402
from snapshotter.host.mountinfo import find_mount  # noqa: E402
from snapshotter.host.mounts import mount_loop, umount_loop  # noqa: E402
from snapshotter.host.syscalls import MNT_DETACH, unmount_path  # noqa: E402
from snapshotter.image.blockimage import build_layer_from_dir, write_device_file, write_oci_layout  # noqa: E402
from snapshotter.image.spec import device_spec_for  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
MB = 1_000_000  # throughput in decimal MB/s
WORK = REPO / "bench" / "work" / "device"
OUTPUT = REPO / "bench" / "results" / "device.md"
#: Bump when the image recipe changes, so a cached image is rebuilt.
RECIPE = 1
CODEC = "lz4"
CHUNK_SIZE = DEFAULT_CHUNK_SIZE
FAKE_TIME = 1_700_000_000
IMAGE_UUID = "d4a5e1f1-0000-4000-8000-0000000000de"
#: The small-file part of the tree: whole directories, in this order, until TREE_TARGET bytes.
TREE_DIRS = (
    "/usr/lib/python3.11",
    "/usr/lib/python3",
    "/usr/share/doc",
    "/usr/share/locale",
    "/usr/share/man",
    "/usr/share/i18n",
    "/usr/share/perl",
    "/usr/share/icons",
    "/usr/share/vim",
    "/usr/lib/git-core",
    "/usr/share/zoneinfo",
)
TREE_FALLBACK_ROOTS = ("/usr/share", "/usr/lib")
TREE_TARGET = 400 * MB
TREE_DIR_MAX = 200 * MB
#: Big files: regular files under /usr of BIG_MIN..BIG_MAX bytes, largest first, until BIG_TARGET.
BIG_MIN = 16 * MIB
BIG_MAX = 48 * MIB
BIG_TARGET = 320 * MB
MIN_BIG_TOTAL = 300 * MB
READ_BUF = 1 * MIB
AIM = {"seq": 0.50, "tree": 0.50, "rand": 0.30}
PLAIN = "plain loop"
STOCK = "damselfly"
LAYOUT = "damselfly, layout file"
#: The registry the cache-backed device names: nothing listens there, so a read that missed the cache fails.
NO_REGISTRY = "127.0.0.1:9"
SYSCTL_DROP = "/proc/sys/vm/drop_caches"
DAEMON_KEYS = {"threads", "io_threads", "readahead_kb", "store", "cache_chunks", "inline_read"}
MOUNT_KEYS = {"loop_dio", "loop_ra_kb", "layout"}


def log(msg: str) -> None:
    print(f"[bench_device {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# -- the image ---------------------------------------------------------------------------------------


@dataclass
class Image:
    """The cached benchmark image: an OCI layout, its layer blob, and the plain device file."""

    layout: Path
    blob: Path
    plain: Path
    facts: dict[str, Any]

    @property
    def big_files(self) -> list[tuple[str, int]]:
        return [(b["path"], int(b["size"])) for b in self.facts["big"]]


def _tree_bytes(path: str) -> tuple[int, int]:
    """(bytes of regular files, number of regular files) under `path`, symlinks not followed."""
    total = files = 0
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o100000:
                total += st.st_size
                files += 1
    return total, files


def select_tree() -> list[tuple[str, int, int]]:
    """Directories for the small-file part: (path, bytes, files)."""
    chosen: list[tuple[str, int, int]] = []
    total = 0
    candidates = [d for d in TREE_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    for root in TREE_FALLBACK_ROOTS:
        with contextlib.suppress(OSError):
            for name in sorted(os.listdir(root)):
                p = os.path.join(root, name)
                if p not in candidates and os.path.isdir(p) and not os.path.islink(p):
                    candidates.append(p)
    for d in candidates:
        if total >= TREE_TARGET:
            break
        if any(d.startswith(c[0] + "/") or c[0].startswith(d + "/") for c in chosen):
            continue
        size, files = _tree_bytes(d)
        if size == 0 or size > TREE_DIR_MAX:
            continue
        chosen.append((d, size, files))
        total += size
    if total < TREE_TARGET:
        raise SystemExit(
            f"only {total / MB:.0f} MB of directories under /usr for the tree; need {TREE_TARGET / MB:.0f}"
        )
    return chosen


def select_big() -> list[tuple[str, int]]:
    """Big real files under /usr: (path, size), largest first, until BIG_TARGET bytes."""
    found: list[tuple[int, str]] = []
    usr_dev = os.stat("/usr").st_dev
    for root, dirs, names in os.walk("/usr"):
        dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
        try:
            if os.stat(root).st_dev != usr_dev:
                dirs[:] = []
                continue
        except OSError:
            continue
        for name in names:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if (st.st_mode & 0o170000) == 0o100000 and BIG_MIN <= st.st_size <= BIG_MAX:
                found.append((st.st_size, p))
    found.sort(key=lambda x: (-x[0], x[1]))
    out: list[tuple[str, int]] = []
    total = 0
    for size, p in found:
        if total >= BIG_TARGET:
            break
        out.append((p, size))
        total += size
    if total < MIN_BIG_TOTAL:
        raise SystemExit(
            f"only {total / MB:.0f} MB of files of {BIG_MIN // MIB}-{BIG_MAX // MIB} MiB under /usr; "
            f"need {MIN_BIG_TOTAL / MB:.0f} MB for the big-file workloads"
        )
    return out


def _safe_name(i: int, path: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", os.path.basename(path))
    return f"{i:02d}-{base}"


def prepare_image(work: Path, rebuild: bool) -> Image:
    """Build (once) the staging tree, the layer, the OCI layout and the plain device file."""
    layout, blob, plain, facts_path = (
        work / "layout",
        work / "layer.blob",
        work / "plain.img",
        work / "image.json",
    )
    if (
        not rebuild
        and facts_path.exists()
        and blob.exists()
        and plain.exists()
        and (layout / "index.json").exists()
    ):
        facts = json.loads(facts_path.read_text())
        if facts.get("recipe") == RECIPE and os.path.getsize(blob) == facts["blob"]["blob_size"]:
            log(f"using the cached image in {work} (built {facts['built']}; --rebuild to redo)")
            return Image(layout, blob, plain, facts)
    log("building the benchmark image (once; cached in bench/work/device/)")
    t0 = time.perf_counter()
    for p in (layout, blob, plain, facts_path):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    stage = work / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    (stage / "tree").mkdir(parents=True)
    (stage / "big").mkdir()
    tree = select_tree()
    big = select_big()
    try:
        for d, _size, _files in tree:
            subprocess.run(["cp", "-a", "--parents", d.lstrip("/"), str(stage / "tree")], check=True, cwd="/")
        big_facts = []
        for i, (src, size) in enumerate(big):
            rel = f"big/{_safe_name(i, src)}"
            shutil.copyfile(src, stage / rel)
            big_facts.append({"path": rel, "size": size, "source": src})
        os.chmod(stage, 0o755)
        t1 = time.perf_counter()
        info, ann = build_layer_from_dir(
            stage,
            blob,
            workdir=work,
            codec=CODEC,
            chunk_size=CHUNK_SIZE,
            uuid=IMAGE_UUID,
            hash_seed=IMAGE_UUID,
            fake_time=FAKE_TIME,
        )
        build_s = time.perf_counter() - t1
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_oci_layout(layout, [(blob, info, ann)], ref_name="bench")
    blob_source = FileSource(blob)
    try:
        written = write_device_file(Stack([LayerReader(blob_source, info.index_digest)]), plain)
    finally:
        blob_source.close()
    facts = {
        "recipe": RECIPE,
        "built": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tree_dirs": [{"path": d, "bytes": s, "files": n} for d, s, n in tree],
        "tree_bytes": sum(s for _, s, _ in tree),
        "tree_files": sum(n for _, _, n in tree),
        "big": big_facts,
        "big_bytes": sum(s for _, s in big),
        "blob": dataclasses.asdict(info),
        "annotations": ann.to_dict(),
        "vsize": ann.vsize,
        "plain_data_bytes": written,
        "layer_build_seconds": round(build_s, 1),
        "total_build_seconds": round(time.perf_counter() - t0, 1),
    }
    facts_path.write_text(json.dumps(facts, indent=1))
    # The layout holds a hard link to the blob; the copy under `work` is kept for the facts' sake.
    log(f"built the image in {facts['total_build_seconds']:.0f} s")
    return Image(layout, blob, plain, facts)


# -- processes, daemons, mounts ----------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    tunes: dict[str, int] = field(default_factory=dict)

    @property
    def daemon_tunes(self) -> dict[str, int]:
        return {k: v for k, v in self.tunes.items() if k in DAEMON_KEYS}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.tunes.items()) or "stock settings"


def parse_variant(text: str) -> Variant:
    name, sep, rest = text.partition(":")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:key=value,...")
    tunes: dict[str, int] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k not in DAEMON_KEYS | MOUNT_KEYS:
            raise argparse.ArgumentTypeError(f"{item!r}: keys are {sorted(DAEMON_KEYS | MOUNT_KEYS)}")
        tunes[k] = int(v)
    return Variant(name, tunes)


class Daemon:
    """A device daemon this script started, with its own state directory; stopped by its pid."""

    def __init__(self, state: Path, variant: Variant, sample_out: Path | None = None) -> None:
        self.state = state
        self.paths = Paths(str(state))
        self.variant = variant
        self.sample_out = sample_out
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state.parent / f"{state.name}.log"

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(ControlError):
            # A daemon left on this exact state directory by an interrupted run: ours, stop it.
            stale = control.call(self.paths.socket, {"op": "ping"}, timeout=2)
            log(f"stopping a stale daemon (pid {stale.get('pid')}) on {self.state}")
            control.call(self.paths.socket, {"op": "shutdown"}, timeout=10)
            time.sleep(1.0)
        if self.variant.daemon_tunes or self.sample_out is not None:
            argv = [sys.executable, str(Path(__file__).resolve()), "_daemon", "--state-dir", str(self.state)]
            argv += ["--tunes", json.dumps(self.variant.daemon_tunes)]
            if self.sample_out is not None:
                argv += ["--sample-out", str(self.sample_out)]
        else:
            argv = [sys.executable, "-m", "snapshotter.cli", "device-daemon", "--state-dir", str(self.state)]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the device daemon exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(ControlError):
                if control.call(self.paths.socket, {"op": "ping"}, timeout=2).get("pid") == self.proc.pid:
                    return
            if time.monotonic() > deadline:
                raise SystemExit(f"the device daemon did not answer within 30 s; see {self.log_path}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def attach(self, spec: manager_mod.DeviceSpec) -> str:
        return str(control.call(self.paths.socket, {"op": "attach", "spec": spec.to_json()})["path"])

    def detach(self, path: str) -> None:
        control.call(self.paths.socket, {"op": "detach", "name": os.path.basename(path)}, timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ControlError):
                control.call(self.paths.socket, {"op": "shutdown"}, timeout=10)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                log(f"daemon {self.proc.pid} did not stop; SIGTERM")
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        # A daemon that died leaves its FUSE mount behind; unmount exactly that path.
        if find_mount(self.paths.mountpoint) is not None:
            unmount_path(self.paths.mountpoint, MNT_DETACH)
        self.proc = None


def _sysfs_write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _sysfs_read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def _umount(mountpoint: Path) -> None:
    """Unmount our ext4 and detach its loop device; lazily if something still holds it (a hung reader)."""
    try:
        umount_loop(mountpoint)
    except MountError as e:
        log(f"{e}; unmounting lazily")
        umount_loop(mountpoint, lazy=True)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def fuse_bdi(mountpoint: str) -> str:
    st = os.stat(mountpoint)
    return f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


@dataclass
class Config:
    """One column: a mounted ext4, how to warm its backing store, and (for damselfly) its daemon."""

    name: str
    mountpoint: Path
    loop: str
    backing: list[Path]  # what to warm after dropping caches
    daemon: Daemon | None = None
    device_file: str = ""
    settings: dict[str, str] = field(default_factory=dict)


def setup_config(
    stack: contextlib.ExitStack,
    image: Image,
    variant: Variant | None,
    work: Path,
    sample_out: Path | None = None,
) -> Config:
    """Mount one configuration; every step registers its undo on `stack` first thing after it succeeds."""
    if variant is None:
        mp = work / "mnt-plain"
        mp.mkdir(exist_ok=True)
        stack.callback(_rmdir_quietly, mp)
        dev = mount_loop(image.plain, mp, "ext4", ("ro", "noload"))
        stack.callback(_umount, mp)
        cfg = Config(PLAIN, mp, dev, [image.plain])
    else:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", variant.name).strip("-") or "v"
        daemon = Daemon(work / f"state-{slug}", variant, sample_out)
        spec = device_spec_for(str(image.layout))
        blob_paths = [Path(x.source.path) for x in spec.layers if x.source.path]
        if not variant.tunes.get("layout"):
            spec, blob_paths = fill_cache(daemon.state / "cache", spec)
        stack.callback(daemon.stop)
        daemon.start()
        path = daemon.attach(spec)
        stack.callback(daemon.detach, path)
        mp = work / f"mnt-{slug}"
        mp.mkdir(exist_ok=True)
        stack.callback(_rmdir_quietly, mp)
        dio = bool(variant.tunes.get("loop_dio"))
        dev = mount_loop(path, mp, "ext4", ("ro", "noload"), direct_io=dio)
        stack.callback(_umount, mp)
        cfg = Config(variant.name, mp, dev, blob_paths, daemon, path)
        bdi = fuse_bdi(daemon.paths.mountpoint)
        cfg.settings["FUSE bdi read_ahead_kb"] = _sysfs_read(f"{bdi}/read_ahead_kb")
        cfg.settings["layer from"] = "layout file" if variant.tunes.get("layout") else "node cache (complete)"
        info = loop_info(dev)
        cfg.settings["loop direct I/O"] = "on" if info is not None and info.direct_io else "off"
    qdir = f"/sys/block/{os.path.basename(cfg.loop)}/queue"
    if variant is not None and "loop_ra_kb" in variant.tunes:
        _sysfs_write(f"{qdir}/read_ahead_kb", str(variant.tunes["loop_ra_kb"]))
    cfg.settings["loop read_ahead_kb"] = _sysfs_read(f"{qdir}/read_ahead_kb")
    cfg.settings.setdefault("loop direct I/O", "off")
    return cfg


def fill_cache(root: Path, spec: manager_mod.DeviceSpec) -> tuple[manager_mod.DeviceSpec, list[Path]]:
    """Put every layer of `spec` into the node blob cache at `root`, complete, as the background download
    leaves it (every unit fetched and verified, then the whole blob checked against its digest); return
    the spec with registry sources (an unreachable registry) and the cache's data files."""
    cache = BlobCache(str(root))
    layers, data = [], []
    for layer in spec.layers:
        assert layer.source.path is not None
        src = FileSource(layer.source.path)
        blob = cache.open(layer.digest, layer.size, src, layer.index_digest)
        try:
            if not blob.complete:
                log(f"filling the node cache with {layer.digest[:19]} ({layer.size / MB:.0f} MB)")
                blob.ensure(0, layer.size)
                if not blob.verify_complete():
                    raise SystemExit(f"{layer.source.path}: does not match its digest {layer.digest}")
            data.append(Path(blob.dir) / "data")
        finally:
            cache.release(blob)
            src.close()
        source = manager_mod.SourceSpec(registry=NO_REGISTRY, repository="bench/device", plain_http=True)
        layers.append(dataclasses.replace(layer, source=source))
    return dataclasses.replace(spec, layers=layers), data


# -- caches ------------------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    _sysfs_write(SYSCTL_DROP, "3")


def warm(paths: Sequence[Path]) -> int:
    """Read the data extents of `paths` into the page cache; return the bytes read."""
    total = 0
    buf = bytearray(8 * MIB)
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                off = start
                while off < end:
                    n = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - off)]], off)
                    if n <= 0:
                        break
                    off += n
                    total += n
                pos = end
        finally:
            os.close(fd)
    return total


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


# -- workloads ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str  # "seq", "tree", "rand", "sparse" (random reads, one per 64 KiB)
    readers: int
    label: str
    unit: str  # "MB/s" or "IOPS"


WORKLOADS = (
    Workload("seq", 1, "sequential, big files (fio read, 1 MiB, buffered)", "MB/s"),
    Workload("seq", 4, "sequential, big files (fio read, 1 MiB, buffered)", "MB/s"),
    Workload("tree", 1, "tree read: walk + read every file (1 MiB reads)", "MB/s"),
    Workload("tree", 4, "tree read: walk + read every file (1 MiB reads)", "MB/s"),
    Workload("rand", 1, "random 4 KiB (fio randread, O_DIRECT, psync)", "IOPS"),
    Workload("rand", 4, "random 4 KiB (fio randread, O_DIRECT, psync)", "IOPS"),
    # No aim: one block per 64 KiB, so (nearly) every read decodes a chunk of its own and no neighbour
    # profits from FUSE_NOTIFY_STORE. What a random read costs when it finds nothing.
    Workload("sparse", 1, "random 4 KiB, one per 64 KiB (fio iolog replay, O_DIRECT, psync)", "IOPS"),
)


@dataclass
class Result:
    value: float  # MB/s or IOPS
    seconds: float
    nbytes: int
    extra: dict[str, float] = field(default_factory=dict)


def split_groups(files: Sequence[tuple[str, int]], n: int) -> list[list[str]]:
    """Disjoint groups of files of about equal total size (largest first, to the lightest group)."""
    groups: list[list[str]] = [[] for _ in range(n)]
    loads = [0] * n
    for path, size in sorted(files, key=lambda x: (-x[1], x[0])):
        i = loads.index(min(loads))
        groups[i].append(path)
        loads[i] += size
    return [g for g in groups if g]


def sparse_iolog(cfg: Config, image: Image, path: Path) -> None:
    """A fio replay log (iolog v2) of 4 KiB reads, one at each 64 KiB of the big files, shuffled (seed 1).

    fio's own ``blockalign=64k`` turns its random map off, so blocks would repeat; a log reads each once."""
    files = [str(cfg.mountpoint / rel) for rel, _ in image.big_files]
    ops = [
        (f, off)
        for f, (_, size) in zip(files, image.big_files, strict=True)
        for off in range(0, size - 4095, 64 * KIB)
    ]
    random.Random(1).shuffle(ops)
    lines = ["fio version 2 iolog"]
    lines += [f"{f} add" for f in files] + [f"{f} open" for f in files]
    lines += [f"{f} read {off} 4096" for f, off in ops]
    lines += [f"{f} close" for f in files]
    path.write_text("\n".join(lines) + "\n")


def run_fio(cfg: Config, image: Image, w: Workload, runtime: float, work: Path) -> Result:
    seq = w.key == "seq"
    lines = ["[global]", "ioengine=psync", "iodepth=1", "group_reporting"]
    if w.key == "sparse":
        log_path = work / "fio-sparse.iolog"
        sparse_iolog(cfg, image, log_path)
        lines += [
            "direct=1",
            f"runtime={int(runtime)}",
            "",
            "[r0]",
            f"read_iolog={log_path}",
            "replay_no_stall=1",
        ]
    else:
        lines += [
            f"rw={'read' if seq else 'randread'}",
            f"bs={'1M' if seq else '4k'}",
            f"direct={0 if seq else 1}",
            f"file_service_type={'sequential' if seq else 'roundrobin'}",
            "randrepeat=1",
            f"runtime={int(runtime if not seq else 600)}",
        ]
        for i, g in enumerate(split_groups(image.big_files, w.readers)):
            names = ":".join(str(cfg.mountpoint / p).replace(":", "\\:") for p in g)
            lines += ["", f"[r{i}]", f"filename={names}"]
    jobfile = work / f"fio-{w.key}-{w.readers}.job"
    jobfile.write_text("\n".join(lines) + "\n")
    out = work / "fio-out.json"
    proc = subprocess.run(
        ["fio", "--readonly", "--output-format=json", f"--output={out}", str(jobfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"fio failed ({proc.returncode}) on {cfg.name}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    doc = json.loads(out.read_text())
    job = doc["jobs"][0]
    rd = job["read"]
    if job.get("error"):
        raise SystemExit(f"fio reported error {job['error']} on {cfg.name}")
    seconds = rd["runtime"] / 1000.0
    nbytes = int(rd["io_bytes"])
    extra: dict[str, float] = {}
    pct = rd.get("clat_ns", {}).get("percentile", {})
    if pct:
        extra["p50_us"] = pct.get("50.000000", 0) / 1000
        extra["p99_us"] = pct.get("99.000000", 0) / 1000
    extra["ios"] = float(rd["total_ios"])
    value = float(rd["iops"]) if w.unit == "IOPS" else nbytes / seconds / MB
    return Result(value, seconds, nbytes, extra)


def read_tree(cfg: Config, w: Workload) -> Result:
    """Walk the mounted tree and read every regular file, with `w.readers` threads; MB/s of file bytes."""
    t0 = time.perf_counter()
    files: list[str] = []
    todo = [str(cfg.mountpoint)]
    while todo:
        d = todo.pop()
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=False):
                    if e.name != "lost+found":
                        todo.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files.append(e.path)
    walked = time.perf_counter() - t0
    totals = [0] * w.readers
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        buf = bytearray(READ_BUF)
        n = 0
        try:
            for p in files[i :: w.readers]:
                with open(p, "rb", buffering=0) as f:
                    while got := f.readinto(buf):
                        n += got
        except BaseException as e:
            errors.append(e)
        totals[i] = n

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(w.readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - t0
    nbytes = sum(totals)
    return Result(nbytes / seconds / MB, seconds, nbytes, {"files": len(files), "walk_s": walked})


def measure(
    cfg: Config,
    image: Image,
    w: Workload,
    args: argparse.Namespace,
    work: Path,
    around: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> Result:
    """Drop caches, warm the backing store (unless --backing cold), run `w` (inside `around`)."""
    drop_caches()
    if args.backing == "warm":
        warm(cfg.backing)
    load1 = float(loadavg().split()[0]) if loadavg() != "?" else float("nan")
    cpu0 = cfg.daemon.cpu_seconds() if cfg.daemon else 0.0
    busy0, tot0 = cpu_busy()
    with around():
        r = read_tree(cfg, w) if w.key == "tree" else run_fio(cfg, image, w, args.runtime, work)
    busy1, tot1 = cpu_busy()
    r.extra["cpu_busy"] = (busy1 - busy0) / max(1, tot1 - tot0)
    r.extra["load1"] = load1
    if cfg.daemon is not None:
        r.extra["daemon_cpu_s"] = cfg.daemon.cpu_seconds() - cpu0
    return r


def check_same(configs: Sequence[Config], image: Image) -> None:
    """The mounts must hold the same bytes: compare two big files across every configuration."""
    for rel, _ in image.big_files[:2]:
        digests = set()
        for cfg in configs:
            h = hashlib.sha256()
            with open(cfg.mountpoint / rel, "rb") as f:
                while piece := f.read(4 * MIB):
                    h.update(piece)
            digests.add(h.hexdigest())
        if len(digests) != 1:
            raise SystemExit(f"{rel} differs between the mounts: {digests}")


# -- profiling ---------------------------------------------------------------------------------------


def _readv_lines() -> frozenset[int]:
    """Lines of the request loop that block in readv(/dev/fuse), from the code as loaded (the source
    file may have changed since the daemon started)."""
    return frozenset(
        i.positions.lineno
        for i in dis.get_instructions(fuse_mod.BlockFS._loop)
        if i.argval == "readv" and i.positions is not None and i.positions.lineno is not None
    )


def _classify(group: str, stack: list[tuple[str, str, int]], readv_lines: frozenset[int]) -> str:
    """'idle', 'wait-pool' (a request thread waiting for the read pool) or 'busy'."""
    fname, func, line = stack[0]
    if group == "fuse-req" and func == "_loop" and line in readv_lines:
        return "idle"
    if group == "fuse-io" and func == "_worker" and fname.endswith("thread.py"):
        return "idle"
    if (
        group == "fuse-req"
        and any(f == "_read" and n.endswith("fuse.py") for n, f, _ in stack)
        and fname.endswith("threading.py")
    ):
        return "wait-pool"
    return "busy"


class Sampler(threading.Thread):
    """Samples the stacks of the FUSE threads of this process every `interval` seconds."""

    def __init__(self, interval: float = 0.004) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.ticks = 0
        self.states: collections.Counter[tuple[str, str]] = collections.Counter()
        self.leaf: collections.Counter[tuple[str, str]] = collections.Counter()
        self.incl: collections.Counter[tuple[str, str]] = collections.Counter()

    @staticmethod
    def _where(fname: str, func: str, line: int | None = None) -> str:
        short = fname
        for prefix in (str(REPO) + "/", sys.prefix + "/", sys.base_prefix + "/"):
            short = short.removeprefix(prefix)
        return f"{short}:{func}" + (f":{line}" if line is not None else "")

    def run(self) -> None:
        readv_lines = _readv_lines()
        while not self.stopped.wait(self.interval):
            self.ticks += 1
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                name = names.get(ident, "")
                if not name.startswith("fuse"):
                    continue
                group = "fuse-io" if name.startswith("fuse-io") else "fuse-req"
                stack: list[tuple[str, str, int]] = []
                f: types.FrameType | None = frame
                while f is not None:
                    stack.append((f.f_code.co_filename, f.f_code.co_name, f.f_lineno))
                    f = f.f_back
                state = _classify(group, stack, readv_lines)
                self.states[(group, state)] += 1
                if state != "busy":
                    continue
                self.leaf[(group, self._where(*stack[0]))] += 1
                for fn in {self._where(n, fu) for n, fu, _ in stack}:
                    self.incl[(group, fn)] += 1

    def dump(self, path: str) -> None:
        doc = {
            "interval": self.interval,
            "ticks": self.ticks,
            "states": [[g, s, c] for (g, s), c in self.states.items()],
            "leaf": [[g, w, c] for (g, w), c in self.leaf.most_common(60)],
            "incl": [[g, w, c] for (g, w), c in self.incl.most_common(60)],
        }
        Path(path).write_text(json.dumps(doc))


def daemon_main(argv: Sequence[str]) -> int:
    """`bench_device.py _daemon`: the device daemon with tuned classes and/or a stack sampler."""
    p = argparse.ArgumentParser(prog="bench_device.py _daemon")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--tunes", default="{}")
    p.add_argument("--sample-out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tunes: dict[str, int] = json.loads(a.tunes)
    fs_kwargs: dict[str, Any] = {k: tunes[k] for k in ("threads", "io_threads", "readahead_kb") if k in tunes}
    if "store" in tunes:
        fs_kwargs["store"] = bool(tunes["store"])
    if fs_kwargs:
        base_init = fuse_mod.BlockFS.__init__

        def tuned_init(self: Any, *a: Any, **k: Any) -> None:
            base_init(self, *a, **{**k, **fs_kwargs})

        fuse_mod.BlockFS.__init__ = tuned_init  # type: ignore[method-assign]
    if "cache_chunks" in tunes:
        n = tunes["cache_chunks"]
        base: Any = layer_mod.LayerReader

        class TunedLayerReader(base):  # type: ignore[misc]
            def __init__(self, source: Any, expected_index_digest: str | None = None, **options: Any):
                super().__init__(source, expected_index_digest, **{**options, "cache_chunks": n})

        setattr(manager_mod, "LayerReader", TunedLayerReader)  # noqa: B010 - patching a module
    if tunes.get("inline_read"):
        # Serve each read on the request thread that received it: no hand-off to the pool (and no timeout).
        orig_init = fuse_mod.BlockFS.__init__

        class InlineExecutor:
            def submit(self, fn: Callable[..., bytes], *a: Any) -> concurrent.futures.Future[bytes]:
                fut: concurrent.futures.Future[bytes] = concurrent.futures.Future()
                try:
                    fut.set_result(fn(*a))
                except BaseException as e:
                    fut.set_exception(e)
                return fut

            def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
                pass

        def init(self: Any, *a: Any, **k: Any) -> None:
            orig_init(self, *a, **k)
            self._io.shutdown()
            self._io = InlineExecutor()

        fuse_mod.BlockFS.__init__ = init  # type: ignore[method-assign]
    sampler = Sampler() if a.sample_out else None
    if sampler is not None:
        sampler.start()
    try:
        daemon_mod.run(a.state_dir, DeviceSection(state_dir=a.state_dir))
    finally:
        if sampler is not None and a.sample_out:
            sampler.stopped.set()
            sampler.join(5)
            sampler.dump(a.sample_out)
    return 0


@dataclass
class Profile:
    workload: Workload
    result: Result
    sample: dict[str, Any]
    perf: list[tuple[float, str, str]]  # (percent, dso, symbol)
    perf_dso: list[tuple[float, str, str]]  # (percent, dso, "")


def perf_available() -> bool:
    return shutil.which("perf") is not None


@contextlib.contextmanager
def perf_record(pid: int, out: Path) -> Iterator[None]:
    if not perf_available():
        yield
        return
    proc = subprocess.Popen(
        ["perf", "record", "-F", "499", "-p", str(pid), "-o", str(out), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def perf_report(data: Path, limit: float = 1.0, sort: str = "dso,sym") -> list[tuple[float, str, str]]:
    if not data.exists():
        return []
    proc = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "--sort",
            sort,
            "--percent-limit",
            str(limit),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in proc.stdout.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)(?:\s+\[[^\]]+\]\s+(.*))?$", line.rstrip())
        if m:
            rows.append((float(m.group(1)), m.group(2), (m.group(3) or "").strip()))
    return rows


def inprocess_breakdown(image: Image, n: int = 4000) -> dict[str, float]:
    """The daemon's read path in this process, single thread, no kernel: what one read costs in Python.

    The layer blob is warm. Returns microseconds per operation (``*_us``) and MB/s (``*_mbs``).
    """
    warm([image.blob])
    src = FileSource(image.blob)
    out: dict[str, float] = {}
    try:
        layer = LayerReader(src, image.facts["blob"]["index_digest"])
        stack = Stack([layer])
        device = manager_mod.ImageDevice(stack, None)
        segs = [(seg.start, seg.length) for seg in stack.map if seg.source not in (HOLE, ZERO)]
        total = sum(length for _, length in segs)
        rng = random.Random(7)
        offsets = []
        for _ in range(n):
            pos = rng.randrange(total // 4096) * 4096
            for start, length in segs:
                if pos < length // 4096 * 4096:
                    offsets.append(start + pos)
                    break
                pos -= length // 4096 * 4096
        chunks = layer.chunks
        picks = [rng.randrange(chunks.chunk_count) for _ in range(n // 4)]
        picks = [i for i in picks if chunks.chunk_range(i)[1]]
        stored = [src.read(*chunks.chunk_range(i)) for i in picks]
        t0 = time.perf_counter()
        for data in stored:
            hashlib.sha256(data).digest()
        out["sha256_chunk_us"] = (time.perf_counter() - t0) / len(stored) * 1e6
        t0 = time.perf_counter()
        for i, data in zip(picks, stored, strict=True):
            chunks.decode_chunk(i, data)
        out["decode_chunk_us"] = (time.perf_counter() - t0) / len(stored) * 1e6
        out["stored_chunk_bytes"] = sum(map(len, stored)) / len(stored)
        t0 = time.perf_counter()
        for off in offsets:
            device.read(off, 4096)
        out["device_read_4k_us"] = (time.perf_counter() - t0) / len(offsets) * 1e6
        # The FUSE handler (request-thread path of a local device, with the chunk window it reads for
        # FUSE_NOTIFY_STORE), minus the kernel (no mount, no requests, nothing stored).
        fs = fuse_mod.BlockFS()
        try:
            fs.mountpoint = "/nonexistent"  # attach() only builds the path from it
            fs.attach("bench", device)
            entry = fs._dispatch(fuseabi.LOOKUP, 0, fuseabi.ROOT_INODE, 0, memoryview(b"bench\0"))
            assert isinstance(entry, bytes)
            inode = int.from_bytes(entry[:8], "little")
            bodies = [memoryview(fuseabi.READ_IN.pack(0, off, 4096, 0, 0, 0, 0)) for off in offsets]
            t0 = time.perf_counter()
            for body in bodies:
                fs._dispatch(fuseabi.READ, 0, inode, 0, body)
            out["dispatch_4k_us"] = (time.perf_counter() - t0) / len(bodies) * 1e6
        except Exception as e:  # private API of a module others are editing: degrade, don't fail the bench
            log(f"in-process FUSE dispatch not measured: {e!r}")
        finally:
            fs.mountpoint = None
            fs.unmount()
        for size, key in ((128 * KIB, "device_read_128k_mbs"), (1 * MIB, "device_read_1m_mbs")):
            done = 0
            t0 = time.perf_counter()
            for start, length in segs:
                for off in range(start, start + length, size):
                    done += len(device.read(off, min(size, start + length - off)))
                    if done >= 300 * MB:
                        break
                if done >= 300 * MB:
                    break
            out[key] = done / (time.perf_counter() - t0) / MB
    finally:
        src.close()
    return out


def run_profiles(image: Image, args: argparse.Namespace, work: Path) -> list[Profile]:
    out = []
    for w in (
        Workload("rand", 1, WORKLOADS[4].label, "IOPS"),
        Workload("seq", 1, WORKLOADS[0].label, "MB/s"),
    ):
        sample_path = work / f"profile-{w.key}.json"
        perf_path = work / f"perf-{w.key}.data"
        for p in (sample_path, perf_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with contextlib.ExitStack() as stack:
            cfg = setup_config(stack, image, Variant("profiled"), work, sample_out=sample_path)
            daemon = cfg.daemon
            assert daemon is not None
            r = measure(cfg, image, w, args, work, functools.partial(perf_record, daemon.pid, perf_path))
        sample = json.loads(sample_path.read_text()) if sample_path.exists() else {}
        out.append(Profile(w, r, sample, perf_report(perf_path), perf_report(perf_path, 0.5, "dso")))
        log(f"profile {w.key}: {r.value:,.0f} {w.unit} with the sampler on")
    return out


# -- report ------------------------------------------------------------------------------------------


def machine_facts() -> list[str]:
    mem = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB RAM"
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    dev = subprocess.run(
        ["findmnt", "-no", "SOURCE,FSTYPE", "--target", str(WORK)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- machine: {platform.node()}; {machine(mem, fio)}",
        f"- work directory (blob, plain image file): `{WORK}` on `{dev or '?'}`",
    ]


def code_state() -> str:
    dirty = git("status", "--porcelain", "--", "snapshotter", "blockformat", "p2p")
    return (git("rev-parse", "--short", "HEAD") or "?") + (
        " + uncommitted changes in the library" if dirty else ""
    )


def fmt_value(v: float, unit: str) -> str:
    if math.isnan(v):
        return "-"
    return f"{v:,.0f} MB/s" if unit == "MB/s" else f"{v:,.0f} IOPS"


def render(
    image: Image,
    args: argparse.Namespace,
    names: Sequence[str],
    settings: dict[str, dict[str, str]],
    variants: Sequence[Variant],
    results: dict[tuple[str, int, str], list[Result]],
    profiles: Sequence[Profile],
    breakdown: dict[str, float],
    elapsed: float,
    load: tuple[str, str],
) -> str:
    f = image.facts
    blob = f["blob"]
    damsels = [n for n in names if n != PLAIN]
    done = [w for w in WORKLOADS if results.get((w.key, w.readers, PLAIN))]
    lines = [
        "# Device I/O: damselfly (FUSE + loop + ext4) vs the same ext4 on a plain loop device",
        "",
        "DESIGN.md §8 item 3; issue 4. Full cache, no network: `damselfly` reads the layer through the node "
        "blob cache, complete (filled by `CachedBlob.ensure` + `verify_complete`, as the background download "
        "leaves it; the device names an unreachable registry); `damselfly, layout file` reads the OCI "
        "layout's blob file (`damselfly mount LAYOUT_DIR`), checking every chunk's SHA-256 on every decode.",
        "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; "
        f"run took {elapsed / 60:.1f} min; load average {load[0]} before, {load[1]} after",
        *machine_facts(),
        f"- code: `{code_state()}`",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- image: ext4 (mkfs.ext4 -d, journal-less, {f['vsize'] / MB:.0f} MB device) of "
        f"{f['tree_files']:,} files / {f['tree_bytes'] / MB:.0f} MB in whole directories of /usr "
        f"({', '.join(d['path'] for d in f['tree_dirs'])}) plus {len(f['big'])} big files / "
        f"{f['big_bytes'] / MB:.0f} MB (the largest regular files of {BIG_MIN // MIB}-{BIG_MAX // MIB} MiB "
        "under /usr, in `/big/`); one layer, "
        f"{blob['codec']} with {blob['chunk_size'] // KIB} KiB chunks: blob {blob['blob_size'] / MB:.0f} MB "
        f"({blob['uncompressed_size'] / MB:.0f} MB of data extents); plain image file: the same device "
        f"written by `write_device_file` ({f['plain_data_bytes'] / MB:.0f} MB of data, sparse)",
        "- damselfly: `damselfly device-daemon` (stock: 4 FUSE request threads, a 32-thread read pool, 8 "
        f"decoded 64 KiB chunks cached per layer, FOPEN_KEEP_CACHE, device file readahead "
        f"{fuse_mod.DEFAULT_READAHEAD_KB} KiB; a read under {pagestore.STORE_BELOW // KIB} KiB hands the "
        "rest of the chunks it decoded to the page cache with FUSE_NOTIFY_STORE) serving the device file; "
        "loop device attached read-only to it, ext4 mounted `ro,noload` (what `damselfly mount` does). "
        "plain loop: the plain image file, loop-attached and mounted the same way.",
        "- settings: "
        + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in sorted(settings[n].items())) for n in names),
    ]
    if args.backing == "warm":
        lines.append(
            "- **cold / warm**: before every measurement `sync; echo 3 > /proc/sys/vm/drop_caches` "
            "(cold: ext4 page cache and inodes, loop device buffers, the FUSE device file's page cache), "
            "then the backing store is read into the page cache (warm: the cache's data file or the layout's "
            "blob for damselfly, the data extents of the plain image file for the plain loop). So both read "
            "their bytes from "
            "memory, and the ratio is the cost of the FUSE + daemon path (request round trips, per-chunk "
            "SHA-256 and lz4), not of the disk. The daemon process stays up between runs."
        )
    else:
        lines.append(
            "- **cold / warm**: before every measurement `sync; echo 3 > /proc/sys/vm/drop_caches`, nothing "
            "re-warmed (`--backing cold`): both configurations read their backing files from disk."
        )
    lines += [
        "- workloads: sequential = `fio rw=read bs=1M` buffered over the big files (N readers = N fio",
        "  jobs on disjoint files of about equal size); tree = walk the whole tree and read every regular",
        "  file with 1 MiB reads, files dealt round-robin to N threads; random = `fio rw=randread bs=4k",
        "  direct=1 ioengine=psync` over the big files, each block at most once (random map, same seed for",
        f"  both), until all are read or {args.runtime:g} s; sparse = 4 KiB O_DIRECT reads at every 64",
        "  KiB of the big files in a shuffled order (a fio replay log): (nearly) every read decodes a chunk",
        "  no earlier read did (no aim: what a lone random read costs). Every run measures every column,",
        f"  alternating the order; values are medians of {args.reps} runs, ratio = damselfly / plain loop.",
        "  CPU busy =",
        "  share of all CPUs busy during the run (system-wide); daemon CPU = CPU seconds the daemon used.",
        "- the machine may be shared (other jobs' load shows in the load averages below); both columns of a "
        "row are measured back to back in every run, so they see about the same load, but a busy machine "
        "hurts damselfly more: it needs more CPU per byte.",
        "",
        "## Results",
        "",
    ]
    head = ["workload", "readers", PLAIN]
    for n in damsels:
        head += [n, f"ratio {n}"]
    head += ["aim", "CPU busy plain / damselfly"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    verdicts: list[tuple[Workload, str, float]] = []
    for w in done:
        base = med([r.value for r in results.get((w.key, w.readers, PLAIN), [])])
        row = [w.label, str(w.readers), fmt_value(base, w.unit)]
        for n in damsels:
            v = med([r.value for r in results.get((w.key, w.readers, n), [])])
            ratio = v / base if base else float("nan")
            row += [fmt_value(v, w.unit), f"**{ratio:.2f}**" if n in (STOCK, LAYOUT) else f"{ratio:.2f}"]
            if n in (STOCK, LAYOUT):
                verdicts.append((w, n, ratio))
        stock = results.get((w.key, w.readers, STOCK), [])
        plain = results.get((w.key, w.readers, PLAIN), [])
        row += [
            f"≥ {AIM[w.key]:.2f}" if w.key in AIM else "—",
            f"{med([r.extra['cpu_busy'] for r in plain]):.0%} / "
            f"{med([r.extra['cpu_busy'] for r in stock]):.0%}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "CPU time of the daemon process (per I/O for random reads, per GB read otherwise; medians):",
        "",
        "| workload | readers | " + " | ".join(damsels) + " |",
        "|---|---|" + "---|" * len(damsels),
    ]
    for w in done:
        cells = [daemon_cpu(w, results.get((w.key, w.readers, n), [])) for n in damsels]
        lines.append(f"| {w.key} | {w.readers} | " + " | ".join(cells) + " |")
    lines += ["", "Random 4 KiB latency (fio completion latency, medians of the runs' p50 / p99):", ""]
    lines += ["| readers | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for w in done:
        if w.unit != "IOPS":
            continue
        cells = []
        for n in names:
            rs = results.get((w.key, w.readers, n), [])
            cells.append(
                f"{med([r.extra.get('p50_us', 0) for r in rs]):,.0f} / "
                f"{med([r.extra.get('p99_us', 0) for r in rs]):,.0f} µs"
            )
        lines.append(
            f"| {w.readers}{' (one per 64 KiB)' if w.key == 'sparse' else ''} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Every run (value; seconds, 1-minute load average when it started):", ""]
    lines += ["| workload | readers | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for w in done:
        cells = []
        for n in names:
            rs = results.get((w.key, w.readers, n), [])
            cells.append(
                ", ".join(f"{r.value:,.0f} ({r.seconds:.1f} s, load {r.extra['load1']:.1f})" for r in rs)
            )
        lines.append(f"| {w.key} | {w.readers} | " + " | ".join(cells) + " |")
    tree_rs = results.get(("tree", 1, PLAIN), [])
    if tree_rs:
        lines += [
            "",
            f"Tree read: {tree_rs[0].extra['files']:,.0f} files, {tree_rs[0].nbytes / MB:.0f} MB per run "
            f"(walk alone, plain loop: {med([r.extra['walk_s'] for r in tree_rs]):.1f} s).",
        ]
    lines += ["", "## Verdict", ""]
    lines += [
        f"The aims are for `{STOCK}` (full node cache); `{LAYOUT}` also checks every chunk's SHA-256 on "
        "every decode.",
        "",
    ]
    for w, n, ratio in verdicts:
        if w.key not in AIM:
            continue
        ok = ratio >= AIM[w.key]
        lines.append(
            f"- {n}: {w.label}, {w.readers} reader{'s' if w.readers > 1 else ''}: {ratio:.2f} of plain loop, "
            f"aim ≥ {AIM[w.key]:.2f}: {'met' if ok else '**not met**'}"
        )
    if variants:
        lines += ["", "Variants (each its own daemon and mount, measured in the same runs):", ""]
        lines += [f"- {v.name}: {v.describe()}" for v in variants]
    if breakdown:
        lines += ["", *render_breakdown(breakdown, results)]
    if profiles:
        lines += ["", *render_profiles(profiles)]
    lines.append("")
    return "\n".join(lines)


def daemon_cpu(w: Workload, rs: Sequence[Result]) -> str:
    """The daemon's CPU time per I/O (random) or per GB read (sequential, tree), median of the runs."""
    if w.unit == "IOPS":
        us = [r.extra["daemon_cpu_s"] / r.extra["ios"] * 1e6 for r in rs if r.extra.get("ios")]
        return f"{med(us):,.0f} µs/IO"
    return f"{med([r.extra['daemon_cpu_s'] / (r.nbytes / 1e9) for r in rs if r.nbytes]):.1f} s/GB"


def render_breakdown(b: dict[str, float], results: dict[tuple[str, int, str], list[Result]]) -> list[str]:
    def us(key: str) -> str:
        return f"{b[key]:,.0f} µs" if key in b else "n/a"

    lines = [
        "## Where the daemon's time goes (`--profile`)",
        "",
        "### The read path in Python, without the kernel",
        "",
        "The daemon's own code called in this process, one thread, layer blob warm (no FUSE, no loop):",
        "",
        "| step | cost |",
        "|---|---|",
        f"| SHA-256 of one stored chunk ({b.get('stored_chunk_bytes', 0) / KIB:.0f} KiB on average) | "
        f"{us('sha256_chunk_us')} |",
        f"| `decode_chunk`: SHA-256 + lz4 of one 64 KiB chunk | {us('decode_chunk_us')} |",
        f"| `ImageDevice.read` of a random 4 KiB block (one chunk decoded per read) | "
        f"{us('device_read_4k_us')} |",
        f"| the same through `BlockFS` READ dispatch (the whole chunk window, split for the reply) | "
        f"{us('dispatch_4k_us')} |",
        f"| `ImageDevice.read` sequential, 128 KiB reads | {b.get('device_read_128k_mbs', 0):,.0f} MB/s |",
        f"| `ImageDevice.read` sequential, 1 MiB reads | {b.get('device_read_1m_mbs', 0):,.0f} MB/s |",
        "",
    ]
    # The sparse workload: every read decodes a chunk (in the random one most reads find the page cache
    # filled by an earlier read's FUSE_NOTIFY_STORE, and cost the daemon nothing).
    plain = results.get(("sparse", 1, PLAIN), [])
    stock = results.get(("sparse", 1, LAYOUT), [])  # the in-process figures check SHA-256 too
    if plain and stock and "device_read_4k_us" in b:
        t_p = 1e6 / med([r.value for r in plain])
        t_d = 1e6 / med([r.value for r in stock])
        d = b["device_read_4k_us"]
        h = b.get("dispatch_4k_us", d) - d
        rest = t_d - t_p - d - h
        cpu = med([r.extra["daemon_cpu_s"] / r.extra["ios"] * 1e6 for r in stock if r.extra.get("ios")])
        lines += [
            f"Sparse random 4 KiB (`{LAYOUT}`): a read takes {t_d:,.0f} µs through damselfly against "
            f"{t_p:,.0f} µs on the plain loop (+{t_d - t_p:,.0f} µs). Decoding the chunk that holds it "
            f"accounts for {d:,.0f} µs, the FUSE handler's own work for about {h:,.0f} µs, and the remaining "
            f"{rest:,.0f} µs is the FUSE round trip (kernel → /dev/fuse → a Python request thread → writev → "
            "kernel), the loop device's worker, the store of the chunk's other pages, and the wake-ups "
            f"between them. The daemon used {cpu:,.0f} µs of CPU per read.",
            "",
        ]
    return lines


def render_profiles(profiles: Sequence[Profile]) -> list[str]:
    lines = [
        "### Profiles of the running daemon",
        "",
        "One more run of a workload against a daemon started by this script with an in-process sampler: "
        "every 4 ms it records the Python stack of each FUSE request thread (`fuse-req`) and read-pool "
        "thread (`fuse-io`). Idle = blocked reading /dev/fuse (request threads) or waiting for work (pool); "
        "wait-pool = a request thread waiting for its read in the pool. A thread waiting for the GIL counts "
        "where it stands. `perf record -p` (when installed) adds the native view of the same process.",
        "",
    ]
    for p in profiles:
        s = p.sample
        lines += [
            f"#### {p.workload.label}, 1 reader: {fmt_value(p.result.value, p.workload.unit)} "
            "with the sampler",
            "",
        ]
        if not s:
            lines += ["(no samples)", ""]
            continue
        states: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for g, st, c in s["states"]:
            states[g][st] = c
        for g, d in sorted(states.items()):
            tot = sum(d.values()) or 1
            lines.append(f"- {g}: " + ", ".join(f"{k} {v / tot:.0%}" for k, v in sorted(d.items())))
        lines += [
            "",
            "Busy samples by innermost Python frame (top 8; share of busy samples of the group):",
            "",
        ]
        busy = {g: d.get("busy", 0) or 1 for g, d in states.items()}
        lines += ["| thread group | where | share |", "|---|---|---|"]
        for g, where, c in s["leaf"][:8]:
            lines.append(f"| {g} | `{where}` | {c / busy[g]:.0%} |")
        lines += ["", "Inclusive (function on the stack; top 8 below the thread entry points):", ""]
        lines += ["| thread group | function | share |", "|---|---|---|"]
        shown = 0
        for g, where, c in s["incl"]:
            if where.endswith((":_bootstrap", ":_bootstrap_inner", ":run", ":_worker", ":_loop")):
                continue
            lines.append(f"| {g} | `{where}` | {c / busy[g]:.0%} |")
            shown += 1
            if shown >= 8:
                break
        if p.perf_dso:
            lines += ["", "`perf report --sort dso` (whole daemon process, user + kernel, ≥ 0.5%):", ""]
            lines += ["| % | dso |", "|---|---|"]
            lines += [f"| {pc:.1f} | {dso} |" for pc, dso, _ in p.perf_dso[:10]]
        if p.perf:
            lines += ["", "`perf report --sort dso,sym` (≥ 1%):", ""]
            lines += ["| % | dso | symbol |", "|---|---|---|"]
            lines += [f"| {pc:.1f} | {dso} | `{sym}` |" for pc, dso, sym in p.perf[:16]]
        lines.append("")
    return lines


# -- main --------------------------------------------------------------------------------------------


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (loop devices, mounts, drop_caches)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing (modprobe fuse)")
    if shutil.which("fio") is None:
        problems.append("fio is not installed: `apt-get install fio` (Debian package fio)")
    for tool in ("losetup", "mount", "umount", "mkfs.ext4"):
        if (
            shutil.which(tool) is None
            and not os.path.exists(f"/usr/sbin/{tool}")
            and not os.path.exists(f"/sbin/{tool}")
        ):
            problems.append(f"{tool} is missing")
    if problems:
        raise SystemExit("bench_device.py cannot run: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_daemon"]:
        return daemon_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--output", type=Path, default=OUTPUT, help=f"Markdown result file (default {OUTPUT})")
    p.add_argument("--reps", type=int, default=3, help="runs of every measurement (default 3)")
    p.add_argument(
        "--runtime", type=float, default=15.0, help="seconds cap of a random-read run (default 15)"
    )
    p.add_argument(
        "--backing",
        choices=("warm", "cold"),
        default="warm",
        help="re-read the backing store after dropping caches",
    )
    p.add_argument("--only", default="", help="comma-separated workload keys to run (seq,tree,rand)")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], help="NAME:key=value,...")
    p.add_argument("--profile", action="store_true", help="profile the daemon afterwards (sampler + perf)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached image")
    args = p.parse_args(argv)
    preflight()
    only = set(filter(None, args.only.split(",")))
    workloads = [w for w in WORKLOADS if not only or w.key in only]

    # Ctrl-C and SIGTERM both unwind through the finally blocks below.
    def on_term(signum: int, frame: types.FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the cleanup finish
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.perf_counter()
    load_start = loadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    image = prepare_image(WORK, args.rebuild)
    names = [PLAIN, STOCK, LAYOUT, *[v.name for v in args.variant]]
    if len(set(names)) != len(names):
        raise SystemExit(
            f"variant names must differ from each other and from {PLAIN!r}, {STOCK!r}, {LAYOUT!r}"
        )
    results: dict[tuple[str, int, str], list[Result]] = collections.defaultdict(list)
    settings: dict[str, dict[str, str]] = {}
    profiles: list[Profile] = []
    with contextlib.ExitStack() as stack:
        configs = [setup_config(stack, image, None, WORK)]
        configs.append(setup_config(stack, image, Variant(STOCK), WORK))
        configs.append(setup_config(stack, image, Variant(LAYOUT, {"layout": 1}), WORK))
        configs += [setup_config(stack, image, v, WORK) for v in args.variant]
        for c in configs:
            settings[c.name] = c.settings
        log("mounted: " + "; ".join(f"{c.name} {c.loop} at {c.mountpoint}" for c in configs))
        check_same(configs, image)
        for rep in range(args.reps):
            for w in workloads:
                order = configs if rep % 2 == 0 else configs[::-1]
                for cfg in order:
                    r = measure(cfg, image, w, args, WORK)
                    results[(w.key, w.readers, cfg.name)].append(r)
                    log(
                        f"run {rep + 1}/{args.reps} {w.key} x{w.readers} {cfg.name}: "
                        f"{fmt_value(r.value, w.unit)} ({r.seconds:.1f} s)"
                    )
    breakdown: dict[str, float] = {}
    if args.profile:
        profiles = run_profiles(image, args, WORK)
        breakdown = inprocess_breakdown(image)
    text = render(
        image,
        args,
        names,
        settings,
        args.variant,
        results,
        profiles,
        breakdown,
        time.perf_counter() - t_start,
        (load_start, loadavg()),
    )
    publish(args.output, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
