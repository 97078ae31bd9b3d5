"""The writable upper: where writes and trims to a device land, crash-safe, until `commit`.

Two append-only files in one directory (normative spec: docs/format.md, "Writable upper")::

    upper.data   the bytes of every write, appended
    upper.log    32 B header, then one 32 B record per write or trim

    log header: 0 magic "DFLYUPLG" | 8 u16 major | 10 u16 minor | 12 4x | 16 u64 vsize | 24 4x | 28 u32 CRC32
    record:     0 u8 op (1 write, 2 trim) | 1 3x | 4 u32 CRC32 of the record with this field zero
                | 8 u64 device offset | 16 u64 length | 24 u64 data offset (writes; 0 for trims)

Write order, and what a crash leaves: a write's bytes go to upper.data first; its record is appended
to upper.log only after upper.data was fdatasync'ed (`flush`), and the log is fdatasync'ed after.
So every record on disk points at durable data. On open, records are replayed until the first one
that is torn (short), fails its CRC, or points beyond upper.data; the log is cut there and upper.data
is cut to the last referenced byte. A crash therefore loses at most the writes since the last flush,
never returns garbage for them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from typing import BinaryIO

from .chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo
from .errors import CorruptBlobError, InvalidArgumentError, UnsupportedFormatError
from .extents import HOLE, ZERO, ExtentMap
from .layer import LayerWriter, check_range, check_vsize
from .stack import BlockReader

LOG_MAGIC = b"DFLYUPLG"
LOG_MAJOR = 1
LOG_MINOR = 0
LOG_HEADER = struct.Struct("<8sHH4xQ4x")  # + CRC32 = 32 bytes
LOG_HEADER_SIZE = LOG_HEADER.size + 4
RECORD = struct.Struct("<B3xIQQQ")  # 32 bytes
OP_WRITE = 1
OP_TRIM = 2

DATA_FILE = "upper.data"
LOG_FILE = "upper.log"

_UPPER = 0  # the source id of upper data in the map
_PIECE = 4 * 1024 * 1024


def _record(op: int, offset: int, length: int, data_offset: int) -> bytes:
    body = RECORD.pack(op, 0, offset, length, data_offset)
    return RECORD.pack(op, zlib.crc32(body) & 0xFFFFFFFF, offset, length, data_offset)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WritableUpper:
    """A writable layer on top of an optional read-only lower device.

    Use `create` for a new upper and `open` to recover an existing one. Writes and trims must be
    aligned to 512-byte sectors. Writes become durable at `flush` (called automatically every
    `flush_bytes` of data, and by `commit` and `close`).

    Thread-safe: a device server reads on some threads while others write. The map and the ends of
    the files change under one lock; a read takes the lock only to copy the pieces it needs, then
    reads outside it (upper data is append-only, so the bytes a piece points at never change).
    """

    def __init__(self, path: str, lower: BlockReader | None, flush_bytes: int) -> None:
        self.path = path
        self.lower = lower
        self.flush_bytes = flush_bytes
        self.map = ExtentMap()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._data_fd = -1
        self._log_fd = -1
        self.vsize = 0
        self._data_end = 0
        self._log_end = 0
        self.recovered_records = 0
        self.dropped_log_bytes = 0
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str, vsize: int, lower: BlockReader | None = None, flush_bytes: int = 64 << 20
    ) -> WritableUpper:
        """Make a new, empty upper in directory `path` (created if missing; must not hold an upper)."""
        check_vsize(vsize)
        if lower is not None and lower.vsize != vsize:
            raise InvalidArgumentError(f"upper size {vsize} differs from the lower device's {lower.vsize}")
        os.makedirs(path, exist_ok=True)
        log_path = os.path.join(path, LOG_FILE)
        if os.path.exists(log_path):
            raise InvalidArgumentError(f"{path} already holds a writable upper; open it instead")
        header = LOG_HEADER.pack(LOG_MAGIC, LOG_MAJOR, LOG_MINOR, vsize)
        header += struct.pack("<I", zlib.crc32(header) & 0xFFFFFFFF)
        with open(os.path.join(path, DATA_FILE), "wb") as f:
            os.fsync(f.fileno())
        tmp = log_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, log_path)  # the upper exists once its log header is in place
        _fsync_dir(path)
        return cls.open(path, lower, flush_bytes)

    @classmethod
    def open(cls, path: str, lower: BlockReader | None = None, flush_bytes: int = 64 << 20) -> WritableUpper:
        """Open an upper and recover it from its log (see the module docstring)."""
        self = cls(path, lower, flush_bytes)
        self._data_fd = os.open(os.path.join(path, DATA_FILE), os.O_RDWR | os.O_CLOEXEC)
        try:
            self._log_fd = os.open(os.path.join(path, LOG_FILE), os.O_RDWR | os.O_CLOEXEC)
            self._recover()
        except BaseException:
            self.close()
            raise
        if lower is not None and lower.vsize != self.vsize:
            self.close()
            raise InvalidArgumentError(
                f"upper size {self.vsize} differs from the lower device's {lower.vsize}"
            )
        return self

    def _recover(self) -> None:
        log_name = os.path.join(self.path, LOG_FILE)
        log = b""
        size = os.fstat(self._log_fd).st_size
        while len(log) < size:
            chunk = os.pread(self._log_fd, size - len(log), len(log))
            if not chunk:
                break
            log += chunk
        if len(log) < LOG_HEADER_SIZE:
            raise CorruptBlobError(log_name, 0, "upper log header", f"{LOG_HEADER_SIZE} bytes", len(log))
        magic, major, _minor, vsize = LOG_HEADER.unpack_from(log)
        if magic != LOG_MAGIC:
            raise CorruptBlobError(log_name, 0, "upper log header", f"magic {LOG_MAGIC!r}", repr(magic))
        (crc,) = struct.unpack_from("<I", log, LOG_HEADER.size)
        if crc != zlib.crc32(log[: LOG_HEADER.size]) & 0xFFFFFFFF:
            raise CorruptBlobError(log_name, 0, "upper log header CRC32")
        if major != LOG_MAJOR:
            raise UnsupportedFormatError(f"{log_name}: upper log version {major}; upgrade damselfly")
        self.vsize = vsize
        data_size = os.fstat(self._data_fd).st_size
        pos = LOG_HEADER_SIZE
        data_end = 0
        while pos + RECORD.size <= len(log):
            rec = log[pos : pos + RECORD.size]
            op, crc, off, length, doff = RECORD.unpack(rec)
            body = RECORD.pack(op, 0, off, length, doff)
            if crc != zlib.crc32(body) & 0xFFFFFFFF or op not in (OP_WRITE, OP_TRIM):
                break
            if off + length > vsize or (op == OP_WRITE and doff + length > data_size):
                break
            if op == OP_WRITE:
                self.map.paint(off, off + length, _UPPER, doff)
                data_end = max(data_end, doff + length)
            else:
                self.map.paint(off, off + length, ZERO)
            pos += RECORD.size
            self.recovered_records += 1
        if pos != len(log):
            # A torn or unflushed tail: cut it so new records follow the last good one.
            self.dropped_log_bytes = len(log) - pos
            os.ftruncate(self._log_fd, pos)
            os.fsync(self._log_fd)
        if data_size != data_end:
            os.ftruncate(self._data_fd, data_end)
            os.fsync(self._data_fd)
        self._log_end = pos
        self._data_end = data_end

    def close(self, flush: bool = True) -> None:
        """Flush and close the files (the upper stays on disk; `open` it again later).

        ``flush=False`` drops unflushed writes the way a crash would (tests use it to check recovery).
        """
        try:
            if flush and self._data_fd >= 0 and self._log_fd >= 0:
                self.flush()
        finally:
            for fd in (self._data_fd, self._log_fd):
                if fd >= 0:
                    os.close(fd)
            self._data_fd = self._log_fd = -1

    def __enter__(self) -> WritableUpper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O -------------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        check_range(offset, length, self.vsize)
        if not length:
            return
        with self._lock:
            doff = self._data_end
            written = os.pwrite(self._data_fd, data, doff)
            if written != length:
                raise OSError(f"short write to {self.path}/{DATA_FILE}: {written} of {length} bytes")
            self._data_end += length
            self.map.paint(offset, offset + length, _UPPER, doff)
            self._pending.append(_record(OP_WRITE, offset, length, doff))
            self._pending_bytes += length
            if self._pending_bytes >= self.flush_bytes:
                self.flush()

    def trim(self, offset: int, length: int) -> None:
        """Discard [offset, offset+length): it reads as zeros and hides the lower device there."""
        check_range(offset, length, self.vsize)
        if not length:
            return
        with self._lock:
            self.map.paint(offset, offset + length, ZERO)
            self._pending.append(_record(OP_TRIM, offset, length, 0))

    def flush(self) -> None:
        """Make every write and trim so far durable: data first, then the records that point at it."""
        with self._lock:
            if not self._pending:
                return
            os.fdatasync(self._data_fd)
            records = b"".join(self._pending)
            os.pwrite(self._log_fd, records, self._log_end)
            os.fdatasync(self._log_fd)
            self._log_end += len(records)
            self._pending.clear()
            self._pending_bytes = 0

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgumentError(f"negative range {offset}+{length}")
        end = min(offset + length, self.vsize)
        if offset >= end:
            return b""
        with self._lock:
            pieces = list(self.map.pieces(offset, end))
        parts: list[bytes] = []
        for seg in pieces:
            if seg.source == _UPPER:
                parts.append(os.pread(self._data_fd, seg.length, seg.data_offset))
            elif seg.source == HOLE and self.lower is not None:
                parts.append(self.lower.read(seg.start, seg.length))
            else:
                parts.append(bytes(seg.length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- sealing ---------------------------------------------------------------------------------

    def commit(
        self,
        out: BinaryIO,
        codec: str = "lz4",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        level: int | None = None,
    ) -> BlobInfo:
        """Seal what was written into a compressed layer blob (only this upper's diff, not the lower)."""
        with self._lock:
            self.flush()
            segments = list(self.map)
        w = LayerWriter(out, self.vsize, codec, chunk_size, level)
        for seg in segments:
            if seg.source == ZERO:
                w.add_zero(seg.start, seg.length)
                continue
            for pos in range(0, seg.length, _PIECE):
                n = min(_PIECE, seg.length - pos)
                w.add_data(seg.start + pos, os.pread(self._data_fd, n, seg.data_offset + pos))
        return w.close()

    def remove(self) -> None:
        """Close and delete the upper's files (after a commit, or to abandon it)."""
        self.close()
        for name in (DATA_FILE, LOG_FILE):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
