"""A mounted tree as a comparable value, and the differences of two of them.

`snapshot(root)` records, per path relative to `root` (``/``-separated, names as ``os.fsdecode`` gives
them; the root itself is ``"."`` when asked for): the type, the mode bits with setuid/setgid/sticky,
owner, mtime in nanoseconds, size and SHA-256 of regular files, symlink targets, device numbers, every
extended attribute (all namespaces the caller may read: ``trusted.*`` needs CAP_SYS_ADMIN), and the
groups of paths that are one inode (hard links). `differences` lists, path by path, which of those
differ; `hardlink_differences` which groups of names are one inode on one side only.

Nothing is followed: symlinks are read with ``lstat``/``readlink``, and the walk never enters a
symlinked directory nor another filesystem mounted below `root`. Directory sizes and link counts are
left out (they depend on the filesystem's history, not on the image), and so are atimes and ctimes.

Files are hashed in 1 MiB pieces (never whole in memory). A walk can be stopped from another thread
with `cancel` (checked between pieces): `WalkCancelledError` is raised, so a caller can unmount what the
walk was reading once the walking thread has returned.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace

ROOT = "."
#: The piece files are hashed in.
PIECE = 1 << 20

#: The fields of `Node`, in the order differences are reported.
NODE_FIELDS = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "sha256", "target", "rdev", "xattrs")


@dataclass(frozen=True)
class Node:
    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits with setuid/setgid/sticky (stat.S_IMODE)
    uid: int
    gid: int
    mtime_ns: int | None  # None: not compared (see `snapshot(dir_mtimes=...)`)
    size: int  # files and symlinks; 0 for the rest
    sha256: str | None = None  # files: hex digest
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # char and block devices: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...] = ()  # sorted by name

    def describe(self) -> str:
        extra = {"file": self.sha256 and self.sha256[:12], "symlink": self.target, "char": self.rdev}
        extra["block"] = self.rdev
        more = extra.get(self.kind)
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid}" + (f" {more}" if more else "")


def _matcher(paths: Iterable[str]) -> Callable[[str], bool]:
    prefixes = tuple(p.strip("/") for p in paths)

    def match(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in prefixes)

    return match


@dataclass(frozen=True)
class Tree:
    nodes: dict[str, Node]
    hardlinks: frozenset[frozenset[str]]  # paths sharing one inode, groups of two or more

    def __getitem__(self, path: str) -> Node:
        return self.nodes[path]

    def __contains__(self, path: object) -> bool:
        return path in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def paths(self) -> list[str]:
        return sorted(self.nodes)

    def without(self, *paths: str) -> Tree:
        """The tree without `paths` and everything below them (and without their hardlink entries)."""
        gone = _matcher(paths)
        nodes = {p: n for p, n in self.nodes.items() if not gone(p)}
        links = {frozenset(p for p in g if not gone(p)) for g in self.hardlinks}
        return Tree(nodes, frozenset(g for g in links if len(g) > 1))

    def without_xattrs(self, *prefixes: str) -> Tree:
        """The tree with the xattrs whose names start with one of `prefixes` left out (e.g.
        ``"trusted."``, which containerd 1.6 never applies from a layer)."""
        nodes = {
            p: replace(n, xattrs=tuple(x for x in n.xattrs if not x[0].startswith(prefixes)))
            for p, n in self.nodes.items()
        }
        return Tree(nodes, self.hardlinks)


class WalkCancelledError(Exception):
    """`snapshot` was stopped through its `cancel` event."""


@dataclass
class WalkStats:
    """What a walk did; one per walking thread (``+=`` on an attribute is not atomic)."""

    entries: int = 0
    files: int = 0
    bytes_hashed: int = 0


_KINDS = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"unknown({stat.S_IFMT(mode):o})"


def file_sha256(path: str, *, cancel: threading.Event | None = None, stats: WalkStats | None = None) -> str:
    """The hex SHA-256 of the file at `path` (not followed if a symlink), read in `PIECE`s."""
    h = hashlib.sha256()
    buf = bytearray(PIECE)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while n := os.readv(fd, [buf]):
            if cancel is not None and cancel.is_set():
                raise WalkCancelledError(path)
            h.update(view[:n])
            if stats is not None:
                stats.bytes_hashed += n
    finally:
        os.close(fd)
    return h.hexdigest()


def read_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    """Every extended attribute of `path` (not followed), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # a filesystem without xattrs
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as e:  # listed but unreadable: record why, so a difference shows
            out.append((name, f"<{os.strerror(e.errno or 0)}>".encode()))
    return tuple(out)


