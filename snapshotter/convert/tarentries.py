"""Reading a layer tar as a stream: its entries, each with its data to be read next.

`open_tar` gives a `TarReader`: the entries of a tar read forwards from a stream (`ForwardReader`:
nothing is buffered beyond one chunk), each with its data to be read next (``TarInfo.offset_data``).
It refuses what ``tarfile`` would take for a normal end of the archive: a missing, short or invalid
header after the first entry is `TarCorruptError` (truncation exactly between two entries included:
the end-of-archive block must be there). PAX and GNU extended headers are bounded
(`MAX_EXTENDED_HEADER`) before ``tarfile`` reads them whole into memory.

Speed: ``tarfile`` costs tens of microseconds of Python per entry — its stream mode re-joins its buffer
on every read (a quadratic cost per record), it parses each header field by field, and ``next()``
keeps a member list and goes through ``_proc_member`` and its offset bookkeeping. A layer of 30,000
small files spends more time there than in the kernel. So `TarReader` reads the common entry itself:
a plain ustar/GNU header (octal numbers, good checksum, no sparse map, no extension, no global PAX
header in force), parsed by `_fast_header` with exactly ``TarInfo.frombuf``'s result, and placed
exactly where ``TarFile.next()`` would place it (``offset``, ``offset_data``, where the next header
starts). Every other header — PAX ``x``/``g``, GNU long names ``L``/``K``, old GNU sparse ``S``,
base-256 numbers, anything damaged — goes through ``tarfile``'s own processing (`CheckedTarInfo`),
from the same block and stream position, so its semantics (charsets, PAX overrides, GNU sparse 0.x
and 1.0) and its errors are tarfile's.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from types import TracebackType
from typing import IO, Self, TypeVar, cast

from .layerstream import CHUNK, Readable

# tarfile's header errors, missing from typeshed's stubs.
_EOFHeaderError: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]

#: PAX and GNU long-name headers are read whole into memory by tarfile; real ones are a few KiB.
MAX_EXTENDED_HEADER = 1 << 20
#: How names are decoded: every byte of a name survives the round trip.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"

REGULAR_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE})


class TarCorruptError(Exception):
    """A header that is not a tar header, or the stream ending without the end-of-archive block."""

    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


class CheckedTarInfo(tarfile.TarInfo):
    """A TarInfo whose reading refuses what tarfile, in stream mode, takes for a normal end.

    ``TarFile.next()`` ends the archive quietly on a missing, short or invalid header after the first
    entry. Only a zero block (`EOFHeaderError`) ends a layer here; everything else raises `TarCorruptError`,
    which ``next()`` lets through untouched. Extended headers are bounded before tarfile reads them
    into memory.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        return cls._checked(tf, dircheck=True)

    @classmethod
    def _fromtarfile(cls, tf: tarfile.TarFile, *, dircheck: bool = True) -> Self:
        # Python releases with the 2025 tarfile fixes (3.9.23+, 3.11.13+, Debian's 3.11.2-6+deb12u9)
        # read the header that follows a PAX/GNU extension through this, not `fromtarfile`: without
        # this override that header would skip every check here, the extended-header bound included.
        return cls._checked(tf, dircheck=dircheck)

    @classmethod
    def _checked(cls, tf: tarfile.TarFile, dircheck: bool) -> Self:
        fileobj = tf.fileobj
        assert fileobj is not None  # an open TarFile always has one
        offset = fileobj.tell()
        buf = fileobj.read(tarfile.BLOCKSIZE)
        fast = _fast_header(cls, buf, tf.encoding or "utf-8", tf.errors) if dircheck else None
        return cls._member(tf, buf, offset, fast, dircheck)

    @classmethod
    def _member(cls, tf: tarfile.TarFile, buf: bytes, offset: int, fast: Self | None, dircheck: bool) -> Self:
        """The member whose header block `buf` was read at `offset` (`fast`: `_fast_header`'s parse of
        it, if any), through tarfile's processing: extensions read, then what follows them."""
        fileobj = tf.fileobj
        assert fileobj is not None
        obj = fast if fast is not None else cls._slow_header(tf, buf, offset, dircheck)
        if obj.type in _EXTENDED_TYPES and obj.size > MAX_EXTENDED_HEADER:
            raise TarCorruptError(
                offset, f"an extended header of {obj.size} bytes (at most {MAX_EXTENDED_HEADER})"
            )
        obj.offset = offset
        try:
            member: Self = obj._proc_member(tf)  # type: ignore[attr-defined]  # tarfile's extension hook
        except (tarfile.HeaderError, ValueError) as e:  # a bad PAX/GNU extension or what follows it
            if fileobj.tell() < offset + tarfile.BLOCKSIZE + _blocks(obj.size):
                raise TarCorruptError(
                    offset, "truncated: the stream ends inside an extended header"
                ) from None
            raise TarCorruptError(offset, f"invalid extended header ({e})") from None
        return member

    @classmethod
    def _slow_header(cls, tf: tarfile.TarFile, buf: bytes, offset: int, dircheck: bool) -> Self:
        """tarfile's own header parser, its errors made ours."""
        try:
            fixed = getattr(cls, "_frombuf", None)  # the fixed releases: `dircheck` off after an extension
            if fixed is not None:
                obj = cast(Self, fixed(buf, tf.encoding, tf.errors, dircheck=dircheck))
            else:
                obj = cls.frombuf(buf, tf.encoding, tf.errors)
        except _EOFHeaderError:
            raise  # the end-of-archive block: the one normal end
        except _EmptyHeaderError:
            raise TarCorruptError(
                offset, "truncated: the stream ends without the end-of-archive block"
            ) from None
        except _TruncatedHeaderError:
            raise TarCorruptError(offset, "truncated: the stream ends inside a tar header") from None
        except tarfile.HeaderError as e:
            raise TarCorruptError(offset, f"not a valid tar header ({e})") from None
        return obj


