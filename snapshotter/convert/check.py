"""`damselfly check SRC CONVERTED`: does a converted image hold exactly the source image's tree?

For every chosen platform (``--platform``, as `damselfly convert` chooses them)::

    SRC ── plan (platforms, configs, diff_ids) ── every layer, bottom to top:
        stream (digest-checked, gzip/zstd decoded; its tar digest checked against the diff_id)
        └─ apply_layer (containerd's rules: whiteouts, opaque dirs, hardlinks, xattrs, devices...)
           onto a fresh ext4 (sparse file in the work dir, loop, rw; mkfs's lost+found removed first)
    CONVERTED ── the platform's manifest, its damselfly layers (blob digests checked as spooled)
        └─ a private device daemon ── the chain's device ── loop ── ext4 ro,noload,nosuid,nodev,noexec
    both trees walked at once (`treewalk.snapshot`, one thread each), compared entry by entry

The source is unpacked onto ext4 — the filesystem the converter builds on — so that what ext4 itself
decides (which xattrs a symlink may carry, nanosecond times, the epoch for times before 1970) is the
same on both sides and only what the conversion did can differ. The applier is the converter's own
(`applytar`); what it does against containerd's is tested separately (tests/e2e).

Compared per path: type, mode (with setuid/setgid/sticky), owner, size, SHA-256 of regular files,
symlink targets, device numbers, every xattr (``trusted.*`` too: we run as root), mtime with
nanoseconds, and which paths are one inode (hard links). `IGNORED` lists what is not compared, and
why; docs/convert.md ("Checking a conversion") says the same for users.

Everything made on the way — the work directory, its sparse image file, mounts, loop devices, the
private daemon — is removed when the check ends, also on an error, Ctrl-C or SIGTERM (`release_mounts`
by exact path, the daemon by pid). A walk reading a mount is stopped and joined before the mount goes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from blockformat.annotations import MEDIA_TYPES_LAYER
from blockformat.digest import Digest
from p2p.hosts import RegistrySettings, Resolver
from p2p.manifest import Descriptor, Manifest, Platform

from ..device.client import DeviceClient
from ..device.manager import DeviceSpec, LayerSpec, SourceSpec
from ..errors import ConvertError, ImageError, LayerError
from ..host.mkfs import mkfs_ext4
from ..host.mountinfo import mountinfo
from ..host.mounts import mount_loop, umount_loop
from ..image.blockimage import layer_annotations
from ..image.documents import DirectoryFiles
from ..image.ocilayout import blob_name
from .applytar import apply_layer
from .ext4layer import private_daemon, release_mounts
from .ext4meta import FAKE_TIME
from .layerstream import CHUNK, check_diff_id, open_layer_stream
from .plan import PlatformPlan, plan
from .sources import ImageSource, LayoutSource, VerifiedReader, open_source
from .treewalk import ROOT, PathDifference, Tree, WalkStats, differences, hardlink_differences, snapshot

log = logging.getLogger(__name__)

#: Where the work directory goes by default: on disk (not a tmpfs /tmp), since the source image is
#: unpacked there.
DEFAULT_WORK_DIR = "/var/tmp"

NEEDS_ROOT = (
    "damselfly check needs root: it unpacks the source image onto a loop-mounted ext4 (owners, device "
    "nodes, trusted.* xattrs) and mounts the converted image through a private device daemon "
    "(mount, losetup and /dev/fuse need CAP_SYS_ADMIN)"
)

#: What is not compared, and why (docs/convert.md, "Checking a conversion", says the same).
IGNORED = {
    "root times": "the root directory's mtime: the image's only if it has an entry for '/', else mkfs's "
    "fixed time on the converted side (containerd gives the root a time of its own too)",
    "atime, ctime, crtime": "an image sets no change or birth times; the converter pins them to the "
    "mtime (reproducible blobs), and the read-only mount never updates atimes",
    "directory sizes, link counts": "they follow the filesystem's history (entries removed by later "
    "layers), not the image; hard links are compared as groups of paths instead",
}

#: The source's ext4 while layers are applied onto it: only root reaches it (a 0700 work directory),
#: and still nosuid,nodev: its setuid binaries and device nodes are the image's.
SOURCE_MOUNT_OPTIONS = ("rw", "nosuid", "nodev", "noatime")
#: The converted image, as `damselfly mount` mounts it, and never executed from.
CONVERTED_MOUNT_OPTIONS = ("ro", "noload", "nosuid", "nodev", "noexec")
#: At most this many characters of an xattr value in a difference.
_VALUE_CHARS = 40


@dataclass(frozen=True)
class CheckOptions:
    platforms: tuple[str, ...] = ()  # empty: linux/amd64; ("all",): every platform of an index
    plain_http: bool | None = None
    #: Where the work directory is made (the source is unpacked there: room for the whole image).
    work_dir: str = DEFAULT_WORK_DIR
    registry: RegistrySettings = field(default_factory=RegistrySettings)


@dataclass(frozen=True)
class Difference:
    """One way a path of the converted image differs from the source's: `path` relative to the root
    (``.`` is the root), `what` in words (source value first)."""

    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class PlatformCheck:
    platform: str
    differences: list[Difference]
    entries: int  # paths compared (those of either side)
    bytes_hashed: int  # file bytes read and hashed, both sides
    seconds: float


@dataclass
class CheckResult:
    platforms: list[PlatformCheck]
    seconds: float

    @property
    def equal(self) -> bool:
        return not any(p.differences for p in self.platforms)

    @property
    def entries(self) -> int:
        return sum(p.entries for p in self.platforms)

    @property
    def bytes_hashed(self) -> int:
        return sum(p.bytes_hashed for p in self.platforms)


#: Told what the check is doing, one line at a time (a CLI prints it unless --quiet).
Progress = Callable[[str], None]


def _no_progress(message: str) -> None:
    pass


# -- differences in words -------------------------------------------------------------------------


def _time(ns: int | None) -> str:
    if ns is None:
        return "-"
    sec, frac = divmod(ns, 1_000_000_000)
    when = datetime.datetime.fromtimestamp(sec, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{when}.{frac:09d}Z"


def _value(v: bytes | None) -> str:
    if v is None:
        return "(none)"
    text = repr(v)
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def describe(d: PathDifference) -> str:
    """What differs at one path, in words, the source's value first."""
    if d.got is None:
        assert d.want is not None
        return f"missing in converted ({d.want.describe()})"
    if d.want is None:
        return f"only in converted ({d.got.describe()})"
    w, g = d.want, d.got
    parts = []
    for name in d.fields:
        if name == "kind":
            parts.append(f"type {w.kind} != {g.kind}")
        elif name == "mode":
            parts.append(f"mode {w.mode:04o} != {g.mode:04o}")
        elif name == "uid" or (name == "gid" and "uid" not in d.fields):
            parts.append(f"owner {w.uid}:{w.gid} != {g.uid}:{g.gid}")
        elif name == "mtime_ns":
            parts.append(f"mtime {_time(w.mtime_ns)} != {_time(g.mtime_ns)}")
        elif name == "size":
            parts.append(f"size {w.size} != {g.size}")
        elif name == "sha256":
            parts.append(f"content sha256:{w.sha256} != sha256:{g.sha256}")
        elif name == "target":
            parts.append(f"symlink target {w.target!r} != {g.target!r}")
        elif name == "rdev":
            a, b = w.rdev or (0, 0), g.rdev or (0, 0)
            parts.append(f"device {a[0]}:{a[1]} != {b[0]}:{b[1]}")
        elif name == "xattrs":
            wx, gx = dict(w.xattrs), dict(g.xattrs)
            for key in sorted(wx.keys() | gx.keys()):
                if wx.get(key) != gx.get(key):
                    parts.append(f"xattr {key} {_value(wx.get(key))} != {_value(gx.get(key))}")
    return "; ".join(parts)