def walk(top: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below `top`, depth first, sorted by name; symlinks and
    other filesystems' mount points are not entered."""
    dev = os.lstat(top).st_dev
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield child, st
            if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
                stack.append(child)


def node_of(
    path: str,
    st: os.stat_result,
    *,
    mtime: bool = True,
    mtime_unit_ns: int = 1,
    cancel: threading.Event | None = None,
    stats: WalkStats | None = None,
) -> Node:
    """The `Node` of `path`, whose ``lstat`` is `st`; a regular file is hashed."""
    kind = kind_of(st.st_mode)
    node = Node(
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns // mtime_unit_ns * mtime_unit_ns if mtime else None,
        st.st_size if kind in ("file", "symlink") else 0,
        xattrs=read_xattrs(path),
    )
    if stats is not None:
        stats.entries += 1
    if kind == "file":
        if stats is not None:
            stats.files += 1
        return replace(node, sha256=file_sha256(path, cancel=cancel, stats=stats))
    if kind == "symlink":
        return replace(node, target=os.readlink(path))
    if kind in ("char", "block"):
        return replace(node, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
    return node


def snapshot(
    root: str | os.PathLike[str],
    *,
    ignore: Sequence[str] = (),
    include_root: bool = False,
    dir_mtimes: bool = True,
    mtimes: bool = True,
    mtime_unit_ns: int = 1,
    cancel: threading.Event | None = None,
    stats: WalkStats | None = None,
) -> Tree:
    """The tree below `root` (see the module docstring).

    `ignore`: relative paths left out with everything below them. `include_root`: also record the root
    directory itself as ``"."``. `dir_mtimes`/`mtimes`: record directory (or all) mtimes; when off they
    compare equal. `mtime_unit_ns`: round mtimes down to this unit (``10**9`` for a copy that keeps
    whole seconds). `cancel`: stops the walk (`WalkCancelledError`); `stats`: counts entries and bytes.
    """
    top = os.fspath(root)
    skip = _matcher(ignore)
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    if include_root:
        nodes[ROOT] = node_of(
            top, os.lstat(top), mtime=mtimes and dir_mtimes, mtime_unit_ns=mtime_unit_ns, stats=stats
        )
    for rel, st in walk(top):
        if cancel is not None and cancel.is_set():
            raise WalkCancelledError(rel)
        if skip(rel):
            continue
        path = os.path.join(top, rel)
        is_dir = stat.S_ISDIR(st.st_mode)
        nodes[rel] = node_of(
            path,
            st,
            mtime=mtimes and (dir_mtimes or not is_dir),
            mtime_unit_ns=mtime_unit_ns,
            cancel=cancel,
            stats=stats,
        )
        if not is_dir and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    links = frozenset(frozenset(g) for g in inodes.values() if len(g) > 1)
    return Tree(dict(sorted(nodes.items())), links)


@dataclass(frozen=True)
class PathDifference:
    """One path whose entries differ: `want` or `got` is None when the path is on one side only;
    `fields` names the `Node` fields that differ otherwise (only ``kind`` when the types differ)."""

    path: str
    want: Node | None
    got: Node | None
    fields: tuple[str, ...] = ()


def differences(want: Tree, got: Tree, *, every_field: bool = False) -> list[PathDifference]:
    """The paths where `got` differs from `want`, sorted by path.

    When the types differ only ``kind`` is named (a file's and a directory's modes say little of each
    other), unless `every_field`.
    """
    assert tuple(f.name for f in fields(Node)) == NODE_FIELDS
    out = []
    for path in sorted(want.nodes.keys() | got.nodes.keys()):
        w, g = want.nodes.get(path), got.nodes.get(path)
        if w == g:
            continue
        if w is None or g is None:
            out.append(PathDifference(path, w, g))
            continue
        if w.kind != g.kind and not every_field:
            out.append(PathDifference(path, w, g, ("kind",)))
            continue
        out.append(
            PathDifference(path, w, g, tuple(f for f in NODE_FIELDS if getattr(w, f) != getattr(g, f)))
        )
    return out


def hardlink_differences(want: Tree, got: Tree) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """(groups of one inode only in `want`, groups only in `got`), each sorted."""
    return (
        sorted(want.hardlinks - got.hardlinks, key=sorted),
        sorted(got.hardlinks - want.hardlinks, key=sorted),
    )
