"""`damselfly convert --prefetch-files`: a list of paths, resolved to the device ranges that hold them.

overlaybd's priority list, as a trace (`blockformat.trace`, source ``files``): after an image's layers
are converted, its whole chain is attached read-only through the conversion's device daemon,
loop-mounted ext4 ``ro,noload``, and every regular file a pattern names is mapped to its blocks on the
device with ``FS_IOC_FIEMAP`` (ext4 on a loop device reports physical extents as byte offsets of that
device: exactly the ranges a container's reads of the file will ask for). The trace is pushed like a
recorded one and replayed at the chain mount.

Patterns are paths inside the image: ``/usr/lib/python3.11`` (a directory means every file below it),
``/usr/bin/python3*`` (``fnmatch`` on the whole path, ``*`` crossing ``/``), ``/`` or ``*`` (everything).
Symlinks are not followed (a link's target is the host's when resolved here), only regular files of this
filesystem count, and files come in the order of the patterns, then path order, so the same image and
list give the same trace.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import stat
import struct
from collections.abc import Iterator, Sequence

from blockformat.digest import Digest
from blockformat.trace import MAX_RANGES, RangeSet, Trace, clip

from ..device.client import DeviceClient
from ..device.manager import DeviceSpec, LayerSpec, SourceSpec
from ..errors import ConvertError
from ..host.mounts import mount_loop, umount_loop
from .ext4layer import LowerBlob

log = logging.getLogger(__name__)

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_ENCODED = 0x8
_HEADER = struct.Struct(
    "=QQIIII"
)  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, reserved64[2], flags, reserved[3]
EXTENTS_PER_CALL = 256
#: At most this many patterns, and of this length.
MAX_PATTERNS = 1000
MAX_PATTERN = 4096


def check_patterns(patterns: Sequence[str]) -> list[str]:
    """Patterns as paths relative to the image root; `ConvertError` for what cannot be one."""
    if len(patterns) > MAX_PATTERNS:
        raise ConvertError(
            f"at most {MAX_PATTERNS} --prefetch-files patterns, not {len(patterns)}",
            "name directories or globs",
        )
    out = []
    for p in patterns:
        if not p or len(p) > MAX_PATTERN or "\0" in p:
            raise ConvertError(
                f"--prefetch-files: {p[:80]!r} is not a path in the image", "name paths like /usr/bin"
            )
        rel = p.strip().lstrip("/").rstrip("/")
        if any(part == ".." for part in rel.split("/")):
            raise ConvertError(
                f"--prefetch-files: {p!r} climbs out of the image with '..'", "name absolute paths"
            )
        out.append("*" if rel in ("", "*") else rel)
    return out


def _matches(rel: str, pattern: str) -> bool:
    return pattern in ("*", rel) or rel.startswith(pattern + "/") or fnmatch.fnmatchcase(rel, pattern)


def _files(root: str) -> list[str]:
    """Every regular file of the filesystem at `root`, relative, in path order; no link is followed."""
    dev = os.lstat(root).st_dev
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_dev == dev and st.st_size > 0:
                out.append(os.path.relpath(path, root))
    return sorted(out)


def extents(path: str) -> Iterator[tuple[int, int]]:
    """(device offset, length) of the file's data, in file order (FIEMAP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(_HEADER.size + EXTENTS_PER_CALL * _EXTENT.size)
            _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, EXTENTS_PER_CALL, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            mapped = _HEADER.unpack_from(buf, 0)[3]
            if mapped == 0:
                return
            last = False
            for k in range(mapped):
                logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(
                    buf, _HEADER.size + k * _EXTENT.size
                )
                if not flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_ENCODED):
                    yield physical, length
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if last:
                return
    finally:
        os.close(fd)


def resolve(
    daemon: DeviceClient, work_dir: str, name: str, lowers: Sequence[LowerBlob], patterns: Sequence[str]
) -> Trace:
    """The trace of the files `patterns` name in the image whose converted layers are `lowers`."""
    wanted = check_patterns(patterns)
    spec = DeviceSpec(
        name, [LayerSpec(Digest(b.digest), b.size, b.index_digest, SourceSpec(path=b.path)) for b in lowers]
    )
    mnt = os.path.join(work_dir, f"{name}-mnt")
    os.makedirs(mnt, exist_ok=True)
    device = daemon.attach(spec)
    ranges = RangeSet()
    files = 0
    vsize = 0
    try:
        vsize = os.stat(device).st_size
        mount_loop(device, mnt, "ext4", ("ro", "noload", "nosuid", "nodev", "noexec"))
        try:
            every = _files(mnt)
            seen: set[str] = set()
            for pattern in wanted:
                hits = [rel for rel in every if rel not in seen and _matches(rel, pattern)]
                if not hits:
                    log.warning("--prefetch-files: nothing in the image matches %r", "/" + pattern)
                for rel in hits:
                    seen.add(rel)
                    files += 1
                    for offset, length in extents(os.path.join(mnt, rel)):
                        ranges.add(offset, length)
                    if len(ranges) > MAX_RANGES:
                        raise ConvertError(
                            f"--prefetch-files names files in more than {MAX_RANGES} pieces",
                            "name fewer files",
                        )
        finally:
            umount_loop(mnt)
    finally:
        with contextlib.suppress(Exception):
            daemon.detach(name, timeout=60)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
    trace = Trace(tuple(Digest(b.digest) for b in lowers), vsize, tuple(clip(ranges.runs, vsize)), "files")
    log.info(
        "--prefetch-files: %d files, %d ranges, %d bytes of the device", files, len(trace.ranges), trace.total
    )
    return trace