def compare(want: Tree, got: Tree) -> list[Difference]:
    """Every difference of `got` (the converted tree) from `want` (the source's), by path."""
    out = [Difference(d.path, describe(d)) for d in differences(want, got)]
    only_want, only_got = hardlink_differences(want, got)
    sides = [(g, "the source", "converted") for g in only_want] + [
        (g, "converted", "the source") for g in only_got
    ]
    for group, here, there in sides:
        first, *others = sorted(group)
        out.append(Difference(first, f"one inode with {', '.join(others)} in {here}, not in {there}"))
    return sorted(out, key=lambda x: x.path.split("/"))


def _without_root_times(tree: Tree) -> Tree:
    if ROOT not in tree:
        return tree
    return Tree({**tree.nodes, ROOT: replace(tree[ROOT], mtime_ns=None)}, tree.hardlinks)


# -- the check ------------------------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise ConvertError(
            NEEDS_ROOT, "run it as root, or in a privileged CI job with /dev/fuse and loop devices"
        )


class _Hashing:
    """A tar stream that hashes what it passes on (its digest is the layer's diff_id)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self.hash.update(data)
        return data


@contextlib.contextmanager
def _work_dir(base: str) -> Iterator[str]:
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="damselfly-check-", dir=base)  # 0700
    try:
        yield work
    finally:
        release_mounts(work)
        prefix = os.path.realpath(work) + os.sep
        left = [m.mount_point for m in mountinfo() if m.mount_point.startswith(prefix)]
        if left:  # never remove files through a mount that is still there
            log.error("not removing %s: still mounted below it: %s", work, ", ".join(left))
        else:
            shutil.rmtree(work, ignore_errors=True)


def _remove_lost_found(root: str) -> None:
    """mkfs's ``lost+found``, as the converter removes it before the bottom layer (root keeps its times)."""
    st = os.lstat(root)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(os.path.join(root, "lost+found"))
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))


