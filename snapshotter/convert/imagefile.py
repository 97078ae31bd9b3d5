"""The converter's filesystem image: one sparse local file, and the block diff a layer made in it.

A layer is built on a plain file (`ext4layer`): the image after the layers below, then the layer's tar
applied to it through a loop device. What the layer changed is found by comparing the image after it
with the image before it, block by block: exactly the blocks whose bytes differ go into the layer blob.
The kernel's I/O never leaves the page cache, and nothing in user space sits on the write path (the
earlier converter wrote through its FUSE device, whose per-request cost dominated).

Two ways to have "the image before" at hand, with the same blobs:

- in place (the converter's way): every layer is applied to the same file. Before it, a `Snapshot`
  copies aside whatever a layer may rewrite — all data but the regular files' (`ext4meta.FileExtents`),
  which the applier never writes into — and `write_diff_in_place` compares two snapshots, skipping the
  lower files' blocks (the same bytes on both sides);
- whole copies: `sparse_copy` (the file's data extents, ``SEEK_DATA``/``SEEK_HOLE``, copied in the
  kernel by ``copy_file_range``; holes stay holes), then `write_diff` between the two files.

`write_diff` reads the union of both files' data extents side by side in pieces, compared per `BLOCK`
(4 KiB, the filesystem's block); runs of differing blocks become data extents of the layer blob, in
device order. Without a base (the bottom layer) a block differs when it is not all zeros — a block no
layer holds reads as zeros. A block that became zeros over non-zero lower data is data like any other
(zeros compress to almost nothing). `expand`: a stack of converted layers written out as one sparse
image (the starting point when the layers below came from the layer cache).
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from blockformat.chunkfile import BlobInfo
from blockformat.extents import ZERO
from blockformat.layer import LayerWriter
from blockformat.stack import Stack

from ..host.sparse import data_extents

#: The unit of the diff: ext4's block (mkfs ``-b 4096``).
BLOCK = 4096
#: Bytes read from each file at a time.
PIECE = 1 << 20
#: Sub-pieces compared whole first: most of a changed piece is often unchanged.
_SUB = 64 * 1024
_ZERO_PIECE = bytes(PIECE)
_ZERO_BLOCK = bytes(BLOCK)


def sparse_copy(src: str, dst: str) -> None:
    """Copy `src` to a new file `dst` of the same size, holes kept, data copied inside the kernel."""
    fin = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy_ranges(fin, src, data_extents(fin), dst)
    finally:
        os.close(fin)


def _copy_ranges(fin: int, src: str, ranges: Iterable[tuple[int, int]], dst: str) -> None:
    """A new file `dst` the size of `fin` (the file `src`), holding its bytes in `ranges` (copied in
    the kernel, ``copy_file_range``) and holes elsewhere."""
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fout, os.fstat(fin).st_size)
        for start, end in ranges:
            pos = start
            while pos < end:
                n = os.copy_file_range(fin, fout, end - pos, pos, pos)
                if n <= 0:
                    raise OSError(errno.EIO, f"copy_file_range stopped at {pos} of {src}")
                pos += n
    finally:
        os.close(fout)


def merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` sorted, overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def _union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two extent lists, block-aligned outward, merged."""
    return merged((s - s % BLOCK, e + -e % BLOCK) for s, e in (*a, *b))


def _write_changes(
    w: LayerWriter, todo: Sequence[tuple[int, int]], new_image: _Reader, old_image: _Reader | None
) -> int:
    """Add to `w` the runs of blocks within `todo` where `new_image` differs from `old_image` (zeros
    when None); return the bytes added."""
    data = 0
    for start, end in todo:
        for pos in range(start, end, PIECE):
            n = min(PIECE, end - pos)
            new = new_image.read(pos, n)
            old = old_image.read(pos, n) if old_image is not None else None
            if new is None:
                if old is None:
                    continue
                new = bytes(n)
            if new == (old if old is not None else _ZERO_PIECE[:n]):
                continue
            view = memoryview(new)
            for a, b in _changed_runs(new, old):
                w.add_data(pos + a, view[a:b])
                data += b - a
    return data


def _changed_runs(cur: bytes, old: bytes | None) -> Iterator[tuple[int, int]]:
    """(start, end) of the runs of `BLOCK`s where `cur` differs from `old` (zeros when None)."""
    n = len(cur)
    run_start = -1
    for sub in range(0, n, _SUB):
        sub_end = min(sub + _SUB, n)
        if cur[sub:sub_end] == (_ZERO_PIECE[: sub_end - sub] if old is None else old[sub:sub_end]):
            if run_start >= 0:
                yield run_start, sub
                run_start = -1
            continue
        for b in range(sub, sub_end, BLOCK):
            e = min(b + BLOCK, sub_end)
            if cur[b:e] != (_ZERO_BLOCK[: e - b] if old is None else old[b:e]):
                if run_start < 0:
                    run_start = b
            elif run_start >= 0:
                yield run_start, b
                run_start = -1
    if run_start >= 0:
        yield run_start, n


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) < length:  # beyond the end (cannot happen for same-size images) reads as zeros
        data += bytes(length - len(data))
    return data


class _Reader(Protocol):
    def read(self, offset: int, length: int) -> bytes | None: ...


