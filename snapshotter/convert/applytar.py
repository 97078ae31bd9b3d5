"""Applying an OCI layer tar onto a mounted root filesystem, with the image-spec's layer semantics.

`apply_layer` reads the tar as a stream (`tarentries.open_tar`; a blob's compression is undone by
`layerstream.open_layer_stream` first) and applies each entry under `root` the way the OCI
image-spec's ``layer.md`` ("Applying Changesets", "Whiteouts") says:

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
``security.capability``, so it comes first), xattrs (`entrymeta.entry_xattrs`, `entryfiles`), mode
with setuid/setgid/sticky, then times with nanoseconds (`entrymeta.entry_times`). Directory times are
set after the whole layer, when nothing will add children to them any more. uname/gname are ignored;
the numeric ids win (layer.md: "secondary to uid"). Final components are never followed (``O_NOFOLLOW``,
``lchown``, ``lsetxattr``, ``utimensat(AT_SYMLINK_NOFOLLOW)``); parents are checked by `roottree`.

A failed apply leaves root half-applied: the converter applies into a scratch upper that it discards
on error, so nothing here is atomic. Every failure is a `LayerError` naming the layer, the entry and
why: hostile paths, links escaping root, a hardlink to nothing, an unknown entry type, and a truncated
or corrupt tar, gzip or zstd stream (also truncation exactly between two entries).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import LayerError
from .entryfiles import drop_other_xattrs, set_xattrs, write_data, write_sparse
from .entrymeta import EntryMetadataError, entry_times, entry_type, entry_xattrs
from .layerstream import CHUNK, Readable
from .roottree import RootTree
from .tarentries import REGULAR_TYPES, ForwardReader, TarCorruptError, open_tar

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

#: Entry types other than regular files and hardlinks that a layer may hold.
_OTHER_TYPES = frozenset(
    {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE}
)
#: A regular file is created, never opened: whatever was at its path has been removed.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
    """Applies entries one by one onto a `RootTree`, counting what it does."""

    def __init__(self, tree: RootTree) -> None:
        self.tree = tree
        self.stats = ApplyStats()
        self.umask = _umask()

    def apply(self, src: ForwardReader, m: tarfile.TarInfo) -> None:
        tree = self.tree
        tree.entry = m.name
        self.stats.entries += 1
        rel = tree.clean(m.name, "path")
        # (A name without ".wh." anywhere has no whiteout component: most entries skip the checks.)
        whiteout = False
        if WHITEOUT_PREFIX in rel:
            parent, _, base = rel.rpartition("/")
            if any(c.startswith(WHITEOUT_PREFIX) for c in parent.split("/")):
                raise tree.err("a whiteout name is used as a directory; whiteouts are files (OCI layer.md)")
            whiteout = base.startswith(WHITEOUT_PREFIX)
        if rel == "" and m.type != tarfile.DIRTYPE:
            raise tree.err(f"the root entry must be a directory, not type {entry_type(m)!r}")
        try:
            if whiteout:
                self._whiteout(rel, parent, base)
            elif rel == "":
                self._directory(m, rel)
            else:
                self._create(src, m, rel)
                tree.mark_mine(rel)
        except OSError as e:
            raise self.tree.os_error(e, f"cannot apply {rel or '.'!r}") from None
        except EntryMetadataError as e:
            raise self.tree.err(str(e)) from None
        self.tree.entry = None

    def _whiteout(self, rel: str, parent: str, base: str) -> None:
        # Whiteouts never create their directory (containerd's RemoveAll): if it is missing or not a
        # directory, there is nothing of a lower layer to hide.
        if base == WHITEOUT_OPAQUE:
            self.stats.opaques += 1
            if self.tree.parents(rel, create=False):
                try:
                    names = os.listdir(self.tree.path(parent))
                except FileNotFoundError:
                    return
                for name in names:
                    self.tree.prune(f"{parent}/{name}" if parent else name)
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            self.stats.skipped += 1
            return
        target = base[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            raise self.tree.err(f"whiteout of {target!r} names no entry")
        self.stats.whiteouts += 1
        if self.tree.parents(rel, create=False):
            self.tree.prune(f"{parent}/{target}" if parent else target)

    def _create(self, src: ForwardReader, m: tarfile.TarInfo, rel: str) -> None:
        tree = self.tree
        typ = m.type
        atime, mtime = entry_times(m)
        if typ == tarfile.LNKTYPE:
            self._hardlink(m, rel, atime, mtime)
            return
        if typ not in REGULAR_TYPES and typ not in _OTHER_TYPES:
            raise tree.err(
                f"unsupported entry type {entry_type(m)!r}",
                "layers hold files, dirs, links, devices, fifos",
            )
        tree.parents(rel, create=True, mtime_ns=mtime)
        if typ == tarfile.DIRTYPE:
            self._directory(m, rel)
            return
        tree.make_room(rel, for_dir=False)
        path = tree.path(rel)
        if typ in REGULAR_TYPES:
            mode = m.mode & 0o7777
            # Made with its final permissions when the umask leaves them be and there are no
            # setuid/setgid/sticky bits (which chown(2) would clear): one fchmod less per file.
            plain = not mode & (0o7000 | self.umask)
            fd = os.open(path, _CREATE, mode if plain else 0o600)
            try:
                if m.sparse is not None:
                    self.stats.bytes += write_sparse(src, m, fd, tree)
                    self.stats.sparse_files += 1
                else:
                    self.stats.bytes += write_data(src, m, fd, tree)
                os.fchown(fd, m.uid, m.gid)
                if m.pax_headers:  # (xattrs come from PAX records only)
                    self._set_xattrs(m, fd, "file")
                if not plain:
                    os.fchmod(fd, mode)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
            self.stats.files += 1
            return
        if m.issym():
            if not m.linkname:
                raise self.tree.err("symlink with an empty target")
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
        path = self.tree.path(rel)
        made = False
        try:
            if rel and not self.tree.make_room(rel, for_dir=True):
                os.mkdir(path, 0o700)
                made = True
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, m.uid, m.gid)
                drop_other_xattrs(entry_xattrs(m), fd, self.tree)
                self._set_xattrs(m, fd, "dir")
                os.fchmod(fd, m.mode & 0o7777)
            finally:
                os.close(fd)
        except OSError as e:
            raise self.tree.os_error(e, f"cannot create directory {rel or '.'!r}") from None
        self.tree.add_dir(rel, entry_times(m), made=made)
        self.stats.dirs += 1

    def _hardlink(self, m: tarfile.TarInfo, rel: str, atime: int, mtime: int) -> None:
        target = self.tree.clean(m.linkname, "hardlink target")
        if not target:
            raise self.tree.err("hardlink to the root directory")
        if not self.tree.parents(target, create=False):
            raise self.tree.err(
                f"hardlink target {m.linkname!r} does not exist (in this layer or a lower one)"
            )
        src = self.tree.path(target)
        try:
            tst = os.lstat(src)
        except FileNotFoundError:
            raise self.tree.err(
                f"hardlink target {m.linkname!r} does not exist (in this layer or a lower one)"
            ) from None
        if stat.S_ISDIR(tst.st_mode):
            raise self.tree.err(f"hardlink target {m.linkname!r} is a directory")
        self.tree.parents(rel, create=True, mtime_ns=mtime)
        dst = self.tree.path(rel)
        try:
            cur: os.stat_result | None = os.lstat(dst)
        except FileNotFoundError:
            cur = None
        if cur is None or not os.path.samestat(cur, tst):
            self.tree.make_room(rel, for_dir=False)
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

    def _set_xattrs(self, m: tarfile.TarInfo, target: int | str, kind: str) -> None:
        xattrs = entry_xattrs(m)
        if not xattrs:
            return
        done, skipped = set_xattrs(xattrs, target, kind, self.tree)
        self.stats.xattrs += done
        self.stats.xattrs_skipped += skipped


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, for every thread)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: every mode is set explicitly


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
    tree = RootTree(top, layer, preserve, hold_removed)
    applier = _Applier(tree)
    last: str | None = None  # the last entry read, to place a corruption between two entries
    try:
        with open_tar(stream) as tar:
            while (m := tar.next()) is not None:
                applier.apply(tar.src, m)  # leaves tree.entry None when done, so errors in between
                last = m.name  # are not pinned on it
        tree.restore_times()
        while stream.read(CHUNK):  # padding after the end-of-archive block; then the stream's trailer
            pass
    except LayerError as e:
        if e.entry is None and tree.entry is not None:  # a stream error inside an entry: name it
            raise LayerError(layer, tree.entry, e.why, e.remedy) from None
        raise
    except TarCorruptError as e:
        after = f" after entry {last!r}" if last is not None else ""
        raise LayerError(layer, None, f"tar stream at byte {e.offset}{after}: {e.why}") from None
    except (tarfile.TarError, EOFError) as e:  # tarfile's own "unexpected end of data"
        after = f" (after entry {last!r})" if tree.entry is None and last is not None else ""
        raise LayerError(layer, tree.entry, f"truncated or corrupt tar stream: {e}{after}") from None
    finally:
        tree.release()
    applier.stats.removed = tree.removed
    applier.stats.replaced = tree.replaced
    return applier.stats