_ZERO_HEADER = bytes(tarfile.BLOCKSIZE)
_T = TypeVar("_T", bound=tarfile.TarInfo)
#: Types whose header `_fast_header` parses (old GNU sparse headers carry a map: tarfile's job).
_FAST_TYPES = frozenset(
    {
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.LNKTYPE,
        tarfile.SYMTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.DIRTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_GNU_TYPES = frozenset(tarfile.GNU_TYPES)


#: The text fields of a header block: name, linkname, uname, gname, prefix (magic and version are not
#: read: tarfile does not check them either).
_TEXTS = struct.Struct("100s57x100s8x32s32s16x155s12x")
#: The number fields of a header block from offset 100, as tarfile, Go's archive/tar and GNU tar write
#: them: mode, uid, gid (7 octal digits and a NUL each), size, mtime (11 and a NUL), chksum (6, a NUL
#: and a space), then past the type flag, linkname, magic, version, uname and gname (173 bytes)
#: devmajor and devminor (7 digits and a NUL each, or all NULs). Other forms go through `_octal`.
_COMMON_NUMBERS = re.compile(
    rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 .{173}"
    rb"(?:\0{16}|([0-7]{7})\0([0-7]{7})\0)",
    re.DOTALL,
)
_adler32 = zlib.adler32


def _octal(field: bytes) -> int:
    """A plain octal number field (NUL- or space-terminated); ValueError for anything else (base-256
    numbers, non-ASCII), which `_fast_header` leaves to tarfile."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256")
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    if not digits.isdigit():  # int() would also take "+", "_" and other forms: tarfile decides those
        raise ValueError("not plain octal")
    return int(digits, 8)


def _header_sum(buf: bytes) -> int:
    """The unsigned sum of a header's bytes with its checksum field taken as eight spaces (POSIX ustar).

    ``sum(buf)`` walks 512 Python ints; Adler-32's first half is 1 + the sum of the bytes modulo
    65521 (RFC 1950), which is the exact sum for fewer than 257 bytes — so three C calls over pieces
    of at most 178 bytes give it (the three leading 1s and the spaces' 256 make the 253)."""
    low, mid, high = _adler32(buf[:148]), _adler32(buf[156:334]), _adler32(buf[334:])
    return (low & 0xFFFF) + (mid & 0xFFFF) + (high & 0xFFFF) + 253


def _fast_header(cls: type[_T], buf: bytes, encoding: str, errors: str) -> _T | None:
    """``cls.frombuf(buf)`` for the common header — or None, and tarfile parses it (and raises)."""
    if len(buf) != tarfile.BLOCKSIZE or buf == _ZERO_HEADER:
        return None
    kind = buf[156:157]
    if kind not in _FAST_TYPES:
        return None
    try:
        if (common := _COMMON_NUMBERS.match(buf, 100)) is not None:  # (devices: None when all NULs)
            numbers = [int(digits or b"0", 8) for digits in common.groups()]
        else:
            fields = (buf[100:108], buf[108:116], buf[116:124], buf[124:136], buf[136:148], buf[148:156])
            numbers = [_octal(f) for f in (*fields, buf[329:337], buf[337:345])]
    except ValueError:
        return None
    mode, uid, gid, size, mtime, chksum, major, minor = numbers
    if chksum != _header_sum(buf):  # the unsigned sum; tarfile also tries the signed one
        return None
    name, linkname, uname, gname, prefix = _TEXTS.unpack(buf)
    obj = cls()
    obj.name = name.split(b"\0", 1)[0].decode(encoding, errors)
    obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = mode, uid, gid, size, mtime
    obj.chksum = chksum
    obj.type = kind
    obj.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors)
    obj.uname = uname.split(b"\0", 1)[0].decode(encoding, errors)
    obj.gname = gname.split(b"\0", 1)[0].decode(encoding, errors)
    obj.devmajor, obj.devminor = major, minor
    if kind == tarfile.AREGTYPE and obj.name.endswith("/"):  # old V7 tar: a directory
        obj.type = tarfile.DIRTYPE
    if obj.type == tarfile.DIRTYPE:
        obj.name = obj.name.rstrip("/")
    if prefix[0] and obj.type not in _GNU_TYPES:
        obj.name = prefix.split(b"\0", 1)[0].decode(encoding, errors) + "/" + obj.name
    return obj


def _pax_header_size(buf: bytes) -> int | None:
    """The size of the PAX records that the extended header `buf` announces, if tarfile would read
    the header as it stands (its other fields do not matter to tarfile); else None."""
    if len(buf) != tarfile.BLOCKSIZE or (common := _COMMON_NUMBERS.match(buf, 100)) is None:
        return None
    return int(common[4], 8) if int(common[6], 8) == _header_sum(buf) else None


class ForwardReader:
    """A stream as ``tarfile``'s file mode wants it — ``read``, ``tell``, ``seek`` — seeking only
    forwards (by reading), reads served from one buffered chunk; `block_at` and `read_view` serve
    `TarReader` and the applier from that chunk without a copy or a call to the stream."""

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._buf = b""
        self._view = memoryview(self._buf)
        self._pos = 0  # read position in _buf
        self._base = 0  # stream offset of _buf[0]

    def tell(self) -> int:
        return self._base + self._pos

    def read(self, n: int = -1) -> bytes:
        avail = len(self._buf) - self._pos
        if 0 <= n <= avail:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            return out
        parts = [self._buf[self._pos :]] if avail else []
        got = avail
        self._base += len(self._buf)
        self._set(b"", 0)
        while n < 0 or got < n:
            chunk = self._raw.read(CHUNK)
            if not chunk:
                break
            if n >= 0 and got + len(chunk) > n:
                need = n - got
                parts.append(chunk[:need])
                self._set(chunk, need)
                got = n
                break
            parts.append(chunk)
            got += len(chunk)
            self._base += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _set(self, buf: bytes, pos: int) -> None:
        self._buf, self._pos = buf, pos
        self._view = memoryview(buf)

    def read_view(self, n: int) -> bytes | memoryview:
        """``read(n)``, as a view of the buffered chunk when the `n` bytes are all in it (no copy)."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._view[pos:end]
        return self.read(n)

    def peek(self, offset: int, n: int) -> bytes | None:
        """The `n` bytes at stream `offset`, when they lie ahead in the buffered chunk; else None (the
        caller then moves there with `seek` and `read`, which also see the end of the stream)."""
        start = offset - self._base
        end = start + n
        if self._pos <= start and end <= len(self._buf):
            return self._buf[start:end]
        return None

    def skip_to(self, offset: int) -> None:
        """Move on to stream `offset`, which `peek` has just found in the buffered chunk."""
        self._pos = offset - self._base

    def block_at(self, offset: int) -> bytes | None:
        """`peek` at the tar block at `offset`, and move past it if it was there."""
        block = self.peek(offset, tarfile.BLOCKSIZE)
        if block is not None:
            self._pos = offset + tarfile.BLOCKSIZE - self._base
        return block

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos < self.tell():
            raise OSError(f"a layer tar stream only moves forwards (to {pos} from {self.tell()})")
        while self.tell() < pos:
            if not self.read(min(CHUNK, pos - self.tell())):
                break  # the end: the next read tells the caller
        return self.tell()


class TarReader:
    """The entries of a layer tar read forwards from a stream (see the module docstring).

    `next` gives each entry as ``tarfile`` would (a `CheckedTarInfo`), then None after the
    end-of-archive block; the caller reads an entry's data (from `src`, at ``offset_data``) before it
    asks for the next entry, or leaves it to be skipped. Names are decoded as UTF-8 with
    surrogateescape: every byte of a name survives the round trip.
    """

    def __init__(self, stream: Readable) -> None:
        self.src = ForwardReader(stream)
        # tarfile keeps its offset bookkeeping, global PAX headers and extension processing; opening
        # it reads the first entry (through `CheckedTarInfo`).
        self._tf = tarfile.TarFile(
            fileobj=cast(IO[bytes], self.src),
            mode="r",
            tarinfo=CheckedTarInfo,
            encoding=_ENCODING,
            errors=_ERRORS,
        )
        self._first: tarfile.TarInfo | None = self._tf.firstmember  # type: ignore[attr-defined]
        self._tf.firstmember = None  # type: ignore[attr-defined]
        self._tf.members.clear()  # type: ignore[attr-defined]  # (the first entry: never looked up)
        self._done = self._first is None

    def next(self) -> tarfile.TarInfo | None:
        """The next entry; None after the end-of-archive block. Raises `TarCorruptError` (and, for
        the stream ending where an entry's data should be, ``tarfile.ReadError``)."""
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._done:
            return None
        tf, src = self._tf, self.src
        offset = tf.offset  # where the next header starts
        buf = src.block_at(offset)
        if buf is None:  # TarFile.next()'s way there, with its error
            if offset != src.tell():
                src.seek(offset - 1)
                if not src.read(1):
                    raise tarfile.ReadError("unexpected end of data")
            buf = src.read(tarfile.BLOCKSIZE)
        if not tf.pax_headers and buf[156:157] in _PAX_TYPES:  # (the most common extension)
            size = _pax_header_size(buf)
            if size is not None and (member := self._pax_member(offset, size)) is not None:
                return member
        m = _fast_header(CheckedTarInfo, buf, _ENCODING, _ERRORS)
        if m is not None and m.type not in _EXTENDED_TYPES and not tf.pax_headers:
            # What `TarInfo._proc_builtin` does for such a header (with no global PAX header to
            # apply): data right after the header, skipped for regular files only; a directory's
            # name without "/".
            m.offset = offset
            m.offset_data = data = offset + tarfile.BLOCKSIZE
            tf.offset = data + _blocks(m.size) if m.type in REGULAR_TYPES else data
            if m.type == tarfile.DIRTYPE:
                m.name = m.name.rstrip("/")
            return m
        try:
            return CheckedTarInfo._member(tf, buf, offset, m, dircheck=True)
        except _EOFHeaderError:  # the end-of-archive block: the one normal end
            self._done = True
            return None

    def _pax_member(self, offset: int, size: int) -> tarfile.TarInfo | None:
        """The entry that the PAX extended header at `offset` (`size` bytes of records) introduces,
        as ``TarInfo._proc_pax`` makes it — or None, having read nothing more, for tarfile to do it.

        Taken here: records that every tarfile release reads alike (``LEN KEY=VALUE\\n``, LEN of 1
        to 20 digits and at least 5, the ``=`` and the newline inside the record, records up to the
        end or a NUL), then a header that `_fast_header` parses and that needs no processing of its
        own. Left to tarfile: anything else, and ``hdrcharset`` (releases differ on which record
        counts) or ``GNU.sparse.*`` (sparse maps) anywhere in the records.
        """
        src = self.src
        start = offset + tarfile.BLOCKSIZE
        data = _blocks(size)
        raw = src.peek(start, data + tarfile.BLOCKSIZE) if size <= MAX_EXTENDED_HEADER else None
        if raw is None or raw.find(b"hdrcharset", 0, data) >= 0 or raw.find(b"GNU.sparse.", 0, data) >= 0:
            return None
        pax: dict[str, str] = {}
        pos = 0
        while pos < data and raw[pos]:
            space = raw.find(b" ", pos, pos + 21)
            if space <= pos or not raw[pos:space].isdigit():
                return None
            end = pos + int(raw[pos:space])  # one past the record's newline
            if end < pos + 5 or end > data or raw[end - 1] != 0x0A:
                return None
            eq = raw.find(b"=", space + 1, end - 1)
            if eq <= space + 1:  # no "=", or an empty keyword
                return None
            # tarfile decodes keys and values as strict UTF-8, else with its error handler: the same
            # as decoding with that handler when it is surrogateescape.
            key = raw[space + 1 : eq].decode(_ENCODING, _ERRORS)
            pax[key] = raw[eq + 1 : end - 1].decode(_ENCODING, _ERRORS)
            pos = end
        header = raw[data:]
        # After an extension, releases with the 2025 fixes do not take a type-"\0" name ending in "/"
        # for a directory and older ones do: tarfile decides those.
        if header[156:157] == tarfile.AREGTYPE:
            return None
        m = _fast_header(CheckedTarInfo, header, _ENCODING, _ERRORS)
        if m is None or m.type in _EXTENDED_TYPES:
            return None
        # `_proc_builtin` for the header (the global PAX headers it applies are none), then what
        # `_proc_pax` does with the records: tarfile's own `_apply_pax_info` applies them.
        m.offset_data = data_at = start + data + tarfile.BLOCKSIZE
        if m.type == tarfile.DIRTYPE:
            m.name = m.name.rstrip("/")
        m._apply_pax_info(pax, _ENCODING, _ERRORS)  # type: ignore[attr-defined]
        if m.size < 0:  # (a "size" record: releases differ on negative sizes)
            return None
        m.offset = offset
        src.skip_to(data_at)
        self._tf.offset = data_at + _blocks(m.size) if m.type in REGULAR_TYPES else data_at
        return m

    def close(self) -> None:
        self._tf.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _blocks(size: int) -> int:
    """`size` bytes rounded up to whole tar blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


_PAX_TYPES = frozenset({tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE})
_EXTENDED_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


def open_tar(stream: Readable) -> TarReader:
    """The entries of the tar read from `stream` (see `TarReader`)."""
    return TarReader(stream)
