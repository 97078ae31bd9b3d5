"""A mounted tree as a comparable value, and a readable diff of two of them, for tests.

The walk and the comparison are `snapshotter.convert.treewalk`'s (what ``damselfly check`` uses): per
path relative to the root, the type, mode with setuid/setgid/sticky, owner, mtime in nanoseconds, size
and SHA-256 of files, symlink targets, device numbers, every extended attribute, and the hard-link
groups. Here: tests' defaults (mkfs's ``lost+found`` left out), `diff` as sentences, and `assert_same`,
which raises an `AssertionError` carrying them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from snapshotter.convert.treewalk import (
    ROOT,
    Node,
    Tree,
    differences,
    hardlink_differences,
    node_of,
)
from snapshotter.convert.treewalk import snapshot as _snapshot

__all__ = ["DEFAULT_IGNORE", "ROOT", "Node", "Tree", "assert_same", "assert_same_dirs", "diff", "node_of"]

#: What a fresh ext4 has that no image put there.
DEFAULT_IGNORE = ("lost+found",)


def snapshot(
    root: str | os.PathLike[str],
    *,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    include_root: bool = False,
    dir_mtimes: bool = True,
    mtimes: bool = True,
    mtime_unit_ns: int = 1,
) -> Tree:
    """The tree below `root` (`treewalk.snapshot`), without `ignore` (default: ``lost+found``).

    `include_root`: also record the root directory itself as ``"."`` (its attributes come from whoever
    made the mount point, rarely from an image). `dir_mtimes`/`mtimes`: record directory (or all)
    mtimes; when off they compare equal. `mtime_unit_ns`: round mtimes down to this unit.
    """
    return _snapshot(
        root,
        ignore=ignore,
        include_root=include_root,
        dir_mtimes=dir_mtimes,
        mtimes=mtimes,
        mtime_unit_ns=mtime_unit_ns,
    )


def diff(want: Tree, got: Tree, *, limit: int = 20) -> list[str]:
    """The differences of `got` from `want` in words, at most `limit` (then a count of the rest)."""
    out: list[str] = []
    for d in differences(want, got, every_field=True):
        if d.got is None:
            assert d.want is not None
            out.append(f"missing {d.path!r}: {d.want.describe()}")
        elif d.want is None:
            out.append(f"extra {d.path!r}: {d.got.describe()}")
        else:
            parts = []
            for name in d.fields:
                a, b = getattr(d.want, name), getattr(d.got, name)
                if name == "mode":
                    a, b = f"{a:04o}", f"{b:04o}"
                parts.append(f"{name} {a!r} != {b!r}")
            out.append(f"differs {d.path!r}: " + "; ".join(parts))
    only_want, only_got = hardlink_differences(want, got)
    out += [f"hardlink group only in expected: {sorted(g)}" for g in only_want]
    out += [f"hardlink group only in actual: {sorted(g)}" for g in only_got]
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more differences"]
    return out


def assert_same(want: Tree, got: Tree, *, limit: int = 20, what: str = "tree") -> None:
    """Raise AssertionError naming the first `limit` differences (expected value first) if any."""
    found = diff(want, got, limit=limit)
    if found:
        raise AssertionError(
            f"{what}: {len(found)} difference(s) (expected != actual):\n  " + "\n  ".join(found)
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
