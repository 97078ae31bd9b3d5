"""The converter's filesystem image: one sparse local file per layer, and the block diff between two.

A layer is built on a plain file (`ext4layer`): the image after the layers below, copied, then the
layer's tar applied to it through a loop device. What the layer changed is then found by comparing the
file with the copy it started from, block by block (`write_diff`): exactly the blocks whose bytes differ
go into the layer blob. The kernel's I/O never leaves the page cache, and nothing in user space sits on
the write path (the earlier converter wrote through its FUSE device, whose per-request cost dominated).

- `sparse_copy`: the file's data extents (``SEEK_DATA``/``SEEK_HOLE``) copied in the kernel
  (``copy_file_range``); holes stay holes.
- `write_diff`: the union of both files' data extents, read side by side in pieces, compared per
  `BLOCK` (4 KiB, the filesystem's block); runs of differing blocks become data extents of the layer
  blob, in device order. Without a base (the bottom layer) a block differs when it is not all zeros —
  a block no layer holds reads as zeros. A block that became zeros over non-zero lower data is data
  like any other (zeros compress to almost nothing).
- `expand`: a stack of converted layers written out as one sparse image (the starting point when the
  layers below came from the layer cache).
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

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
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fout, os.fstat(fin).st_size)
            for start, end in data_extents(fin):
                pos = start
                while pos < end:
                    n = os.copy_file_range(fin, fout, end - pos, pos, pos)
                    if n <= 0:
                        raise OSError(errno.EIO, f"copy_file_range stopped at {pos} of {src}")
                    pos += n
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of two sorted extent lists, block-aligned outward, merged."""
    out: list[tuple[int, int]] = []
    for s0, e0 in sorted([*a, *b]):
        start, end = s0 - s0 % BLOCK, e0 + -e0 % BLOCK
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


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


class _Sparse:
    """Reads of a sparse file that never touch its holes: reading a hole would fill the page cache
    with zero pages (the whole image's worth, for a base that is mostly holes where the new layer
    wrote), which costs more than the comparison itself."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.extents = data_extents(fd)
        self._starts = [e[0] for e in self.extents]

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes at offset, or None when the whole range is a hole."""
        end = offset + length
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        parts: list[tuple[int, int]] = []
        while i < len(self.extents) and self.extents[i][0] < end:
            s, e = max(self.extents[i][0], offset), min(self.extents[i][1], end)
            if s < e:
                parts.append((s, e))
            i += 1
        if not parts:
            return None
        if parts == [(offset, end)]:
            return _pread_full(self.fd, length, offset)
        buf = bytearray(length)
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
    data = 0
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    bfd = os.open(base, os.O_RDONLY | os.O_CLOEXEC) if base is not None else -1
    try:
        cur_file = _Sparse(fd)
        old_file = _Sparse(bfd) if bfd >= 0 else None
        for start, end in _union(cur_file.extents, old_file.extents if old_file is not None else []):
            for pos in range(start, end, PIECE):
                n = min(PIECE, end - pos)
                cur = cur_file.read(pos, n)
                old = old_file.read(pos, n) if old_file is not None else None
                if cur is None:
                    if old is None:
                        continue
                    cur = bytes(n)
                if cur == (old if old is not None else _ZERO_PIECE[:n]):
                    continue
                view = memoryview(cur)
                for a, b in _changed_runs(cur, old):
                    w.add_data(pos + a, view[a:b])
                    data += b - a
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
