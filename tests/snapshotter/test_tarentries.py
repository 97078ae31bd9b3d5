"""`TarReader` against what it replaces: ``tarfile``'s own ``TarFile.next()`` over the same
`ForwardReader` with `CheckedTarInfo`. Every entry (its fields, offsets, PAX records, sparse map and
data) and the way the archive ends (the end-of-archive block, or the same error with the same offset)
must be the same, on generated tars — ustar, GNU and PAX, long names, global headers, hand-made PAX
records well and badly formed, GNU sparse —, cut anywhere, with a byte of a header flipped, and read
from a stream that returns short, uneven chunks (so entries straddle the reader's buffer)."""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Callable
from typing import IO, Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.convert import entryfiles, tarentries
from snapshotter.convert.tarentries import (
    CheckedTarInfo,
    ForwardReader,
    TarCorruptError,
    TarReader,
    _fast_header,
    _header_sum,
)

ATTRS = (
    "name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname",
    "devmajor", "devminor", "offset", "offset_data", "pax_headers", "sparse",
)  # fmt: skip
Outcome = tuple[list[tuple[object, ...]], str]


class _Trickle:
    """A stream returning short, uneven reads (`most` bytes at most)."""

    def __init__(self, data: bytes, seed: int = 1, most: int = 700) -> None:
        self._f = io.BytesIO(data)
        self._r = random.Random(seed)
        self._most = most

    def read(self, n: int) -> bytes:
        return self._f.read(min(n, self._r.randrange(1, self._most)))


def _consume(
    next_entry: Callable[[], tarfile.TarInfo | None], src: ForwardReader, out: list[tuple[Any, ...]]
) -> None:
    """Every entry with its data into `out`, read as the applier reads them (a regular file's data,
    then on), up to the end or an error."""
    while (m := next_entry()) is not None:
        data = b""
        if m.type in tarentries.REGULAR_TYPES and m.sparse is None and 0 <= m.size < (1 << 20):
            data = bytes(src.read_view(m.size))
        out.append((*(getattr(m, a) for a in ATTRS), data))


def _ending(e: Exception) -> str:
    if isinstance(e, TarCorruptError):
        return f"TarCorruptError at {e.offset}: {e.why}"
    return f"{type(e).__name__}: {e}"


def _with_tarfile(stream: object) -> Outcome:
    """What the applier read before `TarReader`: ``TarFile.next()`` in a loop."""
    entries: list[tuple[object, ...]] = []
    try:
        src = ForwardReader(cast(tarentries.Readable, stream))
        tf = tarfile.TarFile(
            fileobj=cast(IO[bytes], src),
            mode="r",
            tarinfo=CheckedTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        )
        _consume(tf.next, src, entries)
    except (TarCorruptError, tarfile.TarError, EOFError, OSError) as e:
        return entries, _ending(e)
    return entries, "end"


def _with_reader(stream: object) -> Outcome:
    entries: list[tuple[object, ...]] = []
    try:
        reader = TarReader(cast(tarentries.Readable, stream))
        _consume(reader.next, reader.src, entries)
    except (TarCorruptError, tarfile.TarError, EOFError, OSError) as e:
        return entries, _ending(e)
    return entries, "end"


def _assert_same(data: bytes, seed: int = 1) -> Outcome:
    want = _with_tarfile(io.BytesIO(data))
    assert _with_reader(io.BytesIO(data)) == want
    assert _with_reader(_Trickle(data, seed)) == want
    assert _with_tarfile(_Trickle(data, seed)) == want
    return want


# -- building tars -------------------------------------------------------------------------------


