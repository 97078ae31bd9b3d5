"""Applying an OCI layer tar onto a mounted root filesystem, with the image-spec's layer semantics.

`open_layer_stream` turns a layer blob into its tar bytes (gzip or zstd found by magic, streamed with a
bounded buffer); `apply_layer` reads that tar as a stream (``tarfile`` mode ``r|``, nothing buffered
beyond one chunk) and applies each entry under `root` the way the OCI image-spec's ``layer.md``
("Applying Changesets", "Whiteouts") says:

=========================  ===========================================================================
entry                      effect under root
=========================  ===========================================================================
``D/.wh.NAME``             removes ``D/NAME`` (a file or a whole tree) as lower layers left it; what
                           this layer itself created there stays ("whiteout files MUST only apply to
                           resources in lower/parent layers"); never materialised
``D/.wh..wh..opq``         empties ``D`` of everything lower layers put there, whatever the order of the
                           entries in the tar; never materialised
``D/.wh..wh.*`` (other)    AUFS metadata: ignored, as docker and containerd do
directory                  an existing directory keeps its children and takes the new owner, mode and
                           xattrs; anything else there is removed first
anything else              whatever is at the path (a whole tree if a directory) is removed, then the
                           entry is created: file (content streamed; sparse maps become holes),
                           symlink (target stored as given), hardlink (target must already exist under
                           root, from this layer or a lower one), char/block device, fifo
=========================  ===========================================================================

Metadata, in the order the kernel needs it: owner (``chown(2)`` clears setuid/setgid bits and
``security.capability``, so it comes first), xattrs from PAX ``SCHILY.xattr.*`` (and libarchive's
``LIBARCHIVE.xattr.*``), mode with setuid/setgid/sticky, then times with nanoseconds from the PAX
``mtime``/``atime`` records (``TarInfo.mtime`` is a float and loses them). Directory times are set after
the whole layer, when nothing will add children to them any more. A directory entry over an existing
directory brings its whole xattr set (others are removed): containerd's and docker's overlay appliers
make the directory afresh in the new layer's upper directory, so that is what images mean.
uname/gname are ignored; the numeric ids win (layer.md: "secondary to uid").

Path safety: every name is normalised (``./x``, ``a/../b``, ``/x`` is ``x`` as in containerd) and must
stay under root without ever naming root's parent. Each parent directory
is checked with ``lstat`` before anything is created, removed or linked through it, and a symlink met
on the way is an error, never followed: ``link -> /`` followed by ``link/etc/passwd`` (or a whiteout or
hardlink through ``link``) fails and touches nothing outside root. Final components are never followed
either (``O_NOFOLLOW``, ``lchown``, ``lsetxattr``, ``utimensat(AT_SYMLINK_NOFOLLOW)``). We rely on being
the only writer under root while applying, which holds for a converter's private mount.

Determinism: the wall clock never reaches the tree. Directories whose children this layer changed but
that have no entry of their own get their earlier times back; parents the tar implies but does not list
are created ``0755 0:0`` with the time of the entry that needed them. Times outside what ``utimensat``
and ext4 can hold (negative, past 2262) become the epoch, like containerd's ``boundTime``.

A failed apply leaves root half-applied: the converter applies into a scratch upper that it discards
on error, so nothing here is atomic. Every failure is a `LayerError` naming the layer, the entry and
why: hostile paths, links escaping root, a hardlink to nothing, an unknown entry type, and a truncated
or corrupt tar, gzip or zstd stream (also truncation exactly between two entries: the end-of-archive
block must be there, where ``tarfile`` alone would stop silently).
"""

from __future__ import annotations

import base64
import binascii
import errno
import importlib
import io
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import IO, TYPE_CHECKING, Protocol, Self, cast

import zstandard

from ..errors import LayerError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# ISA-L inflates gzip 2-3x faster than zlib, with zlib's API, so one code path serves both. Imported by
# name so that type checking does not depend on the optional package being installed.
_INFLATE: ModuleType = zlib
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,)
try:
    _INFLATE = importlib.import_module("isal.isal_zlib")
    _INFLATE_ERRORS = (zlib.error, _INFLATE.error)
except ImportError:  # pragma: no cover - the zlib path is tested by monkeypatching _INFLATE
    pass

