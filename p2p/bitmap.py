"""The presence bitmap of a cached blob: which fetch units are present (verified and durable).

One file per blob, ``<cache>/blobs/sha256/<hex>/bitmap`` (normative spec: docs/format.md §6)::

    offset  size  type   meaning
    0       8     bytes  magic "DFLYBMAP"
    8       2     u16    major version (1)
    10      2     u16    minor version (0)
    12      4     u32    fetch unit size in bytes
    16      8     u64    blob size in bytes
    24      4     -      reserved, zero
    28      4     u32    CRC32 of bytes 0..27
    32      ceil(U/8)    one bit per fetch unit (U = ceil(blob size / unit size)):
                         unit u is bit (u & 7) of byte 32 + (u >> 3); 1 = present

Little-endian. A file is used only if its 32 header bytes are exactly the ones this cache would write
(magic, version, unit size, blob size, CRC) and it is exactly as long as the bits need; anything else —
another unit size, another size for the same digest, damage, a torn or foreign file — is replaced by an
all-zero bitmap, written whole to a temporary file, fsynced and renamed (`blockformat.durable`), so the
blob starts afresh and a bitmap is never torn. Bits change in place: the bytes holding them are written
(`set`, `clear`, `clear_all`) and made durable with `sync`. The cache sets a bit only after the unit's
bytes passed their checks and were fdatasync'ed to the ``data`` file, so a set bit always means durable,
verified bytes; a crash loses at most bits not yet synced, and those units are fetched again.

The bitmap holds no lock: its owner (`p2p.cachedblob.CachedBlob`) serialises changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib

from blockformat.durable import PRIVATE_FILE_MODE, atomic_write

log = logging.getLogger(__name__)

BITMAP_MAGIC = b"DFLYBMAP"
BITMAP_MAJOR = 1
BITMAP_MINOR = 0
# magic, major, minor, unit size, blob size, reserved(4); then the CRC32 of those 28 bytes
BITMAP_HEADER = struct.Struct("<8sHHIQ4x")
BITMAP_CRC = struct.Struct("<I")
BITMAP_HEADER_SIZE = BITMAP_HEADER.size + BITMAP_CRC.size  # 32


def bitmap_header(unit_size: int, blob_size: int) -> bytes:
    """The 32 header bytes of a bitmap for a blob of `blob_size` bytes in units of `unit_size`."""
    h = BITMAP_HEADER.pack(BITMAP_MAGIC, BITMAP_MAJOR, BITMAP_MINOR, unit_size, blob_size)
    return h + BITMAP_CRC.pack(zlib.crc32(h) & 0xFFFFFFFF)


def open_private(path: str, create: bool = True) -> int:
    """Open a cache file read-write, mode 0600 (also one an older version made 0644)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


class PresenceBitmap:
    """The bitmap file of one blob, loaded (or started afresh) and kept open for updates."""

    def __init__(self, path: str, unit_size: int, blob_size: int) -> None:
        self.path = path
        self.units = (blob_size + unit_size - 1) // unit_size
        nbytes = (self.units + 7) // 8
        header = bitmap_header(unit_size, blob_size)
        try:
            with open(path, "rb") as f:
                raw = f.read(BITMAP_HEADER_SIZE + nbytes + 1)  # a longer file is not ours either
        except FileNotFoundError:
            raw = b""
        if raw[:BITMAP_HEADER_SIZE] == header and len(raw) == BITMAP_HEADER_SIZE + nbytes:
            self._bits = bytearray(raw[BITMAP_HEADER_SIZE:])
        else:
            if raw:
                log.warning(
                    "%s: bitmap does not match (size, unit or damage); starting the blob afresh", path
                )
            # A new (or unusable) bitmap: written whole to a temp file and renamed, so it is never torn.
            with atomic_write(path, PRIVATE_FILE_MODE) as f:
                f.write(header + bytes(nbytes))
            self._bits = bytearray(nbytes)
        self._fd = open_private(path, create=False)

    def is_present(self, unit: int) -> bool:
        return bool(self._bits[unit >> 3] & (1 << (unit & 7)))

    def count(self) -> int:
        """How many units are present."""
        return sum(bin(b).count("1") for b in self._bits)

    def missing(self) -> list[int]:
        return [u for u in range(self.units) if not self.is_present(u)]

    def set(self, first: int, last: int) -> None:
        """Mark units first..last (inclusive) present and write their bytes (durable after `sync`)."""
        for u in range(first, last + 1):
            self._bits[u >> 3] |= 1 << (u & 7)
        self._write(first, last)

    def clear(self, first: int, last: int) -> None:
        """Mark units first..last (inclusive, clipped to the blob) missing and write their bytes."""
        last = min(last, self.units - 1)
        for u in range(first, last + 1):
            self._bits[u >> 3] &= ~(1 << (u & 7)) & 0xFF
        self._write(first, last)

    def clear_all(self) -> None:
        self._bits = bytearray(len(self._bits))
        os.pwrite(self._fd, bytes(self._bits), BITMAP_HEADER_SIZE)

    def _write(self, first: int, last: int) -> None:
        if first > last:
            return
        lo, hi = first >> 3, (last >> 3) + 1
        os.pwrite(self._fd, bytes(self._bits[lo:hi]), BITMAP_HEADER_SIZE + lo)

    def sync(self) -> None:
        """Make the bits written so far durable."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
