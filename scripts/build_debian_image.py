#!/usr/bin/env python3
"""Realistic OCI images with gzip layers, for the demo and the benchmarks, cached between runs.

    build_debian_image.py [--variant debian|busybox] [--payload-mb N | --target-mb N] [--no-top-layer]
                          [--cache-dir DIR] [--ref NAME] [--gzip zlib|isal] [--json] [--quiet]

prints the OCI layout directory of the image on stdout (``--json``: a summary of it), progress on stderr.

Layers, bottom first:

1. base — ``debian``: a Debian rootfs from ``debootstrap --variant=minbase --include=python3 SUITE``
   (needs root and the mirror); ``busybox``: the static ``/bin/busybox`` of this machine (Debian's
   ``busybox-static``) with its applets as symlinks, ``/etc/passwd``, ``/etc/group`` and the usual
   empty directories (no root needed).
2. payload (``--payload-mb N`` > 0, or as much as ``--target-mb`` needs): N MB (10^6 bytes) of files under
   ``/opt/payload/``, drawn from a seeded generator: text-like files (source, docs: gzip ~4-5x),
   binary-like files (random runs, zero runs, string tables: ~2x) and already-compressed files (~1x), in
   many directories, with sizes from a long-tailed distribution, plus library symlinks and a few hard
   links. The same seed gives the same bytes.
3. top (unless ``--no-top-layer``): ``/etc/motd`` rewritten and ``/etc/issue.net`` deleted (a ``.wh.``
   whiteout), like a small final ``RUN`` step.

Every layer is a deterministic tar (PAX format, entries sorted by name with each directory before its
children, numeric owners only, mtimes clamped to ``MTIME_CLAMP``, xattrs as ``SCHILY.xattr.*``, device
nodes, fifos, hard links as link entries) compressed by zlib level 6 (what docker and containerd push,
so sizes compare with real registries) or, with ``--gzip isal``, by isal level 3 (about 5x faster,
larger). The config carries ``Env``, ``Cmd`` (``python3``; ``sh`` for busybox), ``history`` and
``rootfs.diff_ids``; ``index.json`` names the manifest with the ref (default ``latest``).

Cache (default ``bench/work/images/``)::

    layers/<kind>-<key>.tar.gz   a finished layer blob       (written to a temp name, fsynced, renamed)
    layers/<kind>-<key>.json     its digests and sizes       (written last: its presence = complete)
    <name>-<key>/                an OCI image layout         (built under a temp name, renamed whole)
        oci-layout  index.json  blobs/sha256/...  image.json (our summary, written before the rename)
    logs/debootstrap-<key>.log   the last debootstrap's output

Keys hash the parameters that change the bytes (variant, suite, architecture, payload size and seed,
compressor, ``BUILDER_VERSION``; not the mirror). A layer or image is built only when missing, so the
base layer is shared by every image with the same base (debootstrap runs once). Builds hold an exclusive
``flock`` on ``<cache>/.lock``. The debootstrap target lives under the cache while it is built; whatever
debootstrap left mounted in it (``/proc``, ``/sys``) is unmounted by exact path, deepest first, and the
tree is removed only when nothing is mounted in it any more.

Import it (``scripts/`` on ``sys.path``) for `build_image(ImageSpec(...), cache_dir)` → `BuiltImage`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol, cast

import isal.isal_zlib
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from blockformat.digest import Digest
from blockformat.durable import atomic_write, fsync_dir, write_file_atomic
from p2p.manifest import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_index,
    build_manifest,
)
from snapshotter.host.mountinfo import mountinfo

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "bench" / "work" / "images"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
#: Bump when the bytes a given set of parameters produces change; it is part of every cache key.
BUILDER_VERSION = 1
#: Latest mtime written to a tar (2024-01-01T00:00:00Z): files debootstrap or we create get this time,
#: so a rebuild of the same content gives the same bytes. Also the config's ``created``.
MTIME_CLAMP = 1704067200
CREATED = "2024-01-01T00:00:00Z"
MB = 1_000_000
PIECE = 1 << 20  # file copy and generator granularity
REF_NAME = "org.opencontainers.image.ref.name"
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GZIP_LEVELS = {"zlib": 6, "isal": 3}
#: Files the top layer changes and deletes; both exist in either base.
TOP_CHANGED = "etc/motd"
TOP_DELETED = "etc/issue.net"
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class ImageBuildError(Exception):
    """Building an image failed: what, where (a path or a command), and the remedy."""

    def __init__(self, what: str, where: str, remedy: str) -> None:
        super().__init__(f"{where}: {what}; {remedy}")
        self.what = what
        self.where = where
        self.remedy = remedy


# -- what to build --------------------------------------------------------------------------------


def host_arch() -> str:
    """The OCI architecture name of this machine."""
    machine = platform.machine()
    return _ARCHES.get(machine, machine)


@dataclass(frozen=True)
class ImageSpec:
    """The parameters of an image. `target_mb` (if set) overrides `payload_mb`: the payload is sized so
    that the image's layers hold at least that many MB of uncompressed tar."""

    variant: str = "debian"  # "debian" or "busybox"
    payload_mb: int = 0
    target_mb: int | None = None
    top_layer: bool = True
    suite: str = DEFAULT_SUITE
    mirror: str = DEFAULT_MIRROR
    gzip: str = "zlib"  # "zlib" (level 6) or "isal" (level 3)
    seed: int = 1
    arch: str = field(default_factory=host_arch)
    small_files: int = 0  # > 0: the payload is this many small text files instead (`fill_small_files`)

    def check(self) -> None:
        if self.variant not in ("debian", "busybox"):
            raise ImageBuildError(f"unknown variant {self.variant!r}", "ImageSpec", "use debian or busybox")
        if self.gzip not in GZIP_LEVELS:
            raise ImageBuildError(f"unknown compressor {self.gzip!r}", "ImageSpec", "use zlib or isal")
        if self.payload_mb < 0 or (self.target_mb is not None and self.target_mb < 0):
            raise ImageBuildError("negative size", "ImageSpec", "pass sizes >= 0")