#: What a corrupt gzip or zstd stream raises.
_DECODE_ERRORS: tuple[type[Exception], ...] = (*_INFLATE_ERRORS, zstandard.ZstdError)
# tarfile's header errors, missing from typeshed's stubs.
_EOFHeaderError: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

#: Read and write unit: big enough that syscalls and Python calls do not dominate, small enough that a
#: layer never sits in memory.
CHUNK = 1 << 20
#: zstd's decompressobj has no output limit; one block of input inflates to at most 128 KiB, so feeding
#: it this many bytes at a time bounds one step's output (a hostile stream of minimal RLE blocks: 8 KiB
#: -> 256 MiB worst case; real layers: a few hundred KiB).
_ZSTD_IN = 8 << 10
#: PAX and GNU long-name headers are read whole into memory by tarfile; real ones are a few KiB.
MAX_EXTENDED_HEADER = 1 << 20
#: utimensat and ext4 hold times from the epoch to 2262 (int64 nanoseconds); containerd clamps the same.
_MAX_NS = (1 << 63) - 1

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x04\x22\x4d\x18": "lz4"}

#: The layer media types we apply, by the compression they name. The codec actually used is found by
#: magic (as containerd does: registries exist that label plain tars as gzip); the type only has to be
#: one of these, so an encrypted or foreign-format blob fails with a clear message instead of garbage.
LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

_ROOT_REMEDY = (
    "applying a layer needs root (CAP_CHOWN, CAP_MKNOD, CAP_FOWNER, CAP_SYS_ADMIN for trusted.* xattrs): "
    "run the conversion as root or in a privileged CI runner"
)
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})


# -- the compressed stream -----------------------------------------------------------------------


#: Compressed input: a view is passed on where slicing bytes would copy them.
Input = bytes | memoryview


class Readable(Protocol):
    """What layers are read from: a file, a `LayerStream`, an HTTP body... (only ``read`` is used)."""

    def read(self, size: int, /) -> bytes | None: ...


class _Member(Protocol):
    """One gzip member or zstd frame being decompressed."""

    eof: bool

    def step(self, data: Input) -> tuple[bytes, Input]:
        """Feed `data`; return (output, input not consumed yet). ``step(b"")`` flushes."""
        ...


class _GzipMember:
    def __init__(self) -> None:
        self._d = _INFLATE.decompressobj(wbits=31)  # 31: gzip header and trailer (CRC32, ISIZE) checked
        self.eof = False

    def step(self, data: Input) -> tuple[bytes, Input]:
        out: bytes = self._d.decompress(data, CHUNK)
        self.eof = bool(self._d.eof)
        rest: bytes = self._d.unused_data if self.eof else self._d.unconsumed_tail
        return out, rest


class _ZstdMember:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self.eof = False

    def step(self, data: Input) -> tuple[bytes, Input]:
        view = memoryview(data)  # slices of a view are not copies: a 1 MiB input is fed in many pieces
        piece, rest = view[:_ZSTD_IN], view[_ZSTD_IN:]
        out: bytes = self._d.decompress(piece) if piece else b""
        self.eof = bool(self._d.eof)
        if self.eof:
            return out, bytes(self._d.unused_data) + bytes(rest)
        return out, rest


