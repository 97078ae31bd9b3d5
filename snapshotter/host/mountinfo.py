"""The kernel's mount table (``/proc/<pid>/mountinfo``, proc(5)), read back rather than remembered.

A restarted process (or a test teardown) sees exactly what an earlier one left mounted. Fields are
split on spaces with the kernel's ``\\ooo`` escapes decoded (space, tab, newline and backslash in
paths). `find_mount` resolves only the parent of the target: resolving the mount point itself would
stat the mounted root, which hangs on a FUSE filesystem whose server is stuck — exactly when we want
to unmount it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import MountError

_OCTAL_RE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/<pid>/mountinfo`` (proc(5)), with escapes decoded."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the path inside the filesystem that is mounted here
    mount_point: str
    options: tuple[str, ...]  # per-mount options (ro, nosuid, relatime, ...)
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per-superblock options (ro, norecovery, lowerdir=..., ...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo (fs/proc_namespace.c, mangle()).
    return os.fsdecode(_OCTAL_RE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes, where: str = "mountinfo") -> list[MountInfo]:
    """Parse the text of a mountinfo file."""
    out = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major),
                    minor=int(minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=tuple(_unescape(fields[5]).split(",")),
                    optional=tuple(_unescape(f) for f in fields[6:sep]),
                    fstype=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(_unescape(fields[sep + 3]).split(","))
                    if sep + 3 < len(fields)
                    else (),
                )
            )
        except (ValueError, IndexError):
            raise MountError(
                f"parse {where} line {lineno}",
                [],
                None,
                f"unexpected line {line!r}",
                "report this bug with the line",
            ) from None
    return out


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mount table of process `pid` (default: ours), in the kernel's order (parents first)."""
    path = f"/proc/{pid}/mountinfo"
    with open(path, "rb") as f:
        return parse_mountinfo(f.read(), path)


def canonical(target: str | os.PathLike[str]) -> str:
    """The absolute path the kernel shows for a mount at `target`.

    Only the parent is resolved: resolving the mount point itself would stat the mounted root, which
    hangs on a FUSE filesystem whose server is stuck — exactly when we want to unmount it.
    """
    path = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def find_mount(target: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at `target` (the last one mounted there), or None."""
    where = canonical(target)
    found = None
    for m in mountinfo():
        if m.mount_point == where:
            found = m
    return found


def is_mounted(target: str | os.PathLike[str]) -> bool:
    return find_mount(target) is not None
