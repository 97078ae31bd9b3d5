"""The FUSE kernel ABI we speak on /dev/fuse: opcodes, flags and the structures of <linux/fuse.h>.

Protocol 7.31 (the kernel accepts an older minor and adapts). Each structure is one `struct.Struct`
named after its C type; `LAYOUTS` lists the C fields each one covers, in order, so
``tests/snapshotter/test_fuseabi.py`` can compile a program against the system's <linux/fuse.h>
(linux-libc-dev) and compare every size and field offset with ours. A `…_HEAD` covers the fixed part
that precedes a nested structure or a variable tail (the C ``attr`` member, a ``name[]``).
"""

from __future__ import annotations

import stat
import struct

KERNEL_MAJOR = 7
KERNEL_MINOR = 31  # what we speak

# -- opcodes (enum fuse_opcode) ------------------------------------------------------------------

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT = 20, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, LSEEK = 34, 36, 38, 42, 43, 46

#: fuse_notify_code: sent as the error field of an out header whose unique is 0.
NOTIFY_STORE = 4

# -- structures ----------------------------------------------------------------------------------

IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header, 40 bytes
OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header, 16 bytes
INIT_IN = struct.Struct("<IIII")  # fuse_init_in up to flags (what every kernel sends)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out, 64 bytes
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # fuse_entry_out before its attr
ATTR_OUT_HEAD = struct.Struct("<QII")  # fuse_attr_out before its attr
OPEN_IN = struct.Struct("<II")  # fuse_open_in
OPEN_OUT = struct.Struct("<QII")  # fuse_open_out
READ_IN = struct.Struct("<QQIIQII")  # fuse_read_in
WRITE_IN = struct.Struct("<QQIIQII")  # fuse_write_in (the data follows)
WRITE_OUT = struct.Struct("<II")  # fuse_write_out
FALLOCATE_IN = struct.Struct("<QQQII")  # fuse_fallocate_in
DIRENT_HEAD = struct.Struct("<QQII")  # fuse_dirent before its name
KSTATFS = struct.Struct("<QQQQQIIII24x")  # fuse_kstatfs (= fuse_statfs_out)
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # fuse_setattr_in
LSEEK_IN = struct.Struct("<QQII")  # fuse_lseek_in
LSEEK_OUT = struct.Struct("<Q")  # fuse_lseek_out
NOTIFY_STORE_OUT = struct.Struct("<QQII")  # fuse_notify_store_out (the data follows)


#: C type -> (our structure, the C fields it covers in order, the C member where it stops or None).
#: Fields we pad over (``unused``, ``spare``) are named only to place the end of the structure.
def _fields(names: str) -> tuple[str, ...]:
    return tuple(names.split())


LAYOUTS: dict[str, tuple[struct.Struct, tuple[str, ...], str | None]] = {
    "fuse_in_header": (IN_HEADER, _fields("len opcode unique nodeid uid gid pid total_extlen padding"), None),
    "fuse_out_header": (OUT_HEADER, _fields("len error unique"), None),
    "fuse_init_in": (INIT_IN, _fields("major minor max_readahead flags"), "flags2"),
    "fuse_init_out": (
        INIT_OUT,
        _fields(
            "major minor max_readahead flags max_background congestion_threshold max_write time_gran"
            " max_pages map_alignment flags2"
        ),
        None,
    ),
    "fuse_attr": (
        ATTR,
        _fields(
            "ino size blocks atime mtime ctime atimensec mtimensec ctimensec"
            " mode nlink uid gid rdev blksize flags"
        ),
        None,
    ),
    "fuse_entry_out": (
        ENTRY_OUT_HEAD,
        _fields("nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec"),
        "attr",
    ),
    "fuse_attr_out": (ATTR_OUT_HEAD, _fields("attr_valid attr_valid_nsec dummy"), "attr"),
    "fuse_open_in": (OPEN_IN, _fields("flags open_flags"), None),
    "fuse_open_out": (OPEN_OUT, _fields("fh open_flags"), None),
    "fuse_read_in": (READ_IN, _fields("fh offset size read_flags lock_owner flags padding"), None),
    "fuse_write_in": (WRITE_IN, _fields("fh offset size write_flags lock_owner flags padding"), None),
    "fuse_write_out": (WRITE_OUT, _fields("size padding"), None),
    "fuse_fallocate_in": (FALLOCATE_IN, _fields("fh offset length mode padding"), None),
    "fuse_dirent": (DIRENT_HEAD, _fields("ino off namelen type"), "name"),
    "fuse_kstatfs": (
        KSTATFS,
        _fields("blocks bfree bavail files ffree bsize namelen frsize padding spare"),
        None,
    ),
    "fuse_setattr_in": (
        SETATTR_IN,
        _fields(
            "valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec"
            " mode unused4 uid gid unused5"
        ),
        None,
    ),
    "fuse_lseek_in": (LSEEK_IN, _fields("fh offset whence padding"), None),
    "fuse_lseek_out": (LSEEK_OUT, _fields("offset"), None),
    "fuse_notify_store_out": (NOTIFY_STORE_OUT, _fields("nodeid offset size padding"), None),
}

# -- flags ---------------------------------------------------------------------------------------

# fuse_init_in/out flags
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22

FOPEN_KEEP_CACHE = 1 << 1  # fuse_open_out.open_flags
FATTR_SIZE = 1 << 3  # fuse_setattr_in.valid

# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

ROOT_INODE = 1  # FUSE_ROOT_ID


# -- encoders ------------------------------------------------------------------------------------

#: What we ask of INIT's flags (the kernel grants the ones it knows).
INIT_FLAGS = ASYNC_READ | BIG_WRITES | MAX_PAGES | PARALLEL_DIROPS | ASYNC_DIO


def init_reply(kernel_minor: int, max_readahead: int, kernel_flags: int, max_write: int) -> bytes:
    """The fuse_init_out of a server that speaks `KERNEL_MINOR` and writes `max_write`-byte requests."""
    return INIT_OUT.pack(
        KERNEL_MAJOR,
        min(kernel_minor, KERNEL_MINOR),
        max_readahead,
        kernel_flags & INIT_FLAGS,
        64,  # max_background
        48,  # congestion_threshold
        max_write,
        1,  # time_gran
        max_write // 4096,  # max_pages
        0,  # map_alignment
        0,  # flags2
    )


def dirents(files: list[tuple[int, str]], offset: int, size: int) -> bytes:
    """A READDIR reply of a flat directory holding `files` ((inode, name), in order): the entries from
    index `offset` on ("." and ".." first) that fit in `size` bytes, each 8-byte aligned."""
    entries = [(ROOT_INODE, ".", stat.S_IFDIR), (ROOT_INODE, "..", stat.S_IFDIR)]
    entries += [(ino, name, stat.S_IFREG) for ino, name in files]
    out = bytearray()
    for i in range(offset, len(entries)):
        ino, name, mode = entries[i]
        raw = name.encode("utf-8", "surrogateescape")
        rec = DIRENT_HEAD.pack(ino, i + 1, len(raw), mode >> 12) + raw
        rec += bytes(-len(rec) % 8)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)