class LayerStream(io.RawIOBase):
    """The tar bytes of a layer blob, decompressed as they are read (see `open_layer_stream`).

    `codec` is ``"tar"``, ``"gzip"`` or ``"zstd"``; `bytes_in` counts blob bytes read and `bytes_out`
    tar bytes returned (for a progress bar: read them from another thread). Concatenated gzip members
    and zstd frames are one stream, as their formats say; zero padding after the last gzip member is
    accepted, as gzip(1) does. A stream that ends inside a member, a CRC mismatch, or anything that
    does not decode raises `LayerError` (entry ``None``): silence on truncation would let a cut layer
    pass as a complete one.
    """

    def __init__(self, source: Readable, codec: str, *, layer: str, head: bytes = b"") -> None:
        super().__init__()
        if codec not in ("tar", "gzip", "zstd"):
            raise ValueError(f"unknown codec {codec!r}")
        self.codec = codec
        self.layer = layer
        self.bytes_in = len(head)
        self.bytes_out = 0
        self._source = source
        self._pending: Input = head  # input not yet fed to a decompressor (for "tar": not yet returned)
        self._out = memoryview(b"")  # output not yet returned
        self._member: _Member | None = None
        self._source_eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if not self._out:
            self._out = memoryview(self._next_chunk(len(view)))
        n = min(len(view), len(self._out))
        view[:n] = self._out[:n]
        self._out = self._out[n:]  # a view: what is left is not copied
        self.bytes_out += n
        return n

    def _read_source(self, size: int = CHUNK) -> bytes:
        if self._source_eof:
            return b""
        data = self._source.read(size)
        if not data:
            self._source_eof = True
            return b""
        self.bytes_in += len(data)
        return bytes(data)

    def _fail(self, why: str) -> LayerError:
        return LayerError(self.layer, None, f"{self.codec} stream at blob byte {self.bytes_in}: {why}")

    def _next_chunk(self, size: int) -> bytes:
        """Up to about `size` more tar bytes (b"" at the end of the stream)."""
        if self.codec == "tar":
            if self._pending:
                out, self._pending = bytes(self._pending), b""
                return out
            return self._read_source(max(size, 1))
        # Steps yield small pieces (zstd: a few KiB); gather about `size` so that the tar reader above
        # does not pay a Python call per piece.
        parts: list[bytes] = []
        got = 0
        while got < size:
            out = self._step()
            if not out:
                break
            parts.append(out)
            got += len(out)
        return b"".join(parts)

    def _step(self) -> bytes:
        """The next piece of decompressed bytes; b"" at the end of the stream."""
        while True:
            if self._member is None:  # between members: another one, zero padding, or the end
                if not self._pending:
                    self._pending = self._read_source()
                    if not self._pending:
                        return b""
                if self.codec == "gzip" and self._pending[0] == 0:
                    self._check_zero_tail()
                    return b""
                self._member = _GzipMember() if self.codec == "gzip" else _ZstdMember()
            if not self._pending:
                self._pending = self._read_source()
            try:
                out, self._pending = self._member.step(self._pending)
            except _DECODE_ERRORS as e:
                raise self._fail(f"corrupt data ({e})") from None
            if self._member.eof:
                self._member = None
            elif not out and not self._pending and self._source_eof:
                raise self._fail("truncated: the blob ends inside compressed data")
            if out:
                return out

    def _check_zero_tail(self) -> None:
        while self._pending:
            if bytes(self._pending).count(0) != len(self._pending):
                raise self._fail("trailing garbage after the last gzip member")
            self._pending = self._read_source()


