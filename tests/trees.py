"""A mounted tree as a comparable value, and a readable diff of two of them.

`snapshot(root)` records, per path relative to `root` (``/``-separated, names as ``os.fsdecode`` gives
them): the type, the mode bits with setuid/setgid/sticky, owner, mtime in nanoseconds, size and SHA-256
of files, symlink targets, device numbers, every extended attribute (all namespaces the caller may
read), and the groups of paths that are one inode (hard links). `diff` lists the first differences in
words; `assert_same` raises an `AssertionError` carrying them.

Nothing is followed: symlinks are read with ``lstat``/``readlink``, and the walk never enters a symlinked
directory. Directory sizes and link counts are left out (they depend on the filesystem, not the image).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

#: What a fresh ext4 has that no image put there.
DEFAULT_IGNORE = ("lost+found",)
ROOT = "."


@dataclass(frozen=True)
class Node:
    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits with setuid/setgid/sticky (stat.S_IMODE)
    uid: int
    gid: int
    mtime_ns: int | None  # None: not compared (see `snapshot(dir_mtimes=...)`)
    size: int  # files and symlinks; 0 for the rest
    sha256: str | None = None  # files
    target: str | None = None  # symlinks
    rdev: tuple[int, int] | None = None  # char and block devices: (major, minor)
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def describe(self) -> str:
        extra = {"file": self.sha256 and self.sha256[:12], "symlink": self.target, "char": self.rdev}
        extra["block"] = self.rdev
        more = extra.get(self.kind)
        return f"{self.kind} {self.mode:04o} {self.uid}:{self.gid}" + (f" {more}" if more else "")


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
            p: _with(n, xattrs=tuple(x for x in n.xattrs if not x[0].startswith(prefixes)))
            for p, n in self.nodes.items()
        }
        return Tree(nodes, self.hardlinks)


_KINDS = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISCHR, "char"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return f"unknown({stat.S_IFMT(mode):o})"


def _matcher(paths: Iterable[str]) -> Callable[[str], bool]:
    prefixes = tuple(p.strip("/") for p in paths)

    def match(rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in prefixes)

    return match


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
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


def _walk(top: str) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below `top`, depth first, sorted; symlinks not entered."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as it:
            entries = sorted(it, key=lambda e: e.name, reverse=True)
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def node_of(path: str, st: os.stat_result, *, mtime: bool = True, mtime_unit_ns: int = 1) -> Node:
    kind = _kind(st.st_mode)
    node = Node(
        kind,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns // mtime_unit_ns * mtime_unit_ns if mtime else None,
        st.st_size if kind in ("file", "symlink") else 0,
        xattrs=_xattrs(path),
    )
    if kind == "file":
        return _with(node, sha256=_file_sha256(path))
    if kind == "symlink":
        return _with(node, target=os.readlink(path))
    if kind in ("char", "block"):
        return _with(node, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
    return node


def _with(node: Node, **changes: object) -> Node:
    return replace(node, **changes)  # type: ignore[arg-type]


def snapshot(
    root: str | os.PathLike[str],
    *,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    include_root: bool = False,
    dir_mtimes: bool = True,
    mtimes: bool = True,
    mtime_unit_ns: int = 1,
) -> Tree:
    """The tree below `root` (see the module docstring).

    `ignore`: relative paths left out with everything below them. `include_root`: also record the root
    directory itself as ``"."`` (its attributes come from whoever made the mount point, rarely from an
    image). `dir_mtimes`/`mtimes`: record directory (or all) mtimes; when off they compare equal.
    `mtime_unit_ns`: round mtimes down to this unit (``10**9`` for a copy that keeps whole seconds).
    """
    top = os.fspath(root)
    skip = _matcher(ignore)
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    if include_root:
        nodes[ROOT] = node_of(top, os.lstat(top), mtime=mtimes and dir_mtimes, mtime_unit_ns=mtime_unit_ns)
    for rel, st in _walk(top):
        if skip(rel):
            continue
        path = os.path.join(top, rel)
        is_dir = stat.S_ISDIR(st.st_mode)
        nodes[rel] = node_of(
            path, st, mtime=mtimes and (dir_mtimes or not is_dir), mtime_unit_ns=mtime_unit_ns
        )
        if not is_dir and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    links = frozenset(frozenset(g) for g in inodes.values() if len(g) > 1)
    return Tree(dict(sorted(nodes.items())), links)


def diff(want: Tree, got: Tree, *, limit: int = 20) -> list[str]:
    """The differences of `got` from `want` in words, at most `limit` (then a count of the rest)."""
    out: list[str] = []
    for path in sorted(set(want.nodes) | set(got.nodes)):
        w, g = want.nodes.get(path), got.nodes.get(path)
        if w == g:
            continue
        if g is None:
            assert w is not None
            out.append(f"missing {path!r}: {w.describe()}")
        elif w is None:
            out.append(f"extra {path!r}: {g.describe()}")
        else:
            parts = []
            for f in fields(Node):
                a, b = getattr(w, f.name), getattr(g, f.name)
                if a != b:
                    if f.name == "mode":
                        a, b = f"{a:04o}", f"{b:04o}"
                    parts.append(f"{f.name} {a!r} != {b!r}")
            out.append(f"differs {path!r}: " + "; ".join(parts))
    for group in sorted(want.hardlinks - got.hardlinks, key=sorted):
        out.append(f"hardlink group only in expected: {sorted(group)}")
    for group in sorted(got.hardlinks - want.hardlinks, key=sorted):
        out.append(f"hardlink group only in actual: {sorted(group)}")
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more differences"]
    return out


def assert_same(want: Tree, got: Tree, *, limit: int = 20, what: str = "tree") -> None:
    """Raise AssertionError naming the first `limit` differences (expected value first) if any."""
    differences = diff(want, got, limit=limit)
    if differences:
        raise AssertionError(
            f"{what}: {len(differences)} difference(s) (expected != actual):\n  " + "\n  ".join(differences)
        )


def assert_same_dirs(
    want: str | os.PathLike[str], got: str | os.PathLike[str], *, limit: int = 20, **options: object
) -> None:
    """`snapshot` both directories with the same `options` and `assert_same` them."""
    assert_same(
        snapshot(want, **options),  # type: ignore[arg-type]
        snapshot(got, **options),  # type: ignore[arg-type]
        limit=limit,
        what=f"{Path(got)} vs {Path(want)}",
    )