class Checker:
    def __init__(self, options: CheckOptions, progress: Progress | None = None) -> None:
        require_root()
        self.options = options
        self.progress = progress or _no_progress

    def run(self, src: str, converted: str) -> CheckResult:
        started = time.monotonic()
        opts = self.options
        with _work_dir(opts.work_dir) as work:
            resolver = Resolver(opts.registry)
            with contextlib.ExitStack() as stack:
                source = open_source(src, plain_http=opts.plain_http, spool_dir=work, resolver=resolver)
                stack.callback(source.close)
                target = open_source(converted, plain_http=opts.plain_http, spool_dir=work, resolver=resolver)
                stack.callback(target.close)
                pairs = self._pairs(source, target)
                results = []
                with private_daemon(os.path.join(work, "devd")) as daemon:
                    try:
                        for k, (p, manifest, where) in enumerate(pairs):
                            checked = self._platform(daemon, work, k, source, p, target, manifest, where)
                            results.append(checked)
                    finally:
                        release_mounts(work)  # the loop devices over the daemon's files go first
        return CheckResult(results, time.monotonic() - started)

    # -- which images ---------------------------------------------------------------------------

    def _pairs(self, source: ImageSource, target: ImageSource) -> list[tuple[PlatformPlan, Manifest, str]]:
        """Each chosen platform of the source, with the converted image's manifest for it."""
        top = source.top()
        if isinstance(top.doc, Manifest) and any(d.media_type in MEDIA_TYPES_LAYER for d in top.doc.layers):
            raise ImageError(
                top.where,
                "is a damselfly image (its layers are block layers), not a source image",
                "the arguments are SRC CONVERTED: the image given to `damselfly convert`, then its output",
            )
        plans = plan(source, top.doc, self.options.platforms, top.where)
        ttop = target.top()
        out = []
        for p in plans:
            if isinstance(ttop.doc, Manifest):
                if len(plans) > 1:
                    raise ImageError(
                        ttop.where,
                        f"is one image, but {len(plans)} platforms of {source.name} are to be checked",
                        "pick one with --platform",
                    )
                out.append((p, ttop.doc, ttop.where))
                continue
            wanted = _platform_of(p)
            desc = ttop.doc.select(wanted, ttop.where)
            out.append((p, target.manifest(desc), f"{target.name}@{desc.digest}"))
        return out

    # -- one platform ---------------------------------------------------------------------------

    def _platform(
        self,
        daemon: DeviceClient,
        work: str,
        k: int,
        source: ImageSource,
        p: PlatformPlan,
        target: ImageSource,
        manifest: Manifest,
        where: str,
    ) -> PlatformCheck:
        started = time.monotonic()
        label = p.label
        layers = self._converted_layers(target, manifest, where, work, label)
        vsizes = {x.vsize for x in layers}
        if len(vsizes) != 1:
            raise ImageError(where, f"its layers disagree on the device size: {sorted(map(str, vsizes))}")
        vsize = vsizes.pop()
        assert vsize is not None
        image = os.path.join(work, f"source-{k}.img")
        src_mnt = os.path.join(work, f"source-{k}")
        conv_mnt = os.path.join(work, f"converted-{k}")
        name = f"check-{os.getpid()}-{k}"
        os.makedirs(src_mnt)
        os.makedirs(conv_mnt)
        try:
            # The source: the same ext4 the converter starts from (size, mkfs time, no lost+found).
            mkfs_ext4(image, vsize, fake_time=FAKE_TIME, metadata_csum=False)
            mount_loop(image, src_mnt, "ext4", SOURCE_MOUNT_OPTIONS)
            _remove_lost_found(src_mnt)
            n = len(p.manifest.layers)
            for i, desc in enumerate(p.manifest.layers):
                self.progress(f"{label}: applying source layer {i + 1}/{n} {desc.digest[:19]}")
                self._apply(source, desc, p.diff_ids[i], i, src_mnt)
            # The converted image, as `damselfly mount` mounts it.
            self.progress(f"{label}: mounting the converted image ({len(layers)} layers)")
            device = daemon.attach(DeviceSpec(name, layers))
            mount_loop(device, conv_mnt, "ext4", CONVERTED_MOUNT_OPTIONS)
            self.progress(f"{label}: comparing")
            want, got, stats = _snapshots(src_mnt, conv_mnt)
            found = compare(_without_root_times(want), _without_root_times(got))
        finally:
            for mnt in (conv_mnt, src_mnt):
                with contextlib.suppress(Exception):  # release_mounts is the safety net
                    umount_loop(mnt)
            with contextlib.suppress(Exception):
                daemon.detach(name, timeout=60)
            with contextlib.suppress(OSError):
                os.unlink(image)
        entries = len(want.nodes.keys() | got.nodes.keys())
        hashed = sum(s.bytes_hashed for s in stats)
        return PlatformCheck(label, found, entries, hashed, time.monotonic() - started)

    def _apply(self, source: ImageSource, desc: Descriptor, diff_id: str, i: int, root: str) -> None:
        layer = f"{i} ({desc.digest})"
        with source.open_layer(desc, layer) as blob:
            tar = _Hashing(open_layer_stream(blob, desc.media_type, layer=layer))
            apply_layer(tar, root, layer=layer)
            blob.drain()
            if not blob.verified:
                raise LayerError(layer, None, "the blob was not read to its end", "report this as a bug")
        got = "sha256:" + tar.hash.hexdigest()
        remedy = "the source image's config does not describe this layer; rebuild the image"
        check_diff_id(layer, got, diff_id, remedy)

    def _converted_layers(
        self, target: ImageSource, manifest: Manifest, where: str, work: str, label: str
    ) -> list[LayerSpec]:
        """The converted image's layers as a device chain: each blob's digest checked, on local disk."""
        if not manifest.layers:
            raise ImageError(where, "the converted image has no layers")
        out = []
        n = len(manifest.layers)
        for i, desc in enumerate(manifest.layers):
            if desc.media_type not in MEDIA_TYPES_LAYER:
                raise ImageError(
                    where,
                    f"layer {i} ({desc.digest}, {desc.media_type}) is not a damselfly layer",
                    "CONVERTED must be the output of `damselfly convert` (the arguments are SRC CONVERTED)",
                )
            ann = layer_annotations(where, i, desc)
            if ann.fstype != "ext4":
                raise ImageError(where, f"layer {i} ({desc.digest}) holds {ann.fstype!r}, not ext4")
            self.progress(f"{label}: reading converted layer {i + 1}/{n} {desc.digest[:19]}")
            path = self._local_blob(target, desc, f"converted {i} ({desc.digest})", work)
            out.append(
                LayerSpec(Digest(desc.digest), desc.size, ann.index_digest, SourceSpec(path=path), ann.vsize)
            )
        return out

    @staticmethod
    def _local_blob(target: ImageSource, desc: Descriptor, layer: str, work: str) -> str:
        """A local file of the blob `desc`, its digest checked: a layout directory's own file, or a copy
        in the work directory (from a registry or an archive)."""
        if isinstance(target, LayoutSource) and isinstance(target.layout.files, DirectoryFiles):
            path = target.layout.files.where(blob_name(desc.digest))
            with open(path, "rb") as f:
                VerifiedReader(f, desc, layer).drain()
            return path
        path = os.path.join(work, "blobs", desc.digest.partition(":")[2])
        if os.path.exists(path):  # a layer two platforms share
            return path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with target.open_layer(desc, layer) as blob, open(path + ".part", "wb") as out:
            while piece := blob.read(CHUNK):
                out.write(piece)
            if not blob.verified:
                raise LayerError(layer, None, "the blob was not read to its end", "report this as a bug")
        os.replace(path + ".part", path)
        return path