def _record(key: bytes, value: bytes) -> bytes:
    """One PAX record with its correct length (the length counts its own digits)."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _pax_header(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = kind
    ti.size = len(records)
    return ti.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def _entry(ti: tarfile.TarInfo, data: bytes, fmt: int) -> bytes:
    ti.size = len(data) if ti.type in tarentries.REGULAR_TYPES else ti.size
    out = ti.tobuf(fmt, "utf-8", "surrogateescape")
    if ti.type in tarentries.REGULAR_TYPES:
        out += data + bytes(-len(data) % 512)
    return out


def _rich_tar() -> bytes:
    """One of everything: plain ustar and GNU entries, PAX (times, xattrs, long names, a size record),
    GNU long names, a global header, old GNU and PAX sparse files."""
    parts: list[bytes] = []
    d = tarfile.TarInfo("etc/")
    d.type = tarfile.DIRTYPE
    parts.append(_entry(d, b"", tarfile.USTAR_FORMAT))
    f = tarfile.TarInfo("etc/hosts")
    parts.append(_entry(f, b"127.0.0.1 localhost\n", tarfile.USTAR_FORMAT))
    f = tarfile.TarInfo("etc/" + "long" * 40)
    f.pax_headers = {"mtime": "1700000000.123456789", "SCHILY.xattr.user.a": "b"}
    parts.append(_entry(f, b"x" * 700, tarfile.PAX_FORMAT))
    f = tarfile.TarInfo("usr/" + "gnu" * 50)
    parts.append(_entry(f, b"gnu long name", tarfile.GNU_FORMAT))
    s = tarfile.TarInfo("bin/sh")
    s.type, s.linkname = tarfile.SYMTYPE, "busybox" * 20
    parts.append(_entry(s, b"", tarfile.PAX_FORMAT))
    h = tarfile.TarInfo("bin/ls")
    h.type, h.linkname = tarfile.LNKTYPE, "etc/hosts"
    parts.append(_entry(h, b"", tarfile.USTAR_FORMAT))
    c = tarfile.TarInfo("dev/null")
    c.type, c.devmajor, c.devminor = tarfile.CHRTYPE, 1, 3
    parts.append(_entry(c, b"", tarfile.GNU_FORMAT))
    # a "size" record replacing the header's: the data that follows is the record's length
    parts.append(_pax_header(_record(b"size", b"600") + _record(b"path", b"sized")))
    f = tarfile.TarInfo("ignored")
    f.size = 5
    parts.append(f.tobuf(tarfile.USTAR_FORMAT) + b"s" * 600 + bytes(-600 % 512))
    # old GNU sparse: the map in the header
    sp = tarfile.TarInfo("sparse-old")
    sp.type, sp.size = tarfile.GNUTYPE_SPARSE, 512
    hdr = bytearray(sp.tobuf(tarfile.GNU_FORMAT))
    hdr[386:398], hdr[398:410], hdr[483:495] = b"%011o\0" % 4096, b"%011o\0" % 512, b"%011o\0" % 8192
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    parts.append(bytes(hdr) + b"S" * 512)
    # PAX sparse 0.1 and 1.0
    for i, extra in enumerate(
        [
            {"GNU.sparse.map": "0,10,100,10", "GNU.sparse.size": "200"},
            {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "200"},
        ]
    ):
        sp = tarfile.TarInfo(f"GNUSparseFile.0/sp{i}")
        sp.pax_headers = {"GNU.sparse.name": f"sp{i}", **extra}
        body = b"a" * 10 + b"b" * 10
        if "GNU.sparse.major" in extra:
            body = b"2\n0\n10\n100\n10\n".ljust(512, b"\0") + body
        parts.append(_entry(sp, body, tarfile.PAX_FORMAT))
    # a global header: every entry after it goes through tarfile
    parts.append(_pax_header(_record(b"uname", b"global"), tarfile.XGLTYPE))
    f = tarfile.TarInfo("after-global")
    parts.append(_entry(f, b"g", tarfile.USTAR_FORMAT))
    return b"".join(parts) + bytes(1024)


def test_a_rich_tar_reads_the_same_whole_and_in_uneven_pieces() -> None:
    entries, end = _assert_same(_rich_tar())
    assert end == "end"
    names = [e[0] for e in entries]
    assert names[:3] == ["etc", "etc/hosts", "etc/" + "long" * 40]
    assert {"sized", "sparse-old", "sp0", "sp1", "after-global"} <= set(names)
    sized = entries[names.index("sized")]
    assert sized[ATTRS.index("size")] == 600 and sized[-1] == b"s" * 600


def _header_bytes(data: bytes) -> list[int]:
    """The offsets of every byte of every header, extended header and sparse map in tar `data`."""
    entries, _ = _with_tarfile(io.BytesIO(data))
    first, data_at = ATTRS.index("offset"), ATTRS.index("offset_data")
    return [p for e in entries for p in range(cast(int, e[first]), cast(int, e[data_at]))]


def test_every_truncation_of_a_rich_tar_ends_the_same() -> None:
    data = _rich_tar()
    # inside headers, every byte; inside file data (which is only copied), block edges and a stride
    edges = {b + d for b in range(0, len(data) + 1, 512) for d in (-1, 0, 1)}
    cuts = sorted({*_header_bytes(data), *edges, *range(0, len(data), 61), len(data)} - {-1, len(data) + 1})
    for cut in cuts:
        want = _with_tarfile(io.BytesIO(data[:cut]))
        assert _with_reader(io.BytesIO(data[:cut])) == want, cut
    assert want[1] == "end"


def test_a_flipped_byte_in_any_header_of_a_rich_tar_ends_the_same() -> None:
    data = _rich_tar()
    heads = _header_bytes(data)
    assert len(heads) > 20 * 512
    for pos in heads:
        bad = bytearray(data)
        bad[pos] ^= 0x11 if pos % 3 else 0x20
        want = _with_tarfile(io.BytesIO(bytes(bad)))
        assert _with_reader(io.BytesIO(bytes(bad))) == want, pos


def test_the_common_entries_skip_tarfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain headers and PAX headers with plain records are read without tarfile's processing (that
    is the point of `TarReader`), where the stream's buffer holds them whole."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(50):
            ti = tarfile.TarInfo(f"d/f{i}" if i % 2 else "d/" + "n" * 120 + str(i))
            ti.pax_headers = {"mtime": f"17000000{i:02d}.5"} if i % 3 else {}
            ti.size = i
            tf.addfile(ti, io.BytesIO(bytes(i)))
    calls = []
    member = CheckedTarInfo._member

    def counting(cls: type[CheckedTarInfo], *args: Any, **kw: Any) -> CheckedTarInfo:
        calls.append(args[2])
        return member(*args, **kw)

    monkeypatch.setattr(CheckedTarInfo, "_member", classmethod(counting))
    entries, end = _with_reader(io.BytesIO(buf.getvalue()))
    assert end == "end" and len(entries) == 50
    last = entries[-1]
    end_block = last[ATTRS.index("offset_data")] + -(-last[ATTRS.index("size")] // 512) * 512  # type: ignore[operator]
    # tarfile reads the first entry when the reader opens (its PAX header at 0, its header at 1024),
    # and finds the end-of-archive block: nothing else.
    assert calls == [0, 1024, end_block]


ODD_RECORDS = {
    "empty-key": b"6 =ab\n",
    "minimal": b"5 a=\n" + _record(b"path", b"after-minimal"),
    "leading-zeros": b"0005 a=\n",
    "length-zero": b"0 path=x\n",
    "length-short": b"4 a=\n",
    "length-21-digits": b"000000000000000000026 a=b\n",
    "length-past-the-data": b"600 path=x\n",
    "no-newline": b"10 path=xyz",
    "no-equals": b"9 pathxy\n",
    "junk": b"path=x\n",
    "nul-then-junk": _record(b"path", b"p") + b"\0junk",
    "hdrcharset-inside-a-value": _record(b"comment", b"9 hdrcharset=foo"),
    "hdrcharset-binary": _record(b"hdrcharset", b"BINARY") + _record(b"path", b"\xff\xfe"),
    "hdrcharset-not-utf8": _record(b"hdrcharset", b"\xff"),
    "path-not-utf8": _record(b"path", b"caf\xe9"),
    "key-not-utf8": _record(b"SCHILY.xattr.user.\xff", b"v"),
    "path-with-slashes": _record(b"path", b"dir//"),
    "path-empty": _record(b"path", b""),
    "linkpath": _record(b"linkpath", b"elsewhere"),
    "size-negative": _record(b"size", b"-5"),
    "size-spaces": _record(b"size", b" 12 "),
    "size-underscore": _record(b"size", b"1_0"),
    "size-junk": _record(b"size", b"twelve"),
    "uid-big": _record(b"uid", b"4294967296"),
    "mtime-odd": _record(b"mtime", b"1e3") + _record(b"atime", b"nan"),
    "repeated": _record(b"path", b"one") + _record(b"path", b"two"),
    "sparse-key": _record(b"GNU.sparse.major", b"1"),
}


@pytest.mark.parametrize("case", sorted(ODD_RECORDS))
@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE])
def test_odd_pax_records_read_the_same_as_with_tarfile(case: str, kind: bytes) -> None:
    ti = tarfile.TarInfo("dir/" if kind == tarfile.AREGTYPE else "entry")
    ti.type = kind
    ti.linkname = "target" if kind == tarfile.SYMTYPE else ""
    first, after = tarfile.TarInfo("first"), tarfile.TarInfo("after")  # (tarfile reads the first entry)
    data = _entry(first, b"1", tarfile.USTAR_FORMAT)
    data += _pax_header(ODD_RECORDS[case]) + _entry(ti, b"z" * 20, tarfile.USTAR_FORMAT)
    _assert_same(data + _entry(after, b"after", tarfile.USTAR_FORMAT) + bytes(1024))


# -- generated tars ------------------------------------------------------------------------------

_COMPONENT = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12),
    st.sampled_from([".", "..", "", "x" * 60, "\u00e4\u00f6", ".wh.gone"]),
)
_NAME = st.lists(_COMPONENT, min_size=1, max_size=4).map("/".join) | st.sampled_from(["a/", "/abs", "./x"])
_KEYS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"uname", b"gname",
         b"SCHILY.xattr.user.k", b"comment", b"hdrcharset", b"GNU.sparse.major"]  # fmt: skip
_VALUES = st.one_of(
    st.sampled_from([b"12", b"-5", b"0", b" 7", b"1_0", b"1.25", b"BINARY", b"a/b/", b"\xff\xfe", b""]),
    st.binary(max_size=20),
)


@st.composite
def _records(draw: st.DrawFn) -> bytes:
    """PAX records, now and then not well formed: a wrong length, no newline, no "=", junk."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        rec = _record(draw(st.sampled_from(_KEYS)), draw(_VALUES))
        flaw = draw(st.integers(0, 12))
        if flaw == 1:
            n, _, rest = rec.partition(b" ")
            rec = str(int(n) + draw(st.sampled_from([-3, -1, 1, 2]))).encode() + b" " + rest
        elif flaw == 2:
            rec = rec[:-1] + b"x"
        elif flaw == 3:
            rec = rec.replace(b"=", b":", 1)
        elif flaw == 4:
            rec = draw(st.binary(min_size=1, max_size=12))
        out += rec
    return out


_TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
          tarfile.CHRTYPE, tarfile.FIFOTYPE]  # fmt: skip


@st.composite
def _tars(draw: st.DrawFn) -> bytes:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
        ti = tarfile.TarInfo(draw(_NAME))
        ti.type = draw(st.sampled_from(_TYPES))
        ti.linkname = draw(_NAME) if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
        ti.uid = draw(st.sampled_from([0, 1000, 1 << 21, 1 << 30]))
        ti.mtime = draw(st.sampled_from([0, 1_700_000_000, 1 << 34]))
        if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
            ti.pax_headers = {"mtime": "1700000000.987654321", "SCHILY.xattr.user.x": "v"}
        data = draw(st.binary(max_size=1500))
        try:
            entry = _entry(ti, data, fmt)
        except ValueError:  # a field the format cannot hold
            continue
        if draw(st.integers(0, 3)) == 0:  # hand-made PAX records before the entry
            kind = draw(st.sampled_from([tarfile.XHDTYPE, tarfile.XHDTYPE, tarfile.XGLTYPE]))
            entry = _pax_header(draw(_records()), kind) + entry
        parts.append(entry)
    tail = draw(st.sampled_from([bytes(1024), bytes(512), b"", bytes(100)]))
    return b"".join(parts) + tail


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_tars(), seed=st.integers(0, 1000))
def test_generated_tars_read_the_same_as_with_tarfile(data: bytes, seed: int) -> None:
    _assert_same(data, seed)