class _Sparse:
    """Reads of a sparse file that never touch its holes: reading a hole would fill the page cache
    with zero pages (the whole image's worth, for a base that is mostly holes where the new layer
    wrote), which costs more than the comparison itself."""

    def __init__(self, fd: int, extents: Sequence[tuple[int, int]] | None = None) -> None:
        self.fd = fd
        self.extents = list(extents) if extents is not None else data_extents(fd)
        self._starts = [e[0] for e in self.extents]

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes at offset, or None when the whole range is a hole."""
        return self.read_over(offset, length, None)

    def read_over(self, offset: int, length: int, under: bytes | None) -> bytes | None:
        """The bytes at offset where the file has `extents`, `under`'s elsewhere (None: zeros)."""
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        parts: list[tuple[int, int]] = []
        while i < len(self.extents) and self.extents[i][0] < end:
            s, e = max(self.extents[i][0], offset), min(self.extents[i][1], end)
            if s < e:
                parts.append((s, e))
            i += 1
        if not parts:
            return under
        if parts == [(offset, end)]:
            return _pread_full(self.fd, length, offset)
        buf = bytearray(under if under is not None else length)
        for s, e in parts:
            buf[s - offset : e - offset] = _pread_full(self.fd, e - s, s)
        return bytes(buf)


def write_diff(
    base: str | None,
    image: str,
    out: BinaryIO,
    vsize: int,
    codec: str,
    chunk_size: int,
    level: int | None = None,
) -> tuple[BlobInfo, int]:
    """Write the layer blob of what `image` changed over `base` (None: over an empty device) to `out`.

    Returns the blob's info and the bytes of data it holds."""
    w = LayerWriter(out, vsize, codec, chunk_size, level, workers=min(4, os.cpu_count() or 1))
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    bfd = os.open(base, os.O_RDONLY | os.O_CLOEXEC) if base is not None else -1
    try:
        cur_file = _Sparse(fd)
        old_file = _Sparse(bfd) if bfd >= 0 else None
        todo = _union(cur_file.extents, old_file.extents if old_file is not None else [])
        data = _write_changes(w, todo, cur_file, old_file)
    finally:
        os.close(fd)
        if bfd >= 0:
            os.close(bfd)
    return w.close(), data


def expand(stack: Stack, image: str) -> None:
    """Write the merged contents of `stack` into a new sparse file `image` of the stack's size."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, stack.vsize)
        for seg in stack.map:
            if seg.source == ZERO:
                continue  # a hole reads as zeros
            layer = stack.layers[seg.source]
            for pos in range(0, seg.length, PIECE):
                n = min(PIECE, seg.length - pos)
                os.pwrite(fd, layer.read_data(seg.data_offset + pos, n), seg.start + pos)
    finally:
        os.close(fd)


# -- in place: one image for every layer, and snapshots of what a layer may rewrite -------------------

Ranges = list[tuple[int, int]]


def subtract(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> Ranges:
    """The parts of sorted, disjoint ranges `a` outside sorted, disjoint ranges `b`."""
    out: Ranges = []
    j = 0
    for start, end in a:
        pos = start
        while j < len(b) and b[j][1] <= pos:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out


def intersect(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> Ranges:
    """The parts of sorted, disjoint ranges `a` inside sorted, disjoint ranges `b`."""
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return out


@dataclass
class Snapshot:
    """What a layer's image holds, kept so that the next layer can be applied to the same file.

    `data`: the image's data extents. `files`: the data extents of its regular files, which no later
    layer writes into (`ext4meta.FileExtents`): they stay in the image file. Everything else that holds
    data — superblock, group descriptors, bitmaps, inode tables, directories, extent and xattr blocks,
    freed blocks that still hold bytes — the next layer may rewrite in place, so it is copied into the
    sparse file `path` at the same offsets (`data` minus `files`; a few MB where the image has GBs of
    file data)."""

    path: str
    data: Ranges
    files: Ranges

    @classmethod
    def take(cls, image: str, path: str, files: Ranges) -> Snapshot:
        fin = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = data_extents(fin, BLOCK)
            _copy_ranges(fin, image, subtract(data, files), path)
        finally:
            os.close(fin)
        return cls(path, data, intersect(files, data))


class _View:
    """A layer's image as it was when its `Snapshot` was taken: the copied ranges from the snapshot
    file, the regular files' ranges from the image file (unchanged since), zeros elsewhere."""

    def __init__(self, snap: Snapshot, image_fd: int) -> None:
        self.snap_fd = os.open(snap.path, os.O_RDONLY | os.O_CLOEXEC)
        self.copied = _Sparse(self.snap_fd)
        self.files = _Sparse(image_fd, snap.files)

    def close(self) -> None:
        os.close(self.snap_fd)

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes at offset, or None when the range holds no data."""
        return self.files.read_over(offset, length, self.copied.read(offset, length))


def write_diff_in_place(
    base: Snapshot | None,
    cur: Snapshot,
    image: str,
    out: BinaryIO,
    vsize: int,
    codec: str,
    chunk_size: int,
    level: int | None = None,
) -> tuple[BlobInfo, int]:
    """`write_diff` for a layer applied in place: the image before it is `base` (None: an empty
    device), after it `cur`, both snapshots of the one `image` file. The same blob `write_diff` writes
    for the two images, with less read: the files of `base` are the same bytes in both (no layer writes
    into an existing file), so only the rest is compared.

    It reads what `cur` says the layer wrote while the next layer is applied to `image`: the copied
    ranges come from the snapshot, and the files the layer made keep their blocks until a later layer
    removes them and one after it reuses them (the builder waits for this seal before that)."""
    w = LayerWriter(out, vsize, codec, chunk_size, level, workers=min(4, os.cpu_count() or 1))
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    views: list[_View] = []
    try:
        now = _View(cur, fd)
        views.append(now)
        before = _View(base, fd) if base is not None else None
        if before is not None:
            views.append(before)
        todo = _union(cur.data, base.data if base is not None else [])
        if base is not None:
            todo = subtract(todo, base.files)
        data = _write_changes(w, todo, now, before)
    finally:
        for v in views:
            v.close()
        os.close(fd)
    return w.close(), data
