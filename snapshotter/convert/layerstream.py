"""A layer blob's tar bytes: gzip or zstd found by magic and decompressed as they are read.

`open_layer_stream` checks the descriptor's media type (one of `LAYER_MEDIA_TYPES`), reads the blob's
first bytes to find its codec (gzip ``1f8b``, zstd ``28b52ffd`` or a skippable frame, else a plain tar;
bzip2, xz and lz4 are refused: not part of the OCI image-spec) and returns a `LayerStream`: a raw,
readable stream of the tar bytes with a bounded buffer (one chunk of output, one of input).

Concatenated gzip members and zstd frames are one stream, as their formats say; zero padding after the
last gzip member is accepted, as gzip(1) does. A stream that ends inside a member, a CRC mismatch or
bytes that do not decode raise `LayerError` (entry ``None``): silence on truncation would let a cut
layer pass as a complete one. gzip goes through ISA-L when the ``isal`` package is installed (2-3x
faster than zlib, with zlib's API), else zlib.
"""

from __future__ import annotations

import importlib
import io
import logging
import queue
import threading
import zlib
from types import ModuleType
from typing import TYPE_CHECKING, Protocol, cast

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

log = logging.getLogger(__name__)

#: Read and write unit: big enough that syscalls and Python calls do not dominate, small enough that a
#: layer never sits in memory.
CHUNK = 1 << 20
#: zstd's decompressobj has no output limit; one block of input inflates to at most 128 KiB, so feeding
#: it this many bytes at a time bounds one step's output (a hostile stream of minimal RLE blocks: 8 KiB
#: -> 256 MiB worst case; real layers: a few hundred KiB).
_ZSTD_IN = 8 << 10

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


def check_diff_id(layer: str, got: str, diff_id: str, remedy: str) -> None:
    """A layer's tar must hash to the config's ``diff_id`` for it (`got`: ``sha256:<hex>``)."""
    if got != diff_id:
        raise LayerError(
            layer, None, f"its uncompressed digest is {got}, the config's diff_id says {diff_id}", remedy
        )


class ReadAhead:
    """Reads `source` in a thread of its own, up to `depth` chunks ahead of the reader.

    What the source costs per byte — reading the blob, checking its digest, inflating it, hashing the
    tar — then runs on another CPU than whoever consumes the stream (the converter's applier, pinned to
    one). A source error reaches the reader at the position it happened, after every byte before it.
    `close` stops the thread (and is safe to call at any time); use it as a context manager.
    """

    _EOF = object()

    def __init__(self, source: Readable, depth: int = 8, chunk: int = CHUNK) -> None:
        self._source = source
        self._chunk = chunk
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._item = b""  # the chunk being read from, and the position in it
        self._pos = 0
        self._done = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="damselfly-read-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(self._chunk)
                if not data:
                    self._put(self._EOF)
                    return
                if not self._put(bytes(data)):
                    return
        except BaseException as e:  # handed to the reader, raised where the stream failed
            self._put(e)

    def read(self, n: int = -1, /) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        out: list[bytes] = []
        want = n if n >= 0 else None
        while want is None or want > 0:
            if self._pos == len(self._item):
                if self._done:
                    break
                item = self._queue.get()
                if item is self._EOF:
                    self._done = True
                    break
                if isinstance(item, BaseException):
                    self._done = True
                    if out:  # what came before the error first; the error on the next read
                        self._error = item
                        break
                    raise item
                self._item, self._pos = cast(bytes, item), 0
            chunk, pos = self._item, self._pos
            take = len(chunk) - pos if want is None else min(want, len(chunk) - pos)
            # A reader asking for a chunk or more (the tar reader does) gets the queued bytes
            # themselves, not a copy of them.
            out.append(chunk if take == len(chunk) else chunk[pos : pos + take])
            self._pos = pos + take
            if want is not None:
                want -= take
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
