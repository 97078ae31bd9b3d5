"""What a block device is to the FUSE filesystem, and the sector rules of writing one.

`BlockDevice` is the interface `fuse.BlockFS` serves (`manager.ImageDevice` implements it: a stack of
layers, perhaps under a writable upper). The writable upper takes writes and trims in whole 512-byte
sectors; `write_bytes` and `discard` turn what the kernel sends (page-cache writeback is whole pages,
but a write(2) to the device file need not be) into that.
"""

from __future__ import annotations

from typing import Protocol

from blockformat.chunkfile import Part

SECTOR = 512


class BlockDevice(Protocol):
    """What the filesystem needs of a device."""

    @property
    def size(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    def is_local(self, offset: int, length: int) -> bool:
        """True when reading [offset, offset+length) cannot wait on the network (its bytes are here)."""
        ...

    def read(self, offset: int, length: int) -> bytes: ...

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """`read` as read-only pieces (no copy); the reply is written from them as they are."""
        ...

    def chunk_window(self, offset: int, end: int) -> tuple[int, int]:
        """A range around [offset, end) whose bytes come with reading [offset, end) at no extra cost."""
        ...

    def write(self, offset: int, data: bytes) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


def write_bytes(device: BlockDevice, offset: int, data: bytes) -> None:
    """Write `data` at any offset: unaligned edges are read, merged and written back in whole sectors
    (rare: page-cache writeback sends whole pages). The caller checks bounds and writability."""
    head = offset % SECTOR
    tail = -(offset + len(data)) % SECTOR
    if head or tail:
        start = offset - head
        old = device.read(start, head + len(data) + tail)
        data = old[:head] + data + old[head + len(data) :]
        offset = start
    device.write(offset, data)


def discard(device: BlockDevice, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: the sector-aligned middle is trimmed (the loop
    device's discards arrive so: fstrim reaches the writable upper), the unaligned edges written."""
    end = min(offset + length, device.size)
    a, b = -(-offset // SECTOR) * SECTOR, end // SECTOR * SECTOR
    if a < b:
        device.trim(a, b - a)
    for lo, hi in ((offset, min(a, end)), (max(b, offset), end)):
        if lo < hi:
            write_bytes(device, lo, bytes(hi - lo))