def detect_codec(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"tar"`` from the first bytes of a blob; other compressions raise."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    # A zstd frame, or a skippable frame (magic 0x184D2A5?, little-endian) that a zstd stream may
    # start with (RFC 8878 §3.1.2).
    if head.startswith(ZSTD_MAGIC) or (
        len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18"
    ):
        return "zstd"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            raise ValueError(f"{name}-compressed layers are not part of the OCI image-spec")
    return "tar"


def open_layer_stream(fileobj: Readable, media_type: str | None = None, *, layer: str) -> LayerStream:
    """The tar bytes of a layer blob read from `fileobj`, decompressed on the fly.

    The codec comes from the blob's magic (gzip ``1f8b``, zstd ``28b52ffd``, else a plain tar); gzip
    goes through ISA-L when the ``isal`` package is installed, else zlib. `media_type`, when given,
    must be a layer type of `LAYER_MEDIA_TYPES`; a mismatch with the magic is logged and the magic wins,
    as in containerd.
    """
    if media_type is not None and media_type not in LAYER_MEDIA_TYPES:
        raise LayerError(
            layer,
            None,
            f"unsupported media type {media_type!r} (encrypted, foreign or not a layer tar)",
            "convert images whose layers are plain, gzip or zstd tars",
        )
    head = b""
    while len(head) < 4:
        more = fileobj.read(4 - len(head))
        if not more:
            break
        head += more
    try:
        codec = detect_codec(head)
    except ValueError as e:
        raise LayerError(layer, None, str(e), "recompress the layer with gzip or zstd") from None
    declared = LAYER_MEDIA_TYPES.get(media_type or "", codec)
    if declared != codec:
        log.warning("layer %s: media type %s says %s, the blob is %s", layer, media_type, declared, codec)
    return LayerStream(fileobj, codec, layer=layer, head=head)


# -- reading the tar -----------------------------------------------------------------------------


class _TarCorruptError(Exception):
    """A header that is not a tar header, or the stream ending without the end-of-archive block."""

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


class _CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo whose reading refuses what tarfile, in stream mode, takes for a normal end.

    ``TarFile.next()`` ends the archive quietly on a missing, short or invalid header after the first
    entry. Only a zero block (`EOFHeaderError`) ends a layer here; everything else raises `_TarCorruptError`,
    which ``next()`` lets through untouched. Extended headers are bounded before tarfile reads them
    into memory.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        fileobj = tf.fileobj
        assert fileobj is not None  # an open TarFile always has one
        offset = fileobj.tell()
        buf = fileobj.read(tarfile.BLOCKSIZE)
        try:
            obj = cls.frombuf(buf, tf.encoding, tf.errors)
        except _EOFHeaderError:
            raise  # the end-of-archive block: the one normal end
        except _EmptyHeaderError:
            raise _TarCorruptError(
                offset, "truncated: the stream ends without the end-of-archive block"
            ) from None
        except _TruncatedHeaderError:
            raise _TarCorruptError(offset, "truncated: the stream ends inside a tar header") from None
        except tarfile.HeaderError as e:
            raise _TarCorruptError(offset, f"not a valid tar header ({e})") from None
        if obj.type in _EXTENDED_TYPES and obj.size > MAX_EXTENDED_HEADER:
            raise _TarCorruptError(
                offset, f"an extended header of {obj.size} bytes (at most {MAX_EXTENDED_HEADER})"
            )
        obj.offset = offset
        try:
            member: Self = obj._proc_member(tf)  # type: ignore[attr-defined]  # tarfile's extension hook
        except (tarfile.HeaderError, ValueError) as e:  # a bad PAX/GNU extension or what follows it
            raise _TarCorruptError(offset, f"invalid extended header ({e})") from None
        return member


_EXTENDED_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_PAX_TIME = re.compile(r"(-?)([0-9]+)(?:\.([0-9]*))?")


def _pax_ns(value: str) -> int | None:
    """A PAX time record ("1700000000.123456789", digits past nanoseconds dropped) in nanoseconds."""
    m = _PAX_TIME.fullmatch(value)
    if m is None:
        return None
    ns = int(m.group(2)) * 1_000_000_000 + int((m.group(3) or "")[:9].ljust(9, "0"))
    return -ns if m.group(1) else ns


def _type(m: tarfile.TarInfo) -> str:
    return m.type.decode("latin-1")


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_NS else 0


# -- applying ------------------------------------------------------------------------------------


@dataclass
class ApplyStats:
    """What one `apply_layer` did."""

    entries: int = 0  # tar entries read, whiteouts included
    files: int = 0  # regular files, sparse ones included
    sparse_files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0  # character and block devices
    fifos: int = 0
    whiteouts: int = 0  # `.wh.NAME` entries
    opaques: int = 0  # `.wh..wh..opq` entries
    removed: int = 0  # lower-layer paths (a file or a whole tree) removed by whiteouts and opaques
    replaced: int = 0  # existing paths (a whole tree for a dir) removed to make room for an entry
    xattrs: int = 0
    xattrs_skipped: int = 0  # not supported by the filesystem, or user.* on a symlink or device
    skipped: int = 0  # AUFS metadata entries (`.wh..wh.*`)
    bytes: int = 0  # file content written (holes of sparse files not counted)


class _Applier:
    def __init__(self, root: str, layer: str, preserve: Iterable[str], hold_removed: bool = False) -> None:
        self.root = root
        # With `hold_removed`, every inode this layer removes stays referenced (an O_PATH descriptor)
        # until `release`: the filesystem frees them all at the end, in one deterministic order, never
        # in the middle of the layer where its allocator would reuse them depending on the clock.
        self._hold = hold_removed
        self._held: list[int] = []
        self.layer = layer
        self.entry: str | None = None
        self.stats = ApplyStats()
        # Paths this layer created or modified, and their ancestors: what whiteouts and opaque
        # directories must leave alone (plus `preserve`, e.g. ext4's lost+found).
        self._mine: set[str] = set()
        for path in preserve:
            self._mark_mine(path)
        self._dirs: set[str] = set()  # directories already checked to be real directories
        self._dir_times: dict[str, tuple[int, int]] = {}  # (atime, mtime) ns to set at the end
        self._buf = bytearray(CHUNK)

    # -- paths --

    def _err(self, why: str, remedy: str | None = None) -> LayerError:
        if remedy is None:
            return LayerError(self.layer, self.entry, why)
        return LayerError(self.layer, self.entry, why, remedy)

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _clean(self, name: str, what: str) -> str:
        """`name` as a normalised path relative to root ("" for root itself), or a LayerError."""
        # A leading "/" names the same path relative to the root, as containerd applies it (OCI
        # layer.md says paths are relative; docker-archive tools write absolute ones). "/.." still
        # leaves the root and fails below.
        parts: list[str] = []
        for comp in name.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    raise self._err(f"{what} {name!r} leaves the root through '..'")
                parts.pop()
            else:
                parts.append(comp)
        return "/".join(parts)

    def _parents(self, rel: str, *, create: bool, mtime_ns: int = 0) -> bool:
        """Check (and with `create`, make) every parent of `rel`; False if one is missing or no dir.

        A symlink among them is always an error: nothing is ever written, removed or linked through
        one. Created parents are ``0755 0:0`` with time `mtime_ns`, as containerd's MkdirAll makes them.
        """
        prefix = ""
        for comp in rel.split("/")[:-1]:
            parent, prefix = prefix, f"{prefix}/{comp}" if prefix else comp
            if prefix in self._dirs:
                continue
            path = self._path(prefix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return False
                self._touch(parent)
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # whatever the umask
                self._dir_times[prefix] = (mtime_ns, mtime_ns)
                self._dirs.add(prefix)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self._err(
                    f"parent {prefix!r} is a symlink (to {os.readlink(path)!r}); layer entries are never "
                    "written, removed or linked through symlinks, which could reach outside the root"
                )
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    return False
                raise self._err(f"parent {prefix!r} is not a directory")
            self._dirs.add(prefix)
        return True

    def _mark_mine(self, rel: str) -> None:
        while rel not in self._mine:
            self._mine.add(rel)
            rel = rel.rpartition("/")[0]

    def _touch(self, dir_rel: str) -> None:
        """Remember a directory's times before its children change (see "Determinism")."""
        if dir_rel not in self._dir_times:
            st = os.lstat(self._path(dir_rel))
            self._dir_times[dir_rel] = (st.st_atime_ns, st.st_mtime_ns)

    def _hold_tree(self, path: str, is_dir: bool) -> None:
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if is_dir:
            for top, dirs, files in os.walk(path, topdown=True, followlinks=False):
                for name in dirs + files:
                    self._held.append(os.open(os.path.join(top, name), flags))
        self._held.append(os.open(path, flags))

    def release(self) -> None:
        """Let the filesystem free what this layer removed (see `hold_removed`)."""
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)

    def _remove(self, rel: str, st: os.stat_result) -> None:
        self._touch(rel.rpartition("/")[0])
        path = self._path(rel)
        if self._hold:
            self._hold_tree(path, stat.S_ISDIR(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based: never follows a symlink inside the tree
            inside = rel + "/"
            self._dirs = {d for d in self._dirs if d != rel and not d.startswith(inside)}
            gone = [d for d in self._dir_times if d == rel or d.startswith(inside)]
            for d in gone:
                del self._dir_times[d]
        else:
            os.unlink(path)

    def _make_room(self, rel: str, *, for_dir: bool) -> bool:
        """Clear `rel` for a new entry; True when it is a directory that a directory entry keeps."""
        try:
            st = os.lstat(self._path(rel))
        except FileNotFoundError:
            self._touch(rel.rpartition("/")[0])
            return False
        if for_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(rel, st)
        self.stats.replaced += 1
        return False

    def _prune(self, rel: str) -> None:
        """Remove what lower layers left at and below `rel`; keep what this layer made there."""
        stack = [rel]
        while stack:
            cur = stack.pop()
            try:
                st = os.lstat(self._path(cur))
            except FileNotFoundError:
                continue
            if cur not in self._mine:
                self._remove(cur, st)
                self.stats.removed += 1
            elif stat.S_ISDIR(st.st_mode):
                stack.extend(f"{cur}/{name}" for name in os.listdir(self._path(cur)))

    # -- entries --

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.entry = m.name
        self.stats.entries += 1
        rel = self._clean(m.name, "path")
        parent, _, base = rel.rpartition("/")
        if any(c.startswith(WHITEOUT_PREFIX) for c in parent.split("/")):
            raise self._err("a whiteout name is used as a directory; whiteouts are files (OCI layer.md)")
        if rel == "" and not m.isdir():
            raise self._err(f"the root entry must be a directory, not type {_type(m)!r}")
        try:
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(rel, parent, base)
            elif rel == "":
                self._directory(m, rel)
            else:
                self._create(tf, m, rel)
                self._mark_mine(rel)
        except OSError as e:
            raise self._os_error(e, f"cannot apply {rel or '.'!r}") from None
        self.entry = None

    def _os_error(self, e: OSError, what: str) -> LayerError:
        why = f"{what}: {e.strerror or e}"
        if e.errno in (errno.EPERM, errno.EACCES):
            return self._err(why, _ROOT_REMEDY)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._err(why, "the target filesystem is full: give the layer device a larger size")
        return self._err(why)

    def _whiteout(self, rel: str, parent: str, base: str) -> None:
        # Whiteouts never create their directory (containerd's RemoveAll): if it is missing or not a
        # directory, there is nothing of a lower layer to hide.
        if base == WHITEOUT_OPAQUE:
            self.stats.opaques += 1
            if self._parents(rel, create=False):
                try:
                    names = os.listdir(self._path(parent))
                except FileNotFoundError:
                    return
                for name in names:
                    self._prune(f"{parent}/{name}" if parent else name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            self.stats.skipped += 1
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise self._err(f"whiteout of {target!r} names no entry")
        self.stats.whiteouts += 1
        if self._parents(rel, create=False):
            self._prune(f"{parent}/{target}" if parent else target)

    def _create(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str) -> None:
        atime, mtime = self._times(m)
        if m.islnk():
            self._hardlink(m, rel, atime, mtime)
            return
        if m.type not in _REGULAR and not (m.isdir() or m.issym() or m.ischr() or m.isblk() or m.isfifo()):
            raise self._err(
                f"unsupported entry type {_type(m)!r}",
                "layers hold files, dirs, links, devices, fifos",
            )
        self._parents(rel, create=True, mtime_ns=mtime)
        if m.isdir():
            self._directory(m, rel)
            return
        self._make_room(rel, for_dir=False)
        path = self._path(rel)
        if m.type in _REGULAR:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if m.sparse is not None:
                    self._write_sparse(tf, m, fd)
                else:
                    self._write(tf, m, fd)
                os.fchown(fd, m.uid, m.gid)
                self._set_xattrs(m, fd, "file")
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
            self.stats.files += 1
            return
        if m.issym():
            if not m.linkname:
                raise self._err("symlink with an empty target")
            os.symlink(m.linkname, path)
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
            self._set_xattrs(m, path, "symlink")
            self.stats.symlinks += 1
        else:
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            dev = os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(path, kind | 0o600, dev)
            os.chown(path, m.uid, m.gid, follow_symlinks=False)
            self._set_xattrs(m, path, "device")
            os.chmod(path, m.mode & 0o7777)  # a node we just made: not a symlink to follow
            if kind == stat.S_IFIFO:
                self.stats.fifos += 1
            else:
                self.stats.devices += 1
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def _directory(self, m: tarfile.TarInfo, rel: str) -> None:
        path = self._path(rel)
        try:
            if rel and not self._make_room(rel, for_dir=True):
                os.mkdir(path, 0o700)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, m.uid, m.gid)
                self._drop_other_xattrs(m, fd)
                self._set_xattrs(m, fd, "dir")
                os.fchmod(fd, m.mode & 0o7777)
            finally:
                os.close(fd)
        except OSError as e:
            raise self._os_error(e, f"cannot create directory {rel or '.'!r}") from None
        self._dirs.add(rel)
        self._dir_times[rel] = self._times(m)
        self._mark_mine(rel)
        self.stats.dirs += 1

    def _hardlink(self, m: tarfile.TarInfo, rel: str, atime: int, mtime: int) -> None:
        target = self._clean(m.linkname, "hardlink target")
        if not target:
            raise self._err("hardlink to the root directory")
        if not self._parents(target, create=False):
            raise self._err(f"hardlink target {m.linkname!r} does not exist (in this layer or a lower one)")
        src = self._path(target)
        try:
            tst = os.lstat(src)
        except FileNotFoundError:
            raise self._err(
                f"hardlink target {m.linkname!r} does not exist (in this layer or a lower one)"
            ) from None
        if stat.S_ISDIR(tst.st_mode):
            raise self._err(f"hardlink target {m.linkname!r} is a directory")
        self._parents(rel, create=True, mtime_ns=mtime)
        dst = self._path(rel)
        try:
            cur: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            cur = None
        if cur is None or not os.path.samestat(cur, tst):
            self._make_room(rel, for_dir=False)
            os.link(src, dst, follow_symlinks=False)
        # The entry's metadata is the inode's (what containerd does). chown(2) clears setuid bits and
        # security.capability even when the owner does not change, so only a real change is made.
        if (tst.st_uid, tst.st_gid) != (m.uid, m.gid):
            os.chown(dst, m.uid, m.gid, follow_symlinks=False)
        self._set_xattrs(m, dst, "symlink" if stat.S_ISLNK(tst.st_mode) else "file")
        if not stat.S_ISLNK(tst.st_mode):
            os.chmod(dst, m.mode & 0o7777)
        os.utime(dst, ns=(atime, mtime), follow_symlinks=False)
        self.stats.hardlinks += 1

    # -- content and metadata --

    def _write(self, tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
        src = tf.extractfile(m)
        assert src is not None  # regular files always have a reader
        view = memoryview(self._buf)
        left = m.size
        while left > 0:
            n = cast(io.BufferedReader, src).readinto(view[: min(left, CHUNK)])
            if not n:
                raise self._err("truncated: the stream ends inside this file's data")
            _write_all(fd, view[:n])
            left -= n
        self.stats.bytes += m.size

    def _write_sparse(self, tf: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
        # tarfile's own reader of a sparse member materialises the holes as zeros and cannot seek a
        # stream, so the data regions are read in archive order straight from the stream, each written
        # at its offset: what is not written stays a hole.
        src = tf.fileobj
        sparse = cast("list[tuple[int, int]]", m.sparse)  # typeshed does not know its type
        assert src is not None
        # GNU tar pads the map with (0, 0) and ends it with (size, 0) for a file ending in a hole.
        sparse = [(offset, size) for offset, size in sparse if size]
        end = 0
        for offset, size in sparse:
            if offset < end or size < 0 or offset + size > m.size:
                raise self._err(
                    f"sparse map region ({offset}, {size}) overlaps or leaves the {m.size}-byte file"
                )
            end = offset + size
        if src.tell() != m.offset_data:
            raise self._err("sparse data does not follow its header")
        for offset, size in sparse:
            pos, left = offset, size
            while left > 0:
                data = src.read(min(left, CHUNK))
                if not data:
                    raise self._err("truncated: the stream ends inside this file's data")
                _pwrite_all(fd, data, pos)
                pos += len(data)
                left -= len(data)
            self.stats.bytes += size
        os.ftruncate(fd, m.size)
        self.stats.sparse_files += 1

    def _times(self, m: tarfile.TarInfo) -> tuple[int, int]:
        """(atime, mtime) in ns: PAX records keep nanoseconds; atime is never before mtime (containerd)."""
        pax = m.pax_headers
        mtime = int(m.mtime) * 1_000_000_000
        if "mtime" in pax:
            parsed = _pax_ns(pax["mtime"])
            if parsed is None:
                raise self._err(f"invalid PAX mtime {pax['mtime']!r}")
            mtime = parsed
        atime = mtime
        if "atime" in pax:
            parsed = _pax_ns(pax["atime"])
            atime = max(parsed, mtime) if parsed is not None else mtime
        return _bound(atime), _bound(mtime)

    def _xattrs(self, m: tarfile.TarInfo) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):  # value: the raw bytes, read back with surrogateescape
                out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
        for key, value in m.pax_headers.items():  # libarchive: URL-encoded name, base64 value
            if key.startswith("LIBARCHIVE.xattr."):
                name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :], errors="surrogateescape")
                try:
                    raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
                except (binascii.Error, ValueError):
                    raise self._err(f"xattr {name!r}: value is not base64") from None
                out.setdefault(name, raw)
        return out

    def _drop_other_xattrs(self, m: tarfile.TarInfo, fd: int) -> None:
        """A directory entry over an existing directory brings its whole xattr set: what containerd's
        and docker's overlay appliers produce, since they make the directory afresh in the new layer."""
        keep = self._xattrs(m)
        for name in os.listxattr(fd):
            if name not in keep:
                try:
                    os.removexattr(fd, name)
                except OSError as e:
                    if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                        raise self._os_error(e, f"cannot remove xattr {name!r}") from None

    def _set_xattrs(self, m: tarfile.TarInfo, target: int | str, kind: str) -> None:
        for name, value in sorted(self._xattrs(m).items()):
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                # The kernel refuses user.* on symlinks and devices (xattr(7)); a filesystem may not
                # support a namespace at all. Neither is the layer's fault: note it and go on, as
                # containerd does for ENOTSUP.
                special = (
                    e.errno == errno.EPERM and name.startswith("user.") and kind in ("symlink", "device")
                )
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or special:
                    log.warning(
                        "layer %s, entry %r: xattr %s not set: %s", self.layer, self.entry, name, e.strerror
                    )
                    self.stats.xattrs_skipped += 1
                    continue
                raise self._os_error(e, f"cannot set xattr {name!r}") from None
            self.stats.xattrs += 1

    def finish(self) -> None:
        """Set directory times, now that no child will change them any more."""
        self.entry = None
        for rel, (atime, mtime) in sorted(self._dir_times.items()):
            path = self._path(rel)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._os_error(e, f"cannot set the times of directory {rel or '.'!r}") from None


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def apply_layer(
    stream: Readable,
    root: str | os.PathLike[str],
    *,
    layer: str,
    preserve: Iterable[str] = (),
    hold_removed: bool = False,
) -> ApplyStats:
    """Apply the layer tar read from `stream` onto the directory `root`; see the module docstring.

    `stream` yields the uncompressed tar (a `LayerStream` from `open_layer_stream` for a blob); it is
    read to its end, so a decompressor's trailer check and a caller's digest see every byte. `layer`
    names the layer in errors. `preserve` lists paths relative to root that whiteouts and opaque
    directories never remove (ext4's ``lost+found``). `hold_removed` keeps every removed inode referenced
    until the layer is applied, so the filesystem frees them only at the end (the converter's
    reproducible allocation; the process needs a descriptor per removed inode). Raises `LayerError`.
    """
    top = os.path.realpath(root)  # the caller's root is trusted; resolving it once lets O_NOFOLLOW work
    if not os.path.isdir(top):
        raise LayerError(layer, None, f"root {top!r} is not a directory", "mount the target filesystem first")
    applier = _Applier(top, layer, [p.strip("/") for p in preserve], hold_removed)
    last: str | None = None  # the last entry read, to place a corruption between two entries
    try:
        with tarfile.open(
            fileobj=cast(IO[bytes], stream),  # stream mode ("r|") only ever calls read()
            mode="r|",
            tarinfo=_CheckedTarInfo,
            bufsize=CHUNK,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every member read
                applier.apply(tf, m)  # leaves applier.entry None when done, so errors in between
                last = m.name  # are not pinned on it
        applier.finish()
        while stream.read(CHUNK):  # padding after the end-of-archive block; then the stream's trailer
            pass
    except LayerError as e:
        if e.entry is None and applier.entry is not None:  # a stream error inside an entry: name it
            raise LayerError(layer, applier.entry, e.why, e.remedy) from None
        raise
    except _TarCorruptError as e:
        after = f" after entry {last!r}" if last is not None else ""
        raise LayerError(layer, None, f"tar stream at byte {e.offset}{after}: {e.why}") from None
    except (tarfile.TarError, EOFError) as e:  # tarfile's own "unexpected end of data"
        after = f" (after entry {last!r})" if applier.entry is None and last is not None else ""
        raise LayerError(layer, applier.entry, f"truncated or corrupt tar stream: {e}{after}") from None
    finally:
        applier.release()
    return applier.stats
