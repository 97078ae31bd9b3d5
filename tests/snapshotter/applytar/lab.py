"""Building layer tars by code and reading applied trees back: shared by the applier's tests."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapshotter.convert.applytar import ApplyStats, apply_layer

MiB = 1 << 20
S = 1_000_000_000
T0 = 1_600_000_000 * S + 123_456_789  # lower layer times: distinct nanoseconds everywhere
T1 = 1_700_000_000 * S + 987_654_321  # upper layer times
#: VFS_CAP_REVISION_2 | effective, CAP_NET_BIND_SERVICE permitted (capability.h).
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


# -- building tars -------------------------------------------------------------------------------


@dataclass
class E:
    """One tar entry. `kind`: f(ile) d(ir) l(symlink) h(ardlink) c(har) b(lock) p(fifo), or a raw type."""

    name: str
    kind: str = "f"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    target: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        types = {"f": tarfile.REGTYPE, "d": tarfile.DIRTYPE, "l": tarfile.SYMTYPE, "h": tarfile.LNKTYPE}
        types |= {"c": tarfile.CHRTYPE, "b": tarfile.BLKTYPE, "p": tarfile.FIFOTYPE}
        ti.type = types.get(self.kind, self.kind.encode())
        ti.mode = self.mode if self.mode is not None else (0o755 if self.kind == "d" else 0o644)
        ti.uid, ti.gid = self.uid, self.gid
        ti.mtime = self.mtime // S
        ti.linkname = self.target
        ti.devmajor, ti.devminor = self.dev
        ti.size = len(self.data) if self.kind == "f" else 0
        ti.pax_headers = {"mtime": f"{self.mtime // S}.{self.mtime % S:09d}", **self.pax}
        for k, v in self.xattrs.items():
            ti.pax_headers[f"SCHILY.xattr.{k}"] = v.decode("utf-8", "surrogateescape")
        return ti


def make_tar(*entries: E, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for e in entries:
            tf.addfile(e.tarinfo(), io.BytesIO(e.data) if e.kind == "f" else None)
    return buf.getvalue()


def apply(root: Path, data: bytes, layer: str = "sha256:test", **kw: object) -> ApplyStats:
    return apply_layer(io.BytesIO(data), root, layer=layer, **kw)  # type: ignore[arg-type]


# -- reading trees back --------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = T0
    data: bytes | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


def file_(data: bytes = b"", mode: int = 0o644, mtime: int = T0, **kw: object) -> Node:
    return Node("f", mode, data=data, mtime=mtime, **kw)  # type: ignore[arg-type]


def dir_(mode: int = 0o755, mtime: int = T0, **kw: object) -> Node:
    return Node("d", mode, mtime=mtime, **kw)  # type: ignore[arg-type]


def link_(target: str, mtime: int = T0, **kw: object) -> Node:
    return Node("l", 0o777, target=target, mtime=mtime, **kw)  # type: ignore[arg-type]


def _walk(root: Path) -> Iterator[str]:
    stack = [""]
    while stack:
        rel = stack.pop()
        for name in sorted(os.listdir(root / rel if rel else root)):
            child = f"{rel}/{name}" if rel else name
            yield child
            if stat.S_ISDIR(os.lstat(root / child).st_mode):
                stack.append(child)


def tree(root: Path, skip: tuple[str, ...] = ("lost+found",)) -> dict[str, Node]:
    """Everything under root (type, mode, owner, mtime ns, content, link target, rdev, xattrs)."""
    out = {}
    for rel in _walk(root):
        if rel.split("/")[0] in skip:
            continue
        p = root / rel
        st = os.lstat(p)
        xattrs = tuple(
            sorted(
                (k, os.getxattr(p, k, follow_symlinks=False)) for k in os.listxattr(p, follow_symlinks=False)
            )
        )
        common = {"uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns, "xattrs": xattrs}
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            out[rel] = Node("f", mode, data=p.read_bytes(), **common)  # type: ignore[arg-type]
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = Node("d", mode, **common)  # type: ignore[arg-type]
        elif stat.S_ISLNK(st.st_mode):
            out[rel] = Node("l", 0o777, target=os.readlink(p), **common)  # type: ignore[arg-type]
        else:
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else "p"
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind != "p" else None
            out[rel] = Node(kind, mode, rdev=rdev, **common)  # type: ignore[arg-type]
    return out


def link_groups(root: Path) -> set[frozenset[str]]:
    """The sets of paths that are hard links of one inode (nlink > 1)."""
    by_ino: dict[int, set[str]] = {}
    for rel in _walk(root):
        st = os.lstat(root / rel)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            by_ino.setdefault(st.st_ino, set()).add(rel)
    return {frozenset(v) for v in by_ino.values()}


def assert_tree(root: Path, expected: dict[str, Node]) -> None:
    got = tree(root)
    assert sorted(got) == sorted(expected)
    for rel, node in expected.items():
        assert got[rel] == node, rel
