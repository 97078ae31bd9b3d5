"""`tests.trees`: what a snapshot records and how a difference reads."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from . import trees

T = 1_700_000_000_123_456_789


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:  # chown, mknod and trusted.* xattrs; CI runs as root: never a skip
        pytest.fail("needs root (chown, mknod, trusted.* xattrs)")


def make(root: Path) -> Path:
    root.mkdir()
    (root / "d").mkdir(mode=0o750)
    (root / "d" / "f").write_bytes(b"content")
    os.chown(root / "d" / "f", 70000, 100000)  # first: chown(2) clears setuid
    os.chmod(root / "d" / "f", 0o4755)
    os.link(root / "d" / "f", root / "hard")
    (root / "link").symlink_to("../outside")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    os.setxattr(root / "d" / "f", "user.a", b"1")
    os.setxattr(root / "d" / "f", "trusted.b", b"\x00\xff")
    (root / "lost+found").mkdir()
    (root / "lost+found" / "x").write_bytes(b"")
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), ns=(T, T), follow_symlinks=False)
    return root


def test_snapshot_records_every_attribute(tmp_path: Path) -> None:
    t = trees.snapshot(make(tmp_path / "a"))
    assert t.paths() == ["d", "d/f", "fifo", "hard", "link", "null"]
    f = t["d/f"]
    assert (f.kind, f.mode, f.uid, f.gid, f.mtime_ns, f.size) == ("file", 0o4755, 70000, 100000, T, 7)
    assert f.xattrs == (("trusted.b", b"\x00\xff"), ("user.a", b"1"))
    assert t["link"].target == "../outside" and t["link"].kind == "symlink"
    assert (t["null"].kind, t["null"].rdev) == ("char", (1, 3))
    assert (t["fifo"].kind, t["d"].mode, t["d"].size) == ("fifo", 0o750, 0)
    assert t.hardlinks == frozenset({frozenset({"d/f", "hard"})})
    assert "." not in t and "." in trees.snapshot(tmp_path / "a", include_root=True)


def test_options_leave_out_what_the_caller_cannot_compare(tmp_path: Path) -> None:
    root = make(tmp_path / "a")
    assert trees.snapshot(root, dir_mtimes=False)["d"].mtime_ns is None
    assert trees.snapshot(root, mtime_unit_ns=10**9)["d/f"].mtime_ns == T // 10**9 * 10**9
    assert "lost+found/x" in trees.snapshot(root, ignore=())
    t = trees.snapshot(root).without("d").without_xattrs("trusted.")
    assert t.paths() == ["fifo", "hard", "link", "null"] and t.hardlinks == frozenset()
    assert trees.snapshot(root).without_xattrs("trusted.")["d/f"].xattrs == (("user.a", b"1"),)


def test_equal_trees_pass_and_differences_read_as_sentences(tmp_path: Path) -> None:
    a, b = make(tmp_path / "a"), make(tmp_path / "b")
    trees.assert_same_dirs(a, b)
    os.chmod(b / "d" / "f", 0o755)
    os.unlink(b / "hard")
    (b / "new").write_bytes(b"")
    os.setxattr(b / "d", "user.z", b"2")
    with pytest.raises(AssertionError) as err:
        trees.assert_same(trees.snapshot(a), trees.snapshot(b), what="image")
    assert str(err.value).splitlines() == [
        "image: 5 difference(s) (expected != actual):",
        "  differs 'd': xattrs () != (('user.z', b'2'),)",
        "  differs 'd/f': mode '4755' != '0755'",
        "  missing 'hard': file 4755 70000:100000 ed7002b439e9",
        "  extra 'new': file 0644 0:0 e3b0c44298fc",
        "  hardlink group only in expected: ['d/f', 'hard']",
    ]


def test_differences_are_cut_at_the_limit(tmp_path: Path) -> None:
    a = trees.snapshot(make(tmp_path / "a"))
    nodes = {p: dataclasses.replace(n, uid=n.uid + 1) for p, n in a.nodes.items()}
    out = trees.diff(a, trees.Tree(nodes, a.hardlinks), limit=2)
    assert len(out) == 3 and out[-1] == "... and 4 more differences"