def _platform_of(p: PlatformPlan) -> Platform:
    """The platform a source image is for: its index entry's, else its config's."""
    if p.desc is not None and p.desc.platform is not None:
        return p.desc.platform
    os_name, arch = p.config.get("os"), p.config.get("architecture")
    variant = p.config.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str):
        return Platform("linux", "amd64")
    return Platform(os_name, arch, variant if isinstance(variant, str) and variant else None)


def _snapshots(src_mnt: str, conv_mnt: str) -> tuple[Tree, Tree, tuple[WalkStats, WalkStats]]:
    """Both trees, walked at once (one thread each: the converted side waits on the device daemon,
    the source side on the disk; hashing releases the GIL). An interrupt stops both walks, and
    returns only once neither reads its mount any more."""
    cancel = threading.Event()
    stats = (WalkStats(), WalkStats())
    pool = ThreadPoolExecutor(2, thread_name_prefix="damselfly-check")
    try:
        futures = [
            pool.submit(snapshot, root, include_root=True, cancel=cancel, stats=s)
            for root, s in ((src_mnt, stats[0]), (conv_mnt, stats[1]))
        ]
        want, got = (f.result() for f in futures)
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return want, got, stats


def check(src: str, converted: str, options: CheckOptions, progress: Progress | None = None) -> CheckResult:
    """Compare image `src` unpacked with the converted image `converted`; see the module docstring."""
    return Checker(options, progress).run(src, converted)


__all__ = ["IGNORED", "CheckOptions", "CheckResult", "Difference", "PlatformCheck", "check", "compare"]