@settings(max_examples=200, deadline=None)
@given(data=_tars(), cut=st.integers(0, 1 << 16))
def test_generated_tars_cut_anywhere_read_the_same_as_with_tarfile(data: bytes, cut: int) -> None:
    _assert_same(data[: cut % (len(data) + 1)])


# -- the pieces ----------------------------------------------------------------------------------


@given(st.binary(min_size=512, max_size=512))
def test_header_sum_is_the_sum_of_the_bytes_with_spaces_for_the_checksum(buf: bytes) -> None:
    assert _header_sum(buf) == sum(buf[:148]) + 8 * 32 + sum(buf[156:])


_FIELD = st.one_of(
    st.binary(min_size=1, max_size=12),
    st.sampled_from([b"0000644\0", b"000644 \0", b" 644", b"\0", b"0008", b"+644", b"\x80\0\0\x01"]),
)


@settings(max_examples=400)
@given(st.lists(st.tuples(st.integers(100, 344), _FIELD), max_size=4), st.booleans())
def test_fast_header_agrees_with_frombuf_on_damaged_numbers(
    edits: list[tuple[int, bytes]], fix: bool
) -> None:
    ti = tarfile.TarInfo("etc/hosts")
    ti.size, ti.mode, ti.mtime = 20, 0o644, 1_700_000_000
    buf = bytearray(ti.tobuf(tarfile.USTAR_FORMAT))
    for pos, field in edits:
        buf[pos : pos + len(field)] = field
    del buf[512:]
    if fix:  # a good checksum over the damage: the number fields decide
        buf[148:156] = b" " * 8
        buf[148:156] = b"%06o\0 " % sum(buf)
    raw = bytes(buf.ljust(512, b"\0"))
    got = _fast_header(CheckedTarInfo, raw, "utf-8", "surrogateescape")
    if got is None:
        return  # left to tarfile
    want = tarfile.TarInfo.frombuf(raw, "utf-8", "surrogateescape")  # must not raise: we took it
    for a in ATTRS[:13]:
        assert getattr(got, a) == getattr(want, a), a


