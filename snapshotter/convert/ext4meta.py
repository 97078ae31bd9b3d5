"""Erasing the wall clock and randomness from what ext4 wrote for one layer, in the image file itself.

ext4 stamps every inode it changes with the time (``ctime``, and ``crtime`` for new ones), a random
``i_generation`` and a change counter, and its superblock with mount and write times, a mount count,
the bytes written and the last mount path. None of it comes from the tar, so the converter rewrites
it to fixed values after each layer (`canonicalize`) — directly in the unmounted image: the superblock
and group descriptors say where every group's inode bitmap and inode table are, so the fields are
patched with ``pwrite`` (no ``debugfs`` session of one command per field: on a layer of 30,000 files
that took a second).

- An inode is *changed by the layer* when its ctime differs from its mtime: a tar sets mtime, the
  kernel sets ctime to now on every change. Its ctime and crtime become its mtime (seconds and the
  ``_extra`` nanosecond/epoch word alike), its generation and version 0. Afterwards ctime == mtime
  again, so the next layer finds exactly the inodes it changed.
- An inode in use before the layer and free after it is zeroed whole: it keeps deletion and change
  times otherwise.
- Superblock: ``s_mtime`` and ``s_wtime`` = `FAKE_TIME`, ``s_mnt_count`` and ``s_kbytes_written`` 0,
  ``s_last_mounted`` zeroed.

The converter's filesystems have no ``metadata_csum`` (inode checksums would be seeded by the random
generation), so nothing here needs a checksum recomputed; ``meta_bg`` (another descriptor layout) is
not used by `mkfs_ext4` and is refused. Layout facts: the kernel's ``fs/ext4/ext4.h``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConvertError

#: The superblock is 1024 bytes into the device.
SUPERBLOCK = 1024
_MAGIC = 0xEF53
_INCOMPAT_META_BG = 0x10
_INCOMPAT_64BIT = 0x80
_RO_COMPAT_METADATA_CSUM = 0x400
_BG_INODE_UNINIT = 0x1
#: Reserved inodes below this are not files (bad blocks, quota, resize, journal...); the root is 2.
FIRST_INO = 11
ROOT_INO = 2
FAKE_TIME = 1

# Superblock fields (offsets into the superblock).
_S_MTIME, _S_WTIME, _S_MNT_COUNT = 0x2C, 0x30, 0x34
_S_LAST_MOUNTED, _S_LAST_MOUNTED_LEN = 0x88, 64
_S_KBYTES_WRITTEN = 0x178

# Inode fields (offsets into an inode record).
_I_CTIME, _I_MTIME, _I_VERSION_LO, _I_GENERATION = 0x0C, 0x10, 0x24, 0x64
_I_EXTRA_ISIZE = 0x80
_I_CTIME_EXTRA, _I_MTIME_EXTRA, _I_CRTIME, _I_CRTIME_EXTRA, _I_VERSION_HI = 0x84, 0x88, 0x90, 0x94, 0x98
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Geometry:
    block_size: int
    inodes_per_group: int
    inode_size: int
    groups: int
    inode_bitmaps: tuple[int, ...]  # block number per group
    inode_tables: tuple[int, ...]  # first block per group
    uninit: tuple[bool, ...]  # the group's inode bitmap and table were never initialised: all free


def _fail(path: str, why: str) -> ConvertError:
    return ConvertError(f"{path}: {why}", "report this as a bug: the converter made this filesystem")


def geometry(fd: int, path: str) -> Geometry:
    """Where the inode bitmaps and tables of the ext4 in `fd` are."""
    sb = os.pread(fd, 1024, SUPERBLOCK)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _MAGIC:
        raise _fail(path, "no ext4 superblock")
    inodes_count, _, _, _, _, first_data_block, log_block = struct.unpack_from("<7I", sb, 0)
    blocks_lo = struct.unpack_from("<I", sb, 0x04)[0]
    blocks_per_group, _, inodes_per_group = struct.unpack_from("<3I", sb, 0x20)
    inode_size = struct.unpack_from("<H", sb, 0x58)[0]
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    desc_size = struct.unpack_from("<H", sb, 0xFE)[0] if incompat & _INCOMPAT_64BIT else 32
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & _INCOMPAT_64BIT else 0
    if incompat & _INCOMPAT_META_BG:
        raise _fail(path, "meta_bg group descriptors are not supported")
    if ro_compat & _RO_COMPAT_METADATA_CSUM:
        raise _fail(path, "metadata_csum: inode checksums would need recomputing")
    block_size = 1024 << log_block
    if inodes_per_group == 0 or blocks_per_group == 0 or inode_size < 128:
        raise _fail(path, "a superblock with zero-sized groups or inodes")
    blocks = (blocks_hi << 32) | blocks_lo
    groups = -(-(blocks - first_data_block) // blocks_per_group)
    if groups * inodes_per_group != inodes_count:
        raise _fail(path, f"{groups} groups of {inodes_per_group} inodes != {inodes_count} inodes")
    gdt = os.pread(fd, groups * desc_size, (first_data_block + 1) * block_size)
    if len(gdt) < groups * desc_size:
        raise _fail(path, "the group descriptor table is cut short")
    bitmaps, tables, uninit = [], [], []
    for g in range(groups):
        off = g * desc_size
        bitmap, table = struct.unpack_from("<II", gdt, off + 0x04)
        flags = struct.unpack_from("<H", gdt, off + 0x12)[0]
        if desc_size >= 64:
            bitmap_hi, table_hi = struct.unpack_from("<II", gdt, off + 0x24)
            bitmap, table = bitmap | bitmap_hi << 32, table | table_hi << 32
        bitmaps.append(bitmap)
        tables.append(table)
        uninit.append(bool(flags & _BG_INODE_UNINIT))
    return Geometry(
        block_size, inodes_per_group, inode_size, groups, tuple(bitmaps), tuple(tables), tuple(uninit)
    )


#: The set bits of every byte value, lowest first.
_BITS = tuple(tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256))


def _used(fd: int, geo: Geometry) -> dict[int, list[int]]:
    """group → the indexes (0-based) of its inodes in use, by the inode bitmaps."""
    out: dict[int, list[int]] = {}
    nbytes = geo.inodes_per_group // 8
    for g in range(geo.groups):
        if geo.uninit[g]:
            continue
        bitmap = os.pread(fd, nbytes, geo.inode_bitmaps[g] * geo.block_size).rstrip(b"\0")
        used: list[int] = []
        for byte_i, byte in enumerate(bitmap):  # up to the last inode in use: groups fill from the start
            if byte:
                base = byte_i * 8
                used.extend([base + bit for bit in _BITS[byte]])
        if used:
            out[g] = used
    return out


def used_inodes(path: str) -> set[int]:
    """The inode numbers in use in the ext4 image `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        geo = geometry(fd, path)
        return {g * geo.inodes_per_group + i + 1 for g, used in _used(fd, geo).items() for i in used}
    finally:
        os.close(fd)


def _has(rec: bytearray, field_end: int) -> bool:
    """Does the inode's extra space (``i_extra_isize``) reach `field_end`?"""
    if len(rec) <= _I_EXTRA_ISIZE:
        return False
    extra: int = struct.unpack_from("<H", rec, _I_EXTRA_ISIZE)[0]
    return 0x80 + extra >= field_end


def _canonical_inode(rec: bytearray) -> bool:
    """Rewrite one inode's clock and random fields if the layer changed it; whether it did."""
    ctime, mtime = rec[_I_CTIME : _I_CTIME + 4], rec[_I_MTIME : _I_MTIME + 4]
    extras = _has(rec, _I_MTIME_EXTRA + 4)
    if extras:
        ctime_x, mtime_x = rec[_I_CTIME_EXTRA : _I_CTIME_EXTRA + 4], rec[_I_MTIME_EXTRA : _I_MTIME_EXTRA + 4]
        if (ctime, ctime_x) == (mtime, mtime_x):
            return False
        rec[_I_CTIME_EXTRA : _I_CTIME_EXTRA + 4] = mtime_x
    elif ctime == mtime:
        return False
    rec[_I_CTIME : _I_CTIME + 4] = mtime
    if _has(rec, _I_CRTIME_EXTRA + 4):
        rec[_I_CRTIME : _I_CRTIME + 4] = mtime
        rec[_I_CRTIME_EXTRA : _I_CRTIME_EXTRA + 4] = rec[_I_MTIME_EXTRA : _I_MTIME_EXTRA + 4]
    rec[_I_GENERATION : _I_GENERATION + 4] = bytes(4)
    rec[_I_VERSION_LO : _I_VERSION_LO + 4] = bytes(4)
    if _has(rec, _I_VERSION_HI + 4):
        rec[_I_VERSION_HI : _I_VERSION_HI + 4] = bytes(4)
    return True


def canonicalize(path: str, before: set[int], files: FileExtents | None = None) -> tuple[int, int]:
    """Make the unmounted ext4 image `path` independent of when and how fast the layer was applied
    (see the module docstring); `before` are the inodes in use before the layer. Returns (inodes the
    layer changed, inodes it freed).

    With `files` (the regular files' data extents of the image before the layer, `regular_files`),
    it is brought up to date: every inode the layer changed is read again, every freed one dropped."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        geo = geometry(fd, path)
        size = geo.inode_size
        after = _used(fd, geo)
        freed: dict[int, list[int]] = {}
        for ino in before:
            g, i = divmod(ino - 1, geo.inodes_per_group)
            if g >= geo.groups:
                continue
            freed.setdefault(g, [])
            freed[g].append(i)
        changed = zeroed = 0
        for g in sorted(set(after) | set(freed)):
            used = after.get(g, [])
            used_set = set(used)
            gone = sorted(i for i in freed.get(g, []) if i not in used_set)
            todo = sorted(used_set | set(gone))
            if not todo:
                continue
            table = geo.inode_tables[g] * geo.block_size
            span = (todo[-1] + 1) * size
            buf = bytearray(os.pread(fd, span, table))
            if len(buf) < span:
                raise _fail(path, f"the inode table of group {g} is cut short")
            dirty: list[int] = []
            for i in used:
                ino = g * geo.inodes_per_group + i + 1
                if ino < FIRST_INO and ino != ROOT_INO:
                    continue
                rec = bytearray(buf[i * size : (i + 1) * size])
                if _canonical_inode(rec):
                    buf[i * size : (i + 1) * size] = rec
                    dirty.append(i)
                    changed += 1
                    if files is not None:
                        files.note(ino, rec, fd, geo.block_size)
            for i in gone:
                buf[i * size : (i + 1) * size] = bytes(size)
                dirty.append(i)
                zeroed += 1
                if files is not None:
                    files.drop(g * geo.inodes_per_group + i + 1)
            for i in sorted(dirty):
                os.pwrite(fd, buf[i * size : (i + 1) * size], table + i * size)
        sb = SUPERBLOCK
        os.pwrite(fd, _U32.pack(FAKE_TIME), sb + _S_MTIME)
        os.pwrite(fd, _U32.pack(FAKE_TIME), sb + _S_WTIME)
        os.pwrite(fd, bytes(2), sb + _S_MNT_COUNT)
        os.pwrite(fd, bytes(8), sb + _S_KBYTES_WRITTEN)
        os.pwrite(fd, bytes(_S_LAST_MOUNTED_LEN), sb + _S_LAST_MOUNTED)
        return changed, zeroed
    finally:
        os.close(fd)


# -- where regular files keep their data ------------------------------------------------------------

_S_IFMT, _S_IFREG = 0xF000, 0x8000
_I_MODE, _I_FLAGS, _I_BLOCK = 0x00, 0x20, 0x28
_EXTENTS_FL, _INLINE_DATA_FL = 0x80000, 0x10000000
_EXTENT_MAGIC = 0xF30A
_EXTENT_HEADER = struct.Struct("<HHHHI")  # magic, entries, max, depth, generation
_EXTENT_LEAF = struct.Struct("<IHHI")  # logical block, length, physical hi, physical lo
_EXTENT_INDEX = struct.Struct("<IIH")  # logical block, child lo, child hi
#: ext4 trees are at most 5 levels deep; a deeper one is not a tree we trust.
_MAX_DEPTH = 5
#: An extent longer than this is unwritten (allocated, reads as zeros); its length is the excess.
_INIT_MAX_LEN = 32768


def _extents(fd: int, node: bytes, block_size: int, depth_left: int) -> list[tuple[int, int]] | None:
    """The physical (start, end) byte ranges of the leaves under one extent tree node, or None when it
    does not parse (the caller then trusts nothing about the file)."""
    if len(node) < _EXTENT_HEADER.size:
        return None
    magic, entries, _, depth, _ = _EXTENT_HEADER.unpack_from(node, 0)
    if magic != _EXTENT_MAGIC or depth > depth_left or 12 + entries * 12 > len(node):
        return None
    out: list[tuple[int, int]] = []
    for k in range(entries):
        off = 12 + k * 12
        if depth == 0:
            _, length, hi, lo = _EXTENT_LEAF.unpack_from(node, off)
            if length > _INIT_MAX_LEN:
                length -= _INIT_MAX_LEN
            start = (hi << 32 | lo) * block_size
            out.append((start, start + length * block_size))
        else:
            _, lo, hi = _EXTENT_INDEX.unpack_from(node, off)
            child = os.pread(fd, block_size, (hi << 32 | lo) * block_size)
            below = _extents(fd, child, block_size, depth - 1)
            if below is None:
                return None
            out.extend(below)
    return out


class FileExtents:
    """The data extents (device byte ranges) of every regular file of an ext4 image, by inode.

    What the converter's in-place build relies on (`imagefile`): a layer never writes into a file that
    already exists (an entry replaces a path: the old inode is unlinked and held until the layer ends),
    so these blocks keep their bytes while the next layer is applied. A file whose extents do not parse
    (no extent tree, inline data, a malformed node) is left out: its blocks are then treated like
    metadata, compared and copied, which is always safe."""

    def __init__(self) -> None:
        self.by_inode: dict[int, list[tuple[int, int]]] = {}

    def note(self, ino: int, rec: bytes | bytearray, fd: int, block_size: int) -> None:
        """Read inode `ino` (its record `rec`) again: its extents if it is a regular file."""
        self.by_inode.pop(ino, None)
        mode = struct.unpack_from("<H", rec, _I_MODE)[0]
        flags = _U32.unpack_from(rec, _I_FLAGS)[0]
        if mode & _S_IFMT != _S_IFREG or not flags & _EXTENTS_FL or flags & _INLINE_DATA_FL:
            return
        found = _extents(fd, bytes(rec[_I_BLOCK : _I_BLOCK + 60]), block_size, _MAX_DEPTH)
        if found:
            self.by_inode[ino] = found

    def drop(self, ino: int) -> None:
        self.by_inode.pop(ino, None)

    def extents(self) -> Iterator[tuple[int, int]]:
        """All of them, file after file (`imagefile.merged` sorts and joins them)."""
        for ranges in self.by_inode.values():
            yield from ranges


def regular_files(path: str) -> FileExtents:
    """`FileExtents` of every regular file in the ext4 image `path` (a walk of all inodes in use)."""
    files = FileExtents()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        geo = geometry(fd, path)
        size = geo.inode_size
        for g, used in sorted(_used(fd, geo).items()):
            span = (used[-1] + 1) * size
            buf = os.pread(fd, span, geo.inode_tables[g] * geo.block_size)
            if len(buf) < span:
                raise _fail(path, f"the inode table of group {g} is cut short")
            for i in used:
                ino = g * geo.inodes_per_group + i + 1
                if ino >= FIRST_INO:
                    files.note(ino, buf[i * size : (i + 1) * size], fd, geo.block_size)
    finally:
        os.close(fd)
    return files
