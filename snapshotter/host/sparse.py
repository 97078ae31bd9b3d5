"""Where a sparse file holds data: its extents by ``SEEK_DATA``/``SEEK_HOLE``."""

from __future__ import annotations

import errno
import os


def data_extents(fd: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, end) of every data extent of the file `fd`, in order, holes left out; with `align`,
    each widened outward to multiples of it (within the file) and touching ones merged."""
    size = os.fstat(fd).st_size
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        pos = end
        start, end = start - start % align, min(size, end + -end % align)
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out
