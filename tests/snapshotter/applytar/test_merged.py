"""Applying OCI layer tars: the merged tree of a lower and an upper layer, modes, owners, devices,
xattrs, hardlinks and sparse files. Every tar is built here by code (PAX unless a test says otherwise)
and applied onto a directory of tmp_path (ext4 on the test machines, so trusted.* and
security.capability behave as on the converter's target; one test applies onto a fresh loop-mounted
ext4 to be sure). Hostile tars and broken streams: `test_applytar_hostile.py`."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from snapshotter.convert.applytar import apply_layer
from snapshotter.errors import LayerError
from snapshotter.host.mkfs import mkfs_ext4
from snapshotter.host.mounts import mount_loop, umount_loop

from ..conftest import KernelResources
from .lab import (
    CAP_NET_BIND,
    T0,
    T1,
    E,
    MiB,
    Node,
    S,
    apply,
    assert_tree,
    dir_,
    file_,
    link_,
    link_groups,
    make_tar,
    tree,
)

# -- the merged tree -----------------------------------------------------------------------------


LOWER = [
    E("./", "d"),
    E("bin/", "d"),
    E("bin/busybox", data=b"#!busybox", mode=0o755),
    E("bin/sh", "l", target="busybox"),
    E("etc/", "d", mtime=T0 + 1, xattrs={"user.lower": b"1"}),
    E("etc/passwd", data=b"root:x:0:0\n"),
    E("etc/shadow", data=b"root:!:1::\n", mode=0o640, gid=42),
    E("etc/old.conf", data=b"old"),
    E("etc/conf.d/", "d"),
    E("etc/conf.d/a", data=b"a"),
    E("etc/conf.d/sub/", "d"),
    E("etc/conf.d/sub/deep", data=b"deep"),
    E("opt/", "d", mode=0o750, uid=7, gid=8, xattrs={"user.keep": b"lower"}),
    E("opt/app/", "d"),
    E("opt/app/lib.so", data=b"lib"),
    E("opt/app/data/", "d"),
    E("opt/app/data/db", data=b"db"),
    E("opt/other", data=b"other"),
    E("var/", "d", mtime=T0 + 2),
    E("var/cache/", "d"),
    E("var/cache/big", data=b"x" * 5000),
    E("var/log", data=b"was a file"),
    E("var/run", "l", target="../run"),
    E("usr/", "d"),
    E("usr/tool", data=b"tool", mode=0o755),
]

UPPER = [
    # whiteouts: a file, a whole tree, something absent
    E("etc/.wh.old.conf"),
    E("etc/conf.d/.wh.sub"),
    E("etc/.wh.never-existed"),
    # an existing directory: new metadata, children kept, new child; its time comes after its children
    E("etc/", "d", mode=0o700, uid=5, gid=6, mtime=T1, xattrs={"trusted.t": b"upper"}),
    E("etc/passwd", data=b"root:x:0:0\nbin:x:1:1\n", mtime=T1),
    # an opaque directory, marker *after* the new children (layer.md: order does not matter)
    E("opt/app/", "d", mtime=T1),
    E("opt/app/new", data=b"new", mtime=T1),
    E("opt/app/data/", "d", mtime=T1),
    E("opt/app/data/fresh", data=b"fresh", mtime=T1),
    E("opt/app/.wh..wh..opq"),
    # type changes: file -> dir, dir -> file, symlink -> dir
    E("var/log/", "d", mtime=T1),
    E("var/log/syslog", data=b"log", mtime=T1),
    E("var/cache", data=b"now a file", mtime=T1),
    E("var/run/", "d", mtime=T1),
    # a hard link to a lower file, and one group inside this layer
    E("bin/ash", "h", target="bin/busybox", mode=0o755, mtime=T0),
    E("usr/a", data=b"shared", mtime=T1),
    E("usr/b", "h", target="usr/a", mtime=T1),
    E("usr/c", "h", target="./usr/a", mtime=T1),
    # a file replaced by a symlink, and a parent the tar never lists
    E("usr/tool", "l", target="/bin/busybox", mtime=T1),
    E("new/deep/file", data=b"implicit parents", mtime=T1),
]


def merged() -> dict[str, Node]:
    return {
        "bin": dir_(),
        "bin/busybox": file_(b"#!busybox", 0o755),
        "bin/ash": file_(b"#!busybox", 0o755),
        "bin/sh": link_("busybox"),
        # etc: the upper's metadata; its time is the entry's even though children changed after it
        # the entry brings its whole xattr set: the lower's user.lower is gone (containerd's overlay
        # applier makes the directory afresh in the new upper)
        "etc": dir_(0o700, T1, uid=5, gid=6, xattrs=(("trusted.t", b"upper"),)),
        "etc/passwd": file_(b"root:x:0:0\nbin:x:1:1\n", mtime=T1),
        "etc/shadow": file_(b"root:!:1::\n", 0o640, gid=42),
        "etc/conf.d": dir_(),  # lost a child to a whiteout: keeps its lower time, not "now"
        "etc/conf.d/a": file_(b"a"),
        # opt has no entry in the upper: untouched, lower xattr kept
        "opt": dir_(0o750, uid=7, gid=8, xattrs=(("user.keep", b"lower"),)),
        "opt/app": dir_(mtime=T1),
        "opt/app/new": file_(b"new", mtime=T1),
        "opt/app/data": dir_(mtime=T1),
        "opt/app/data/fresh": file_(b"fresh", mtime=T1),
        "opt/other": file_(b"other"),
        "var": dir_(mtime=T0 + 2),
        "var/log": dir_(mtime=T1),
        "var/log/syslog": file_(b"log", mtime=T1),
        "var/cache": file_(b"now a file", mtime=T1),
        "var/run": dir_(mtime=T1),
        "usr": dir_(),
        "usr/a": file_(b"shared", mtime=T1),
        "usr/b": file_(b"shared", mtime=T1),
        "usr/c": file_(b"shared", mtime=T1),
        "usr/tool": link_("/bin/busybox", T1),
        # parents made for new/deep/file: 0755 root, the time of the entry that needed them
        "new": dir_(mtime=T1),
        "new/deep": dir_(mtime=T1),
        "new/deep/file": file_(b"implicit parents", mtime=T1),
    }


def test_lower_then_upper_gives_the_merged_tree(root: Path) -> None:
    lower = apply(root, make_tar(*LOWER), "lower")
    assert (lower.files, lower.dirs, lower.symlinks, lower.whiteouts) == (12, 11, 2, 0)
    upper = apply(root, make_tar(*UPPER), "upper")
    assert_tree(root, merged())
    assert link_groups(root) == {
        frozenset({"bin/busybox", "bin/ash"}),
        frozenset({"usr/a", "usr/b", "usr/c"}),
    }
    assert (upper.whiteouts, upper.opaques, upper.hardlinks) == (3, 1, 3)
    assert upper.removed == 4  # etc/old.conf, etc/conf.d/sub (a tree), opt/app/lib.so, opt/app/data/db
    assert upper.replaced == 5  # etc/passwd, var/log, var/cache, var/run, usr/tool
    assert upper.entries == len(UPPER)
    assert upper.bytes == sum(len(e.data) for e in UPPER)


def test_opaque_marker_first_or_last_gives_the_same_tree(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.utime(other, ns=(T0, T0))
    lower = make_tar(*LOWER)
    marker = [e for e in UPPER if e.name.endswith(".wh..wh..opq")]
    rest = [e for e in UPPER if e not in marker]
    apply(root, lower)
    apply(root, make_tar(*marker, *rest))
    apply(other, lower)
    apply(other, make_tar(*rest, *marker))
    assert tree(root) == tree(other) == merged()


def test_applying_twice_is_deterministic(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    os.utime(other, ns=(T0, T0))
    for r in (root, other):
        apply(r, make_tar(*LOWER))
        apply(r, make_tar(*UPPER))
    assert tree(root) == tree(other)
    assert os.lstat(root).st_mtime_ns == os.lstat(other).st_mtime_ns == T0  # "./" in the lower only


def test_whiteout_hides_only_lower_content_not_this_layers(root: Path) -> None:
    apply(root, make_tar(E("d/", "d"), E("d/old", data=b"old"), E("keep", data=b"1")))
    # the layer recreates d with a new child *before* whiting d out: only the lower's d/old goes
    apply(
        root, make_tar(E("d/", "d", mtime=T1), E("d/new", data=b"new", mtime=T1), E(".wh.d"), E(".wh.keep"))
    )
    assert_tree(root, {"d": dir_(mtime=T1), "d/new": file_(b"new", mtime=T1)})


def test_whiteout_then_recreate_replaces_a_tree(root: Path) -> None:
    apply(root, make_tar(E("d/", "d"), E("d/old", data=b"old")))
    apply(root, make_tar(E(".wh.d"), E("d", data=b"file now", mtime=T1)))
    assert_tree(root, {"d": file_(b"file now", mtime=T1)})


def test_opaque_keeps_this_layers_children_without_their_parent_entries(root: Path) -> None:
    apply(root, make_tar(E("a/", "d"), E("a/b/", "d"), E("a/b/old", data=b"o"), E("a/x", data=b"x")))
    # a/b is not listed by the upper: it stays because a/b/new is this layer's, but a/b/old goes
    apply(root, make_tar(E("a/b/new", data=b"n", mtime=T1), E("a/.wh..wh..opq")))
    assert_tree(root, {"a": dir_(), "a/b": dir_(), "a/b/new": file_(b"n", mtime=T1)})


def test_preserved_paths_survive_an_opaque_root(root: Path) -> None:
    (root / "lost+found").mkdir()
    apply(root, make_tar(E("etc/", "d"), E("etc/x", data=b"x")))
    stats = apply(root, make_tar(E(".wh..wh..opq"), E("new", data=b"n")), preserve=["lost+found"])
    assert sorted(os.listdir(root)) == ["lost+found", "new"]
    assert stats.removed == 1


def test_aufs_metadata_is_ignored(root: Path) -> None:
    stats = apply(root, make_tar(E(".wh..wh.plnk/", "d"), E(".wh..wh.aufs"), E("f", data=b"f")))
    assert sorted(os.listdir(root)) == ["f"]
    assert stats.skipped == 2


def test_modes_owners_devices_and_xattrs(root: Path) -> None:
    stats = apply(
        root,
        make_tar(
            E("suid", data=b"s", mode=0o4755, uid=1000, gid=1000),
            E("sgid", data=b"g", mode=0o2711, uid=100000, gid=200000),
            E("both", data=b"b", mode=0o6750, uid=3_000_000, gid=4_000_000),  # past ustar's octal: PAX ids
            E("tmp/", "d", mode=0o1777),
            E("sgid-dir/", "d", mode=0o2775, gid=50),
            E("ping", data=b"elf", mode=0o755, uid=1001, xattrs={"security.capability": CAP_NET_BIND}),
            E("x", data=b"x", xattrs={"user.mime": b"text/plain", "trusted.overlay.x": b"\x00\xff\x01"}),
            E("dev/", "d"),
            E("dev/null", "c", mode=0o666, dev=(1, 3)),
            E("dev/loop7", "b", mode=0o660, gid=6, dev=(7, 7)),
            E("dev/big", "c", dev=(4095, 1 << 19)),
            E("fifo", "p", mode=0o600, uid=9),
            E("lnk", "l", target="nowhere", uid=1000, gid=1001, xattrs={"trusted.l": b"1", "user.l": b"no"}),
        ),
    )
    assert_tree(
        root,
        {
            "suid": file_(b"s", 0o4755, uid=1000, gid=1000),
            "sgid": file_(b"g", 0o2711, uid=100000, gid=200000),
            "both": file_(b"b", 0o6750, uid=3_000_000, gid=4_000_000),
            "tmp": dir_(0o1777),
            "sgid-dir": dir_(0o2775, gid=50),
            # chown (which clears security.capability) came before the xattr
            "ping": file_(b"elf", 0o755, uid=1001, xattrs=(("security.capability", CAP_NET_BIND),)),
            "x": file_(b"x", xattrs=(("trusted.overlay.x", b"\x00\xff\x01"), ("user.mime", b"text/plain"))),
            "dev": dir_(),
            "dev/null": Node("c", 0o666, rdev=(1, 3)),
            "dev/loop7": Node("b", 0o660, gid=6, rdev=(7, 7)),
            "dev/big": Node("c", 0o644, rdev=(4095, 1 << 19)),
            "fifo": Node("p", 0o600, uid=9),
            # the kernel refuses user.* on a symlink: skipped, trusted.* set
            "lnk": link_("nowhere", uid=1000, gid=1001, xattrs=(("trusted.l", b"1"),)),
        },
    )
    assert (stats.xattrs, stats.xattrs_skipped, stats.devices, stats.fifos) == (4, 1, 3, 1)


def test_whiteouts_without_their_directory_change_nothing(root: Path) -> None:
    apply(root, make_tar(E("f", data=b"f")))
    stats = apply(root, make_tar(E("ghost/.wh..wh..opq"), E("ghost2/.wh.x"), E("f/.wh.y")))
    assert sorted(os.listdir(root)) == ["f"]  # containerd's RemoveAll does not create them either
    assert (stats.opaques, stats.whiteouts, stats.removed) == (1, 2, 0)


def test_names_are_bytes_on_disk(root: Path) -> None:
    odd = ["caf\udce9", "sp ace", "new\nline", "ünï", "long" * 60]
    apply(root, make_tar(*(E(name, data=name.encode("utf-8", "surrogateescape")) for name in odd)))
    on_disk = sorted(os.listdir(os.fsencode(root)))
    assert on_disk == sorted(name.encode("utf-8", "surrogateescape") for name in odd)
    for name in odd:
        assert (root / name).read_bytes() == name.encode("utf-8", "surrogateescape")


def test_permission_errors_say_that_root_is_needed(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(LayerError, match="needs root") as ei:
        apply(root, make_tar(E("f", data=b"f", uid=1000)), "sha256:nonroot")
    assert ei.value.entry == "f"
    assert "Operation not permitted" in ei.value.why


def test_hardlink_keeps_setuid_and_capability_of_its_inode(root: Path) -> None:
    apply(
        root,
        make_tar(
            E("bin/", "d"),
            E("bin/ping", data=b"p", mode=0o4755, uid=3, xattrs={"security.capability": CAP_NET_BIND}),
        ),
    )
    apply(root, make_tar(E("bin/ping6", "h", target="bin/ping", mode=0o4755, uid=3, mtime=T1)))
    for name in ("bin/ping", "bin/ping6"):
        st = os.lstat(root / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o4755, 3, T1)
        assert os.getxattr(root / name, "security.capability") == CAP_NET_BIND
    assert link_groups(root) == {frozenset({"bin/ping", "bin/ping6"})}


def test_hardlink_to_a_symlink_links_the_symlink(root: Path) -> None:
    apply(root, make_tar(E("s", "l", target="/etc/passwd"), E("s2", "h", target="s")))
    assert os.readlink(root / "s2") == "/etc/passwd"
    assert link_groups(root) == {frozenset({"s", "s2"})}


def test_xattrs_in_libarchive_form_and_gnu_format_without_pax(root: Path) -> None:
    apply(root, make_tar(E("a", data=b"a", pax={"LIBARCHIVE.xattr.user.n%20x": "aGVsbG8"})))
    assert os.getxattr(root / "a", "user.n x") == b"hello"
    gnu = make_tar(E("g", data=b"gnu", mode=0o600, uid=77), fmt=tarfile.GNU_FORMAT)
    apply(root, gnu)
    st = os.lstat(root / "g")
    assert (st.st_uid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (77, 0o600, T0 // S * S)


def test_times_out_of_range_become_the_epoch_and_atime_follows_mtime(root: Path) -> None:
    apply(root, make_tar(E("neg", data=b"n", pax={"mtime": "-5.5"}), E("a", pax={"atime": "1.5"})))
    assert os.lstat(root / "neg").st_mtime_ns == 0
    st = os.lstat(root / "a")
    assert st.st_atime_ns == st.st_mtime_ns == T0


# -- sparse files --------------------------------------------------------------------------------

SPARSE_SIZE = 64 * MiB
SPARSE_MAP = [(4096, 5000), (40 * MiB, 8192), (SPARSE_SIZE - 100, 100)]


def _sparse_parts() -> list[bytes]:
    return [bytes([i + 1]) * size for i, (_, size) in enumerate(SPARSE_MAP)]


def _sparse_tar(kind: str) -> bytes:
    parts = _sparse_parts()
    data = b"".join(parts)
    if kind == "gnu-old":  # type 'S': the map in the old GNU header (tar --format=gnu --sparse)
        ti = tarfile.TarInfo("sparse.bin")
        ti.type, ti.size, ti.mtime = tarfile.GNUTYPE_SPARSE, len(data), T0 // S
        hdr = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
        for i, (off, size) in enumerate(SPARSE_MAP):
            hdr[386 + 24 * i : 398 + 24 * i] = b"%011o\0" % off
            hdr[398 + 24 * i : 410 + 24 * i] = b"%011o\0" % size
        hdr[483:495] = b"%011o\0" % SPARSE_SIZE
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        pad = b"\0" * (-len(data) % 512)
        return bytes(hdr) + data + pad + b"\0" * 1024
    ti = tarfile.TarInfo("GNUSparseFile.0/sparse.bin")
    ti.mtime = T0 // S
    pax = {"GNU.sparse.name": "sparse.bin", "GNU.sparse.realsize": str(SPARSE_SIZE)}
    if kind == "pax-1.0":  # tar --format=pax --sparse: the map heads the data
        mapping = f"{len(SPARSE_MAP)}\n" + "".join(f"{o}\n{s}\n" for o, s in SPARSE_MAP)
        block = mapping.encode().ljust(512 * ((len(mapping) + 511) // 512), b"\0")
        data = block + data
        pax |= {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    else:  # pax-0.1: the map in a PAX record
        pax |= {
            "GNU.sparse.map": ",".join(f"{o},{s}" for o, s in SPARSE_MAP),
            "GNU.sparse.size": str(SPARSE_SIZE),
        }
    ti.pax_headers = pax
    ti.size = len(data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(data))
        after = tarfile.TarInfo("after")
        after.size = 5
        tf.addfile(after, io.BytesIO(b"after"))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["gnu-old", "pax-0.1", "pax-1.0"])
def test_sparse_files_keep_their_holes(root: Path, kind: str) -> None:
    stats = apply(root, _sparse_tar(kind))
    path = root / "sparse.bin"
    st = os.lstat(path)
    assert st.st_size == SPARSE_SIZE
    assert st.st_blocks * 512 < 1 * MiB  # holes, not 64 MiB of zeros
    with open(path, "rb") as f:
        for (off, size), part in zip(SPARSE_MAP, _sparse_parts(), strict=True):
            f.seek(off)
            assert f.read(size) == part
        f.seek(0)
        assert f.read(4096) == bytes(4096)
    assert stats.sparse_files == 1
    assert stats.bytes == sum(s for _, s in SPARSE_MAP) + (5 if kind != "gnu-old" else 0)
    if kind != "gnu-old":
        assert (root / "after").read_bytes() == b"after"


def test_sparse_map_leaving_the_file_is_refused(root: Path) -> None:
    ti = tarfile.TarInfo("GNUSparseFile.0/s")
    ti.pax_headers = {"GNU.sparse.name": "s", "GNU.sparse.size": "10", "GNU.sparse.map": "5,100"}
    ti.size = 100
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(b"z" * 100))
    with pytest.raises(LayerError, match="sparse map region") as ei:
        apply(root, buf.getvalue(), "sha256:sparse")
    assert ei.value.entry == "s"


# -- on the converter's real target --------------------------------------------------------------


def test_merged_tree_on_a_fresh_loop_mounted_ext4(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mnt = kernel.mount_point(tmp_path / "mnt")
    mkfs_ext4(image, 64 * MiB)
    mount_loop(image, mnt, options=("rw",))
    try:
        os.utime(mnt, ns=(T0, T0))
        apply_layer(io.BytesIO(make_tar(*LOWER)), mnt, layer="lower", preserve=["lost+found"])
        apply_layer(io.BytesIO(make_tar(*UPPER)), mnt, layer="upper", preserve=["lost+found"])
        assert tree(mnt) == merged()
        assert os.path.isdir(mnt / "lost+found")
    finally:
        umount_loop(mnt)