@dataclass(frozen=True)
class LayerInfo:
    """One cached layer blob: ``<cache>/layers/<name>.tar.gz``."""

    name: str  # <kind>-<key>
    kind: str  # base-debian, base-busybox, payload, top
    digest: str  # sha256 of the gzip blob
    size: int  # gzip bytes
    diff_id: str  # sha256 of the tar
    uncompressed_size: int  # tar bytes
    entries: int  # tar entries
    created_by: str  # the history line
    seconds: float  # build time (debootstrap included for the Debian base)


@dataclass(frozen=True)
class BuiltImage:
    layout_dir: str
    ref: str
    manifest_digest: str
    config_digest: str
    spec: dict[str, Any]
    layers: tuple[LayerInfo, ...]
    seconds: float  # this call's time (near 0 when cached)
    cached: bool  # True when nothing was built

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["uncompressed_size"] = self.uncompressed_size
        doc["compressed_size"] = self.compressed_size
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, cached: bool, seconds: float) -> BuiltImage:
        layers = tuple(LayerInfo(**layer) for layer in doc["layers"])
        return cls(
            doc["layout_dir"], doc["ref"], doc["manifest_digest"], doc["config_digest"], doc["spec"],
            layers, seconds, cached,
        )  # fmt: skip


def _key(*parts: object) -> str:
    doc = json.dumps([BUILDER_VERSION, *parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


# -- progress -------------------------------------------------------------------------------------


class Ui:
    """Progress on stderr (rich); silent when `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet, soft_wrap=True)

    def step(self, text: str) -> None:
        self.console.print(f"[bold]build-image[/bold]: {text}", highlight=False)

    @contextlib.contextmanager
    def bar(self, what: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A bytes progress bar; yields ``advance(n)``."""
        if self.quiet or not self.console.is_terminal:
            yield lambda n: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(what, total=total)
            yield lambda n: progress.advance(task, n)


# -- gzip + digests while the tar streams out -----------------------------------------------------


class _Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self, /) -> bytes: ...


class LayerSink:
    """A write-only stream: counts and hashes the tar bytes (the diff_id), gzips them (mtime 0, no file
    name: deterministic) into `out` and hashes what it writes (the blob digest)."""

    def __init__(self, out: IO[bytes], compressor: str, advance: Callable[[int], None]) -> None:
        level = GZIP_LEVELS[compressor]
        # wbits 31: a gzip member (header with mtime 0 and no name, deflate, CRC32 + size trailer).
        self._comp: _Compressor = (
            zlib.compressobj(level, zlib.DEFLATED, 31)
            if compressor == "zlib"
            else isal.isal_zlib.compressobj(level, isal.isal_zlib.DEFLATED, 31)
        )
        self._out = out
        self._advance = advance
        self.tar_hash = hashlib.sha256()
        self.blob_hash = hashlib.sha256()
        self.tar_size = 0
        self.blob_size = 0

    def write(self, data: bytes) -> int:
        self.tar_hash.update(data)
        self.tar_size += len(data)
        self._emit(self._comp.compress(data))
        self._advance(len(data))
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self.blob_hash.update(data)
            self.blob_size += len(data)

    def finish(self) -> None:
        self._emit(self._comp.flush())


def _new_tarinfo(
    name: str, kind: bytes, mode: int, *, uid: int = 0, gid: int = 0, mtime: int = MTIME_CLAMP
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid, ti.gid = uid, gid
    ti.uname = ti.gname = ""  # numeric owners only (layer.md: names are secondary to ids)
    ti.mtime = min(mtime, MTIME_CLAMP)
    return ti


@contextlib.contextmanager
def _open_tar(sink: LayerSink) -> Iterator[tarfile.TarFile]:
    # Stream mode ("w|") only calls write(); PAX carries long names, big ids, xattrs and binary values
    # (surrogate-escaped names and values become hdrcharset=BINARY records).
    tf = tarfile.open(  # noqa: SIM115  # closed by this context manager
        fileobj=cast(IO[bytes], sink),  # a write-only stream is all "w|" needs
        mode="w|",
        format=tarfile.PAX_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
        bufsize=PIECE,
    )
    try:
        yield tf
    finally:
        tf.close()


# -- the layer cache ------------------------------------------------------------------------------


class LayerCache:
    def __init__(self, cache_dir: Path, ui: Ui) -> None:
        self.dir = cache_dir / "layers"
        self.ui = ui

    def blob_path(self, name: str) -> Path:
        return self.dir / f"{name}.tar.gz"

    def get(self, name: str) -> LayerInfo | None:
        meta = self.dir / f"{name}.json"
        try:
            info = LayerInfo(**json.loads(meta.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise ImageBuildError(
                f"unreadable layer record ({e})", str(meta), "delete it to rebuild the layer"
            ) from e
        blob = self.blob_path(name)
        if not blob.exists() or blob.stat().st_size != info.size:
            return None
        return info

    def build(
        self, name: str, kind: str, created_by: str, compressor: str, total: int | None,
        fill: Callable[[tarfile.TarFile], int], started: float | None = None,
    ) -> LayerInfo:  # fmt: skip
        """Write the layer whose tar `fill` produces (returning its entry count) into the cache."""
        self.dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter() if started is None else started
        with atomic_write(self.blob_path(name)) as out, self.ui.bar(f"{kind} layer", total) as advance:
            sink = LayerSink(out, compressor, advance)
            with _open_tar(sink) as tf:
                entries = fill(tf)
            sink.finish()
        info = LayerInfo(
            name, kind, "sha256:" + sink.blob_hash.hexdigest(), sink.blob_size,
            "sha256:" + sink.tar_hash.hexdigest(), sink.tar_size, entries, created_by,
            round(time.perf_counter() - start, 2),
        )  # fmt: skip
        write_file_atomic(self.dir / f"{name}.json", json.dumps(asdict(info), indent=1).encode())
        self.ui.step(
            f"{kind} layer: {info.uncompressed_size / MB:.1f} MB tar, {info.size / MB:.1f} MB gzip, "
            f"{entries} entries, {info.seconds:.1f} s"
        )
        return info


# -- a directory tree as a tar --------------------------------------------------------------------


def add_tree(tf: tarfile.TarFile, root: str, *, owner: tuple[int, int] | None = None) -> int:
    """Add everything under `root` (not root itself) to `tf`, deterministically; return the entry count.

    A directory's entries come sorted by their byte names, each directory before its children (depth
    first); owners are numeric (`owner` forces uid/gid); mtimes are clamped; xattrs go into
    ``SCHILY.xattr.*`` records (sorted); the second and later names of a hard-linked file become link
    entries to the first; sockets are skipped (tar has no type for them).
    """
    seen: dict[tuple[int, int], str] = {}
    count = 0

    def visit(rel: bytes) -> None:
        nonlocal count
        path = os.path.join(os.fsencode(root), rel) if rel else os.fsencode(root)
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        for name in names:
            child_rel = os.path.join(rel, name) if rel else name
            child = os.path.join(path, name)
            st = os.lstat(child)
            ti = _tarinfo_for(os.fsdecode(child_rel), child, st, owner, seen)
            if ti is None:
                continue
            if ti.isreg():
                fd = os.open(child, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
            count += 1
            if stat.S_ISDIR(st.st_mode):
                visit(child_rel)

    visit(b"")
    return count


def _tarinfo_for(
    name: str,
    path: bytes,
    st: os.stat_result,
    owner: tuple[int, int] | None,
    seen: dict[tuple[int, int], str],
) -> tarfile.TarInfo | None:
    mode = st.st_mode
    uid, gid = owner if owner is not None else (st.st_uid, st.st_gid)
    kinds = {
        stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFREG: tarfile.REGTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
        stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
    }  # fmt: skip
    kind = kinds.get(stat.S_IFMT(mode))
    if kind is None:
        return None  # a socket
    ti = _new_tarinfo(name, kind, stat.S_IMODE(mode), uid=uid, gid=gid, mtime=int(st.st_mtime))
    if kind == tarfile.REGTYPE:
        if st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), name)
            if first != name:
                ti.type = tarfile.LNKTYPE
                ti.linkname = first
                return _with_xattrs(ti, path)
        ti.size = st.st_size
    elif kind == tarfile.SYMTYPE:
        ti.linkname = os.fsdecode(os.readlink(path))
    elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return _with_xattrs(ti, path)


def _with_xattrs(ti: tarfile.TarInfo, path: bytes) -> tarfile.TarInfo:
    if ti.type == tarfile.LNKTYPE:
        return ti  # a link entry carries no metadata of its own
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ti
        raise
    headers = dict(ti.pax_headers)
    for xname in names:
        value = os.getxattr(path, xname, follow_symlinks=False)
        headers[f"SCHILY.xattr.{xname}"] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = headers
    return ti


# -- base layers ----------------------------------------------------------------------------------


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"{what} needs root (debootstrap creates device nodes, chroots and mounts /proc)",
            "build_debian_image",
            "run it as root, or use --variant busybox",
        )


def build_debian_base(spec: ImageSpec, cache: LayerCache, cache_dir: Path, ui: Ui) -> LayerInfo:
    name = f"base-debian-{_key('debian', spec.suite, spec.arch, spec.gzip)}"
    if (info := cache.get(name)) is not None:
        return info
    _require_root("the Debian base layer")
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed", "PATH", "apt-get install debootstrap")
    start = time.perf_counter()
    logs = cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"debootstrap-{name}.log"
    target = Path(tempfile.mkdtemp(prefix=".debootstrap-", dir=cache_dir)).resolve()
    try:
        os.chmod(target, 0o755)
        run_debootstrap(spec, target, log, ui)
        tidy_rootfs(target)
        created_by = f"debootstrap --variant=minbase --include=python3 {spec.suite} / {spec.mirror}"
        return cache.build(
            name, "base-debian", created_by, spec.gzip, None,
            lambda tf: add_tree(tf, str(target)), started=start,
        )  # fmt: skip
    finally:
        remove_chroot(target)


def run_debootstrap(spec: ImageSpec, target: Path, log: Path, ui: Ui) -> None:
    cmd = [
        "debootstrap", "--variant=minbase", "--include=python3", f"--arch={spec.arch}",
        spec.suite, str(target), spec.mirror,
    ]  # fmt: skip
    ui.step(f"{' '.join(cmd)} (a few minutes; log: {log})")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            with ui.console.status("debootstrap") as status:
                for line in proc.stdout:
                    logf.write(line)
                    text = line.decode(errors="replace").strip()
                    if text.startswith(("I:", "W:", "E:")):
                        status.update(f"debootstrap: {text[2:].strip()}")
        except BaseException:
            # Ctrl-C or an error here: debootstrap must be gone before the caller unmounts and
            # deletes its target.
            proc.terminate()
            proc.wait()
            raise
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ImageBuildError(
            f"debootstrap exited with {rc}: " + " | ".join(tail),
            " ".join(cmd),
            f"read {log}; check that {spec.mirror} is reachable",
        )


def tidy_rootfs(root: Path) -> None:
    """What image builders drop from a fresh debootstrap: downloaded .debs, apt's lists and caches, and
    the build host's resolv.conf and hostname (the runtime provides both)."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
        for p in root.glob(pattern):
            p.unlink()
    for rel in ("etc/resolv.conf", "etc/hostname"):
        p = root / rel
        if p.is_symlink() or p.exists():
            p.unlink()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    top = str(path)
    found = {
        m.mount_point for m in mountinfo() if m.mount_point == top or m.mount_point.startswith(top + "/")
    }
    return sorted(found, key=lambda p: (-p.count("/"), p))


def remove_chroot(target: Path) -> None:
    """Unmount what is mounted inside `target` (by exact path, deepest first), then delete the tree.

    A tree with something still mounted in it is never deleted: removing through a bind mount of the
    host's /dev or /proc would destroy the host's files."""
    for point in mounts_under(target):
        done = subprocess.run(["umount", point], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    left = mounts_under(target)
    if left:
        raise ImageBuildError(
            f"still mounted after umount: {', '.join(left)}",
            str(target),
            "unmount them by hand, then delete it",
        )
    if target.exists():
        shutil.rmtree(target)


def build_busybox_base(spec: ImageSpec, cache: LayerCache, cache_dir: Path) -> LayerInfo:
    busybox = shutil.which("busybox") or "/bin/busybox"
    try:
        with open(busybox, "rb") as f:
            binary = f.read()
    except OSError as e:
        raise ImageBuildError(
            f"cannot read busybox ({e.strerror})", busybox, "apt-get install busybox-static"
        ) from e
    if _elf_interpreter(binary) is not None:
        raise ImageBuildError(
            "busybox is dynamically linked; the image has no libc", busybox, "apt-get install busybox-static"
        )
    name = f"base-busybox-{_key('busybox', hashlib.sha256(binary).hexdigest(), spec.gzip)}"
    if (info := cache.get(name)) is not None:
        return info
    listing = subprocess.run([busybox, "--list-full"], capture_output=True, check=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix=".busybox-", dir=cache_dir) as tmp:
        root = Path(tmp) / "rootfs"
        make_busybox_rootfs(root, binary, sorted(set(listing.split())))
        return cache.build(
            name, "base-busybox", "busybox-static rootfs: /bin/busybox, applet symlinks, /etc/passwd",
            spec.gzip, None, lambda tf: add_tree(tf, str(root), owner=(0, 0)),
        )  # fmt: skip


def _elf_interpreter(binary: bytes) -> bytes | None:
    """The PT_INTERP of a 64-bit little-endian ELF file (None for a static binary or another format)."""
    if binary[:4] != b"\x7fELF" or binary[4] != 2 or binary[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", binary, 32)  # fmt: skip
    phentsize, phnum = struct.unpack_from("<HH", binary, 54)
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", binary, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return binary[p_offset : p_offset + p_filesz].rstrip(b"\0")
    return None


def make_busybox_rootfs(root: Path, binary: bytes, applets: list[str]) -> None:
    for d, mode in (
        ("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755), ("etc", 0o755),
        ("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777), ("root", 0o700),
        ("home", 0o755), ("var/log", 0o755), ("var/tmp", 0o1777),
    ):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / d, mode)
    (root / "bin/busybox").write_bytes(binary)
    os.chmod(root / "bin/busybox", 0o755)
    for applet in applets:
        path = root / applet
        if applet.startswith("/") or ".." in applet.split("/") or path.exists() or path.is_symlink():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", path)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/motd": "busybox test image\n",
        "etc/issue.net": "busybox\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
        os.chmod(root / rel, 0o644)


# -- the payload layer ----------------------------------------------------------------------------

_WORDS_TEXT = (
    "import def return self None True False class for while if elif else try except finally with as "
    "lambda yield from raise assert async await value data result index config buffer length offset "
    "layer chunk block image manifest digest snapshot mount device cache registry request response "
    "error message handler parser writer reader stream header trailer table entry record version "
    "the of and to in is that it for on are with this be by not or have from at which"
)
_WORDS = _WORDS_TEXT.split()
_PUNCT = ("(", ")", ":", ",", ".", "=", "==", "[", "]", "->", '"', "#", "{", "}")


def _text_pool(rng: random.Random, size: int) -> bytes:
    """Source-code-like text: lines of words, identifiers, a few numbers; ~4x under gzip -6."""
    idents = [f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}" for _ in range(400)]
    lines: list[str] = []
    n = 0
    while n < size:
        indent = "    " * rng.randrange(4)
        words = []
        for _ in range(rng.randrange(2, 12)):
            r = rng.random()
            if r < 0.55:
                words.append(rng.choice(_WORDS))
            elif r < 0.85:
                words.append(rng.choice(idents))
            elif r < 0.9:
                words.append(str(rng.randrange(1000)))
            else:
                words.append(rng.choice(_PUNCT))
        line = indent + " ".join(words) + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


class PayloadGenerator:
    """Deterministic file contents from a seed. Pools of random and text bytes are made once; a file
    is slices of them at random offsets (memory copies, so ~1 GB takes seconds, not minutes), which a
    chunk compressor or gzip's 32 KiB window cannot tell from fresh random data."""

    RANDOM_POOL = 32 << 20
    TEXT_POOL = 4 << 20

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.random_pool = self.rng.randbytes(self.RANDOM_POOL)
        self.text_pool = _text_pool(self.rng, self.TEXT_POOL)

    def _slice(self, pool: bytes, n: int) -> bytes:
        off = self.rng.randrange(len(pool) - n + 1)
        return pool[off : off + n]

    def content(self, kind: str, size: int) -> Iterator[bytes]:
        """Yield `size` bytes of a file of `kind` (text, binary, compressed) in pieces."""
        left = size
        while left > 0:
            if kind == "text":
                piece = self._slice(self.text_pool, min(left, self.rng.randrange(512, 16384)))
            elif kind == "compressed":
                piece = self._slice(self.random_pool, min(left, PIECE))
            else:  # binary: code (random), padding (zeros), string tables (text)
                r = self.rng.random()
                n = min(left, self.rng.randrange(256, 8192))
                if r < 0.35:
                    piece = self._slice(self.random_pool, n)
                elif r < 0.65:
                    piece = bytes(n)
                else:
                    piece = self._slice(self.text_pool, n)
            left -= len(piece)
            yield piece


class _PieceReader:
    """A read() over an iterator of byte pieces, for ``TarFile.addfile``."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buf += piece
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


#: File kinds: (share of files, median size, extensions). Bytes come out near text 25%, binary 55%,
#: compressed 20% (a Python/ML image's site-packages), the whole payload ~2x under gzip -6.
_KINDS = (
    ("text", 0.60, 8 << 10, (".py", ".txt", ".json", ".h", ".md")),
    ("binary", 0.28, 40 << 10, (".so",)),
    ("compressed", 0.12, 32 << 10, (".gz", ".png", ".whl", ".zip")),
)
MAX_FILE = 64 << 20
FILES_PER_DIR = 150


def _pick_kind(r: float) -> tuple[str, int, tuple[str, ...]]:
    for kind, share, median, exts in _KINDS:
        if r < share:
            return kind, median, exts
        r -= share
    kind, _, median, exts = _KINDS[-1]
    return kind, median, exts


def fill_payload(tf: tarfile.TarFile, total_bytes: int, seed: int) -> int:
    """Write `total_bytes` of file data as a tree under ``opt/payload/``; return the entry count.

    Package directories of `FILES_PER_DIR` files each (``bin/``, ``lib/`` with a ``libN.so`` symlink per
    library, ``share/``, ``share/doc/`` with one hard link to a file of the package)."""
    gen = PayloadGenerator(seed)
    rng = gen.rng
    entries = 0

    def add(ti: tarfile.TarInfo, data: _PieceReader | None = None) -> None:
        nonlocal entries
        tf.addfile(ti, cast(IO[bytes] | None, data))  # addfile only calls read()
        entries += 1

    for d in ("opt", "opt/payload"):
        add(_new_tarinfo(d, tarfile.DIRTYPE, 0o755))
    written = 0
    pkg = 0
    while written < total_bytes:
        base = f"opt/payload/pkg{pkg:04d}"
        for sub in ("", "/bin", "/lib", "/share", "/share/doc"):
            add(_new_tarinfo(base + sub, tarfile.DIRTYPE, 0o755))
        first_file: str | None = None
        for i in range(FILES_PER_DIR):
            if written >= total_bytes:
                break
            kind, median, exts = _pick_kind(rng.random())
            size = min(MAX_FILE, int(median * math.exp(rng.gauss(0, 1.6))), total_bytes - written)
            link: str | None = None
            mode = 0o644
            if kind == "binary" and i % 4 == 0:
                path, mode = f"{base}/bin/tool{i:03d}", 0o755
            elif kind == "binary":
                path = f"{base}/lib/lib{i:03d}.so.1.{i % 7}"
                link = f"{base}/lib/lib{i:03d}.so"
            else:
                where = "share/doc" if kind == "text" and i % 5 == 0 else "share"
                path = f"{base}/{where}/f{i:03d}{rng.choice(exts)}"
            ti = _new_tarinfo(path, tarfile.REGTYPE, mode)
            ti.size = size
            add(ti, _PieceReader(gen.content(kind, size)))
            written += size
            first_file = first_file or path
            if link is not None:
                sym = _new_tarinfo(link, tarfile.SYMTYPE, 0o777)
                sym.linkname = os.path.basename(path)
                add(sym)
        if first_file is not None:
            hard = _new_tarinfo(
                f"{base}/share/doc/copy-of-{os.path.basename(first_file)}", tarfile.LNKTYPE, 0o644
            )
            hard.linkname = first_file
            add(hard)
        pkg += 1
    return entries


def fill_small_files(tf: tarfile.TarFile, total_bytes: int, count: int, seed: int) -> int:
    """`count` text files (source-code-like, ~4x under gzip) of `total_bytes` in all, sizes spread
    around the mean (log-normal), `FILES_PER_DIR` to a directory under ``opt/payload/``: the shape of
    a node_modules or site-packages layer, where the cost per file, not per byte, dominates."""
    gen = PayloadGenerator(seed)
    rng = gen.rng
    sizes = [math.exp(rng.gauss(0, 0.8)) for _ in range(count)]
    scale = total_bytes / sum(sizes)
    entries = 0
    for d in ("opt", "opt/payload"):
        tf.addfile(_new_tarinfo(d, tarfile.DIRTYPE, 0o755))
        entries += 1
    written = 0
    for i, rel in enumerate(sizes):
        if i % FILES_PER_DIR == 0:
            tf.addfile(_new_tarinfo(f"opt/payload/d{i // FILES_PER_DIR:04d}", tarfile.DIRTYPE, 0o755))
            entries += 1
        size = max(1, int(rel * scale)) if i < count - 1 else max(1, total_bytes - written)
        ti = _new_tarinfo(
            f"opt/payload/d{i // FILES_PER_DIR:04d}/f{i:05d}.{('py', 'txt', 'js')[i % 3]}",
            tarfile.REGTYPE,
            0o644,
        )
        ti.size = size
        tf.addfile(ti, cast(IO[bytes], _PieceReader(gen.content("text", size))))
        written += size
        entries += 1
    return entries


# -- the top layer --------------------------------------------------------------------------------


def fill_top(tf: tarfile.TarFile, variant: str) -> int:
    """A changed config file and a deleted one: ``etc/`` (as the base has it), ``etc/motd`` with new
    content, and the whiteout ``etc/.wh.issue.net`` (an empty file; OCI image-spec layer.md)."""
    tf.addfile(_new_tarinfo("etc", tarfile.DIRTYPE, 0o755))
    text = (
        f"Welcome to the damselfly {variant} test image.\nThis file was changed by the top layer.\n".encode()
    )
    motd = _new_tarinfo(TOP_CHANGED, tarfile.REGTYPE, 0o644)
    motd.size = len(text)
    tf.addfile(motd, io.BytesIO(text))
    head, _, tail = TOP_DELETED.rpartition("/")
    tf.addfile(_new_tarinfo(f"{head}/.wh.{tail}", tarfile.REGTYPE, 0o644))
    return 3


# -- the image ------------------------------------------------------------------------------------


def build_image(
    spec: ImageSpec,
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE,
    *,
    ref: str = "latest",
    quiet: bool = False,
) -> BuiltImage:
    """Return the image `spec` describes, building (under an exclusive lock) what the cache lacks."""
    spec.check()
    start = time.perf_counter()
    cache_path = Path(cache_dir).resolve()
    cache_path.mkdir(parents=True, exist_ok=True)
    ui = Ui(quiet)
    cache = LayerCache(cache_path, ui)
    with open(cache_path / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if spec.variant == "debian":
            base = build_debian_base(spec, cache, cache_path, ui)
        else:
            base = build_busybox_base(spec, cache, cache_path)
        if spec.target_mb is not None:
            # Tar overhead (512 B headers, padding) puts the payload's tar slightly above its file bytes.
            need = spec.target_mb * MB - base.uncompressed_size
            spec = replace(spec, payload_mb=max(0, math.ceil(need / MB)), target_mb=None)
        layers = [base]
        if spec.payload_mb > 0 and spec.small_files > 0:
            name = f"smallfiles-{_key('small', spec.small_files, spec.payload_mb, spec.seed, spec.gzip)}"
            info = cache.get(name)
            if info is None:
                created_by = (
                    f"payload: {spec.small_files} text files, {spec.payload_mb} MB, under /opt/payload "
                    f"(seed {spec.seed})"
                )
                ui.step(f"generating the small-files layer ({spec.small_files} files, {spec.payload_mb} MB)")
                size, count = spec.payload_mb * MB, spec.small_files
                info = cache.build(
                    name,
                    "payload",
                    created_by,
                    spec.gzip,
                    size,
                    lambda tf: fill_small_files(tf, size, count, spec.seed),
                )
            layers.append(info)
        elif spec.payload_mb > 0:
            name = f"payload-{_key('payload', spec.payload_mb, spec.seed, spec.gzip)}"
            info = cache.get(name)
            if info is None:
                created_by = (
                    f"payload: {spec.payload_mb} MB of generated files under /opt/payload (seed {spec.seed})"
                )
                ui.step(f"generating the payload layer ({spec.payload_mb} MB, gzip {spec.gzip})")
                size = spec.payload_mb * MB
                info = cache.build(
                    name, "payload", created_by, spec.gzip, size, lambda tf: fill_payload(tf, size, spec.seed)
                )
            layers.append(info)
        if spec.top_layer:
            name = f"top-{_key('top', spec.variant, spec.gzip)}"
            info = cache.get(name)
            if info is None:
                created_by = f"top: /{TOP_CHANGED} changed, /{TOP_DELETED} deleted"
                info = cache.build(
                    name, "top", created_by, spec.gzip, None, lambda tf: fill_top(tf, spec.variant)
                )
            layers.append(info)
        spec_doc = asdict(spec)
        spec_doc.pop("mirror")  # not part of the identity: any mirror serves the same suite
        if not spec.small_files:
            spec_doc.pop("small_files")  # images from before the field keep their keys
        key = _key("image", spec_doc, ref, [layer.name for layer in layers])
        layout = cache_path / f"{image_name(spec)}-{key[:12]}"
        summary = layout / "image.json"
        if summary.exists():
            cached = BuiltImage.from_json(
                json.loads(summary.read_text()), cached=True, seconds=time.perf_counter() - start
            )
            return replace(cached, layout_dir=str(layout))  # the cache may have moved
        image = write_layout(layout, spec, spec_doc, layers, cache, ref, start)
        ui.step(
            f"image {layout}: {len(layers)} layers, {image.uncompressed_size / MB:.1f} MB tar, "
            f"{image.compressed_size / MB:.1f} MB gzip, {image.seconds:.1f} s"
        )
        return image


def image_name(spec: ImageSpec) -> str:
    base = f"debian-{spec.suite}-python3" if spec.variant == "debian" else "busybox"
    small = f"-s{spec.small_files}" if spec.small_files else ""
    return f"{base}-p{spec.payload_mb}{small}{'-top' if spec.top_layer else ''}-{spec.gzip}"


def image_config(spec: ImageSpec, layers: list[LayerInfo]) -> dict[str, Any]:
    cmd = ["python3"] if spec.variant == "debian" else ["sh"]
    env = [ENV_PATH] + (["LANG=C.UTF-8"] if spec.variant == "debian" else [])
    return {
        "architecture": spec.arch,
        "os": "linux",
        "created": CREATED,
        "config": {"Env": env, "Cmd": cmd, "WorkingDir": "/"},
        "history": [{"created": CREATED, "created_by": layer.created_by} for layer in layers],
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
    }


def write_layout(
    layout: Path, spec: ImageSpec, spec_doc: dict[str, Any], layers: list[LayerInfo], cache: LayerCache,
    ref: str, start: float,
) -> BuiltImage:  # fmt: skip
    """Write the OCI layout under a temp name next to `layout` and rename it there when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{layout.name}-", dir=layout.parent))
    try:
        blobs = tmp / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for layer in layers:
            _link_or_copy(cache.blob_path(layer.name), blobs / layer.digest.removeprefix("sha256:"))
        config = json.dumps(image_config(spec, layers), sort_keys=True, separators=(",", ":")).encode()
        config_desc = Descriptor(OCI_CONFIG, _put_bytes(blobs, config), len(config))
        layer_descs = [Descriptor(OCI_LAYER_GZIP, Digest(layer.digest), layer.size) for layer in layers]
        manifest = build_manifest(config_desc, layer_descs, OCI_MANIFEST)
        manifest_digest = _put_bytes(blobs, manifest)
        entry = Descriptor(
            OCI_MANIFEST,
            manifest_digest,
            len(manifest),
            {REF_NAME: ref},
            Platform("linux", spec.arch),
        )
        write_file_atomic(tmp / "index.json", build_index([entry], OCI_INDEX))
        write_file_atomic(tmp / "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        image = BuiltImage(
            str(layout), ref, manifest_digest, config_desc.digest, spec_doc, tuple(layers),
            round(time.perf_counter() - start, 2), cached=False,
        )  # fmt: skip
        write_file_atomic(tmp / "image.json", json.dumps(image.to_json(), indent=1).encode())
        os.chmod(tmp, 0o755)
        if layout.exists():  # a leftover without image.json: incomplete by construction
            shutil.rmtree(layout)
        os.replace(tmp, layout)
        fsync_dir(layout.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return image


def _put_bytes(blobs: Path, data: bytes) -> Digest:
    digest = hashlib.sha256(data).hexdigest()
    write_file_atomic(blobs / digest, data)
    return Digest("sha256:" + digest)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(src, dst)


# -- CLI ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="build_debian_image",
        description=doc.split("\n\n")[0],
        epilog="The module docstring (scripts/build_debian_image.py) describes the layers and the cache.",
    )
    parser.add_argument("--variant", choices=("debian", "busybox"), default="debian", help="the base layer")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--payload-mb", type=int, default=0, help="MB of generated files in a payload layer (0: none)"
    )
    size.add_argument(
        "--target-mb", type=int, help="size the payload so the image holds >= this many MB of tar"
    )
    parser.add_argument("--no-top-layer", action="store_true", help="leave out the small top layer")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help=f"default: {DEFAULT_CACHE}")
    parser.add_argument("--ref", default="latest", help="the ref name in index.json (default: latest)")
    parser.add_argument(
        "--gzip", choices=sorted(GZIP_LEVELS), default="zlib", help="zlib level 6 (default) or isal level 3"
    )
    parser.add_argument("--suite", default=DEFAULT_SUITE, help=f"Debian suite (default: {DEFAULT_SUITE})")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror (default: {DEFAULT_MIRROR})")
    parser.add_argument("--seed", type=int, default=1, help="payload generator seed (default: 1)")
    parser.add_argument(
        "--small-files",
        type=int,
        default=0,
        metavar="N",
        help="the payload as N small text files (default: off)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the layout path")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    spec = ImageSpec(
        variant=args.variant, payload_mb=args.payload_mb, target_mb=args.target_mb,
        top_layer=not args.no_top_layer, suite=args.suite, mirror=args.mirror, gzip=args.gzip, seed=args.seed,
        small_files=args.small_files,
    )  # fmt: skip
    try:
        image = build_image(spec, args.cache_dir, ref=args.ref, quiet=args.quiet)
    except ImageBuildError as e:
        print(f"build_debian_image: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"build_debian_image: {e.filename or args.cache_dir}: {e.strerror or e}; check free space and "
              "permissions", file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps(image.to_json(), indent=1))
    else:
        if not args.quiet:
            state = "cached" if image.cached else f"built in {image.seconds:.1f} s"
            print(
                f"build_debian_image: {image.uncompressed_size / MB:.1f} MB tar, "
                f"{image.compressed_size / MB:.1f} MB gzip, {len(image.layers)} layers ({state}), "
                f"ref {image.ref}, manifest {image.manifest_digest}",
                file=sys.stderr,
            )
        print(image.layout_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
