"""The converter's fast paths against what they replace: the header parser against tarfile's, the
forward-only reader and the read-ahead thread against plain reads, the image diff against the bytes a
stack of its layers reads back, and the in-place canonicalisation of ext4 against e2fsck and the
inode fields themselves."""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest

from blockformat.layer import LayerReader
from blockformat.source import BytesSource
from blockformat.stack import Stack
from snapshotter.convert import ext4meta, imagefile
from snapshotter.convert.layerstream import ReadAhead
from snapshotter.convert.tarentries import CheckedTarInfo, ForwardReader, _fast_header
from snapshotter.host.mkfs import mkfs_ext4

ATTRS = (
    "name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname",
    "devmajor", "devminor",
)  # fmt: skip


def _headers() -> list[bytes]:
    """Tar headers of every kind the fast parser takes, and of some it leaves to tarfile."""
    out: list[bytes] = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for name, kind, extra in [
            ("etc/hello", tarfile.REGTYPE, {"size": 5}),
            ("etc/", tarfile.DIRTYPE, {}),
            ("usr/lib/" + "x" * 90 + "/deep/file.so", tarfile.REGTYPE, {"size": 1}),  # ustar prefix
            ("bin/sh", tarfile.SYMTYPE, {"linkname": "busybox"}),
            ("bin/ls", tarfile.LNKTYPE, {"linkname": "bin/busybox"}),
            ("dev/null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),
            ("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}),
            ("run/fifo", tarfile.FIFOTYPE, {}),
            ("big", tarfile.REGTYPE, {"size": 9 << 30}),  # beyond 8 GiB: base-256 in GNU, PAX size
            ("high-uid", tarfile.REGTYPE, {"uid": 1 << 22, "gid": 70000}),
            ("n\u00e4me", tarfile.REGTYPE, {"uname": "\u00fcser"}),
        ]:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mode = 0o4755
            ti.mtime = 1_700_000_000
            ti.uname, ti.gname = "root", "root"
            for k, v in extra.items():
                setattr(ti, k, v)
            try:
                raw = ti.tobuf(fmt, "utf-8", "surrogateescape")
            except ValueError:
                continue  # a field this format cannot hold
            out += [raw[i : i + 512] for i in range(0, len(raw), 512)]
    v7 = tarfile.TarInfo("old/dir/")
    v7.type = tarfile.AREGTYPE
    out.append(v7.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")[:512])
    return out


def test_fast_header_equals_tarfiles_frombuf() -> None:
    fast_count = 0
    for buf in _headers():
        got = _fast_header(CheckedTarInfo, buf, "utf-8", "surrogateescape")
        try:
            want = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.HeaderError:  # an extended header's data block, not a header
            assert got is None
            continue
        if got is None:
            continue  # left to tarfile (base-256 numbers): nothing to compare
        fast_count += 1
        for a in ATTRS:
            assert getattr(got, a) == getattr(want, a), (a, buf[:100])
    assert fast_count >= 25  # the common headers do take the fast path


def test_fast_header_leaves_damaged_headers_to_tarfile() -> None:
    buf = bytearray(_headers()[0])
    assert _fast_header(CheckedTarInfo, bytes(buf), "utf-8", "strict") is not None
    buf[0] ^= 1  # checksum no longer matches
    assert _fast_header(CheckedTarInfo, bytes(buf), "utf-8", "strict") is None
    with pytest.raises(tarfile.HeaderError):
        tarfile.TarInfo.frombuf(bytes(buf), "utf-8", "strict")
    assert _fast_header(CheckedTarInfo, bytes(512), "utf-8", "strict") is None  # end of archive
    assert _fast_header(CheckedTarInfo, bytes(100), "utf-8", "strict") is None  # truncated


class _Trickle:
    """A stream returning short, uneven reads."""

    def __init__(self, data: bytes, seed: int = 1) -> None:
        self._f = io.BytesIO(data)
        self._r = random.Random(seed)

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, self._r.randrange(1, 70_000)))


def test_forward_reader_reads_tells_and_only_seeks_forward() -> None:
    data = random.Random(2).randbytes(3_000_000)
    r = ForwardReader(_Trickle(data))
    assert r.read(10) == data[:10] and r.tell() == 10
    assert r.seek(1_000_000) == 1_000_000
    assert r.read(2_000_000) == data[1_000_000:3_000_000]
    assert r.read(5) == b"" and r.tell() == 3_000_000
    with pytest.raises(OSError, match="forwards"):
        r.seek(5)


def test_read_ahead_delivers_every_byte_then_the_sources_error() -> None:
    data = random.Random(3).randbytes(5_000_000)

    class Failing(_Trickle):
        def read(self, n: int) -> bytes:
            got = super().read(n)
            if not got:
                raise ValueError("corrupt at the end")
            return got

    with ReadAhead(_Trickle(data), depth=2, chunk=100_000) as ahead:
        got = b"".join(iter(lambda: ahead.read(65_536), b""))
    assert got == data
    with ReadAhead(Failing(data), depth=2) as ahead:
        seen = bytearray()
        with pytest.raises(ValueError, match="corrupt at the end"):
            while chunk := ahead.read(1 << 20):
                seen += chunk
        assert bytes(seen) == data  # the error comes after every byte before it


def test_read_ahead_close_stops_a_reader_blocked_on_a_full_queue() -> None:
    ahead = ReadAhead(io.BytesIO(bytes(50 << 20)), depth=1, chunk=1 << 20)
    assert len(ahead.read(10)) == 10
    ahead.close()  # returns: the thread gave up its put


def _write_sparse(path: Path, size: int, writes: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


def _read_stack(blobs: list[bytes], vsize: int, offset: int, length: int) -> bytes:
    return Stack([LayerReader(BytesSource(raw)) for raw in blobs], vsize).read(offset, length)


def test_write_diff_holds_exactly_the_changed_blocks(tmp_path: Path) -> None:
    vsize = 64 << 20
    rng = random.Random(4)
    base, cur = tmp_path / "base", tmp_path / "cur"
    block = imagefile.BLOCK
    lower = {0: rng.randbytes(3 * block), 5 << 20: rng.randbytes(300_000), 40 << 20: bytes(block)}
    _write_sparse(base, vsize, lower)
    out0 = io.BytesIO()
    info0, data0 = imagefile.write_diff(None, str(base), out0, vsize, "lz4", 65536)
    # the bottom layer: non-zero blocks only (the written zero block is left out)
    assert data0 == 3 * block + -(-300_000 // block) * block
    imagefile.sparse_copy(str(base), str(cur))
    assert (cur.stat().st_blocks * 512) <= (base.stat().st_blocks * 512) + (1 << 20)
    with open(cur, "r+b") as f:
        f.seek(block)
        f.write(rng.randbytes(block))  # one block changed
        f.seek((5 << 20) + 2 * block)
        f.write(bytes(block))  # non-zero → zeros: must be recorded
        f.seek(20 << 20)
        f.write(rng.randbytes(10))  # a new, partial block in a hole
        f.seek(0)
        f.write(lower[0][:block])  # rewritten with the same bytes: not a change
    out1 = io.BytesIO()
    info1, data1 = imagefile.write_diff(str(base), str(cur), out1, vsize, "lz4", 65536)
    assert data1 == 3 * block
    want = cur.read_bytes()
    blobs = [out0.getvalue(), out1.getvalue()]
    for off in (0, 5 << 20, 20 << 20, 40 << 20, vsize - (1 << 20)):
        assert _read_stack(blobs, vsize, off, 1 << 20) == want[off : off + (1 << 20)]
    # and expand() writes the same image back
    again = tmp_path / "again"
    imagefile.expand(Stack([LayerReader(BytesSource(b)) for b in blobs], vsize), str(again))
    assert again.read_bytes() == want
    assert info0.blob_digest != info1.blob_digest


def _inode(path: Path, ino: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        geo = ext4meta.geometry(fd, str(path))
        g, i = divmod(ino - 1, geo.inodes_per_group)
        return os.pread(fd, geo.inode_size, geo.inode_tables[g] * geo.block_size + i * geo.inode_size)
    finally:
        os.close(fd)


def test_canonicalize_rewrites_changed_and_freed_inodes_and_fsck_agrees(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("mkfs -d with owners needs root")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"hello")
    (tree / "gone").write_bytes(b"x")
    os.utime(tree / "d" / "f", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    image = tmp_path / "img"
    mkfs_ext4(image, 256 << 20, root_dir=tree, metadata_csum=False, fake_time=1)
    before = ext4meta.used_inodes(str(image))
    # Change an inode the way the kernel would (ctime = now, a generation), and free one.
    f_ino = int(
        subprocess.run(["debugfs", "-R", "stat d/f", str(image)], capture_output=True, text=True, check=True)
        .stdout.split("Inode: ")[1]
        .split()[0]
    )
    gone_ino = int(
        subprocess.run(["debugfs", "-R", "stat gone", str(image)], capture_output=True, text=True, check=True)
        .stdout.split("Inode: ")[1]
        .split()[0]
    )
    subprocess.run(
        ["debugfs", "-w", "-R", f"sif <{f_ino}> generation 12345", str(image)],
        check=True,
        capture_output=True,
    )
    subprocess.run(["debugfs", "-w", "-R", "rm gone", str(image)], check=True, capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"sif <{f_ino}> ctime @1700000000", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    changed, freed = ext4meta.canonicalize(str(image), before)
    assert freed == 1 and changed >= 1
    rec = _inode(image, f_ino)
    assert rec[0x0C:0x10] == rec[0x10:0x14]  # ctime = mtime
    assert rec[0x84:0x88] == rec[0x88:0x8C]  # ctime_extra = mtime_extra (the nanoseconds)
    assert rec[0x90:0x94] == rec[0x10:0x14]  # crtime = mtime
    assert rec[0x64:0x68] == bytes(4)  # generation
    assert _inode(image, gone_ino) == bytes(len(rec))
    assert ext4meta.canonicalize(str(image), ext4meta.used_inodes(str(image))) == (0, 0)  # idempotent
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
