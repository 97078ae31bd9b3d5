"""Writing one tar entry's bytes and extended attributes under the root (for `applytar`).

- `write_data`: a regular file's content, streamed from the tar in `CHUNK` pieces; a stream that ends
  inside the data is a `LayerError`, never a short file.
- `write_sparse`: a GNU/PAX sparse file: its data regions are read in archive order straight from the
  stream and written at their offsets, so what is not written stays a hole (``tarfile``'s own reader
  would write the holes as zeros, and cannot seek a stream). The map is checked first: regions in
  order, inside the file.
- `set_xattrs` / `drop_other_xattrs`: the entry's xattrs, set without following a final symlink. The
  kernel refuses ``user.*`` on symlinks and devices (xattr(7)) and a filesystem may not support a
  namespace at all: neither is the layer's fault, so it is logged and counted, as containerd does
  for ENOTSUP. A directory entry over an existing directory brings its whole xattr set (the others
  are removed): containerd's and docker's overlay appliers make the directory afresh in the new
  layer's upper directory, so that is what images mean.
"""

from __future__ import annotations

import errno
import logging
import os
import tarfile
from typing import cast

from .layerstream import CHUNK
from .roottree import RootTree
from .tarentries import ForwardReader

log = logging.getLogger(__name__)


def write_data(src: ForwardReader, m: tarfile.TarInfo, fd: int, tree: RootTree) -> int:
    """Copy a regular entry's content into `fd`; return the bytes written."""
    if src.tell() != m.offset_data:
        raise tree.err("file data does not follow its header")
    size = left = m.size
    while left > 0:
        # Pieces of CHUNK bytes (a small file: one piece, one write) wherever the stream's chunks
        # end: where ext4 puts blocks follows the writes, so they do not depend on the source.
        data = src.read_view(min(left, CHUNK))
        if not data:
            raise tree.err("truncated: the stream ends inside this file's data")
        n = os.write(fd, data)
        if n < len(data):
            _write_all(fd, memoryview(data)[n:])
        left -= len(data)
    return size


def write_sparse(src: ForwardReader, m: tarfile.TarInfo, fd: int, tree: RootTree) -> int:
    """Write a sparse entry's data regions at their offsets (holes stay holes); return the bytes written."""
    sparse = cast("list[tuple[int, int]]", m.sparse)  # typeshed does not know its type
    # GNU tar pads the map with (0, 0) and ends it with (size, 0) for a file ending in a hole.
    sparse = [(offset, size) for offset, size in sparse if size]
    end = 0
    for offset, size in sparse:
        if offset < end or size < 0 or offset + size > m.size:
            raise tree.err(f"sparse map region ({offset}, {size}) overlaps or leaves the {m.size}-byte file")
        end = offset + size
    if src.tell() != m.offset_data:
        raise tree.err("sparse data does not follow its header")
    written = 0
    for offset, size in sparse:
        pos, left = offset, size
        while left > 0:
            data = src.read(min(left, CHUNK))
            if not data:
                raise tree.err("truncated: the stream ends inside this file's data")
            _pwrite_all(fd, data, pos)
            pos += len(data)
            left -= len(data)
        written += size
    os.ftruncate(fd, m.size)
    return written


def drop_other_xattrs(keep: dict[str, bytes], fd: int, tree: RootTree) -> None:
    """Remove the xattrs of directory `fd` that are not in `keep`."""
    for name in os.listxattr(fd):
        if name not in keep:
            try:
                os.removexattr(fd, name)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                    raise tree.os_error(e, f"cannot remove xattr {name!r}") from None


def set_xattrs(xattrs: dict[str, bytes], target: int | str, kind: str, tree: RootTree) -> tuple[int, int]:
    """Set `xattrs` on a descriptor or (never followed) a path; return (set, skipped)."""
    done = skipped = 0
    for name, value in sorted(xattrs.items()):
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            special = e.errno == errno.EPERM and name.startswith("user.") and kind in ("symlink", "device")
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or special:
                log.warning(
                    "layer %s, entry %r: xattr %s not set: %s", tree.layer, tree.entry, name, e.strerror
                )
                skipped += 1
                continue
            raise tree.os_error(e, f"cannot set xattr {name!r}") from None
        done += 1
    return done, skipped


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