def test_read_view_is_the_buffer_itself_and_reads_on_across_chunks() -> None:
    data = random.Random(5).randbytes(200_000)
    r = ForwardReader(_Trickle(data, most=70_000))
    first = r.read(10)
    view = r.read_view(5)
    assert isinstance(view, memoryview) and first + bytes(view) == data[:15]
    got = bytearray(first + bytes(view))
    while piece := r.read_view(30_000):
        got += piece
    assert bytes(got) == data and r.tell() == len(data)


def test_file_data_is_written_in_the_same_pieces_however_the_stream_is_chunked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where ext4 puts a file's blocks follows its writes: they must not depend on the source."""
    sizes = [10, 4096, 70_000, (1 << 20) + 5, 3 * (1 << 20)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, n in enumerate(sizes):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = n
            tf.addfile(ti, io.BytesIO(random.Random(i).randbytes(n)))
    data = buf.getvalue()

    seen: list[int] = []

    def write(fd: int, piece: bytes | memoryview) -> int:
        assert fd == -1  # (nothing else writes while it is patched)
        seen.append(len(piece))
        return len(piece)

    def writes(stream: object) -> list[list[int]]:
        out: list[list[int]] = []
        reader = TarReader(cast(tarentries.Readable, stream))
        with monkeypatch.context() as m:
            m.setattr(entryfiles.os, "write", write)
            while (entry := reader.next()) is not None:
                seen.clear()
                entryfiles.write_data(reader.src, entry, -1, cast(entryfiles.RootTree, None))
                out.append(list(seen))
        return out

    want = [[min(n - i, 1 << 20) for i in range(0, n, 1 << 20)] for n in sizes]
    assert writes(io.BytesIO(data)) == want
    assert writes(_Trickle(data, most=300_000)) == want
