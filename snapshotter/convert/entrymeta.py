"""What a layer tar's entries mean, as the appliers of containerd and docker read them.

- `entry_times`: (atime, mtime) in nanoseconds from the PAX ``mtime``/``atime`` records
  (``TarInfo.mtime`` is a float and loses them); atime is never before mtime; times outside what
  ``utimensat`` and ext4 can hold (negative, past 2262) become the epoch, like containerd's
  ``boundTime``.
- `entry_xattrs`: PAX ``SCHILY.xattr.NAME`` records (raw bytes) and libarchive's
  ``LIBARCHIVE.xattr.NAME`` (URL-encoded name, base64 value).

Metadata that does not parse is an `EntryMetadataError`; the applier names the layer and the entry.
"""

from __future__ import annotations

import base64
import binascii
import re
import tarfile
import urllib.parse

#: utimensat and ext4 hold times from the epoch to 2262 (int64 nanoseconds); containerd clamps the same.
_MAX_NS = (1 << 63) - 1


class EntryMetadataError(Exception):
    """An entry's PAX records say something that cannot be applied (`why`)."""


_PAX_TIME = re.compile(r"(-?)([0-9]+)(?:\.([0-9]*))?")


def _pax_ns(value: str) -> int | None:
    """A PAX time record ("1700000000.123456789", digits past nanoseconds dropped) in nanoseconds."""
    m = _PAX_TIME.fullmatch(value)
    if m is None:
        return None
    ns = int(m.group(2)) * 1_000_000_000 + int((m.group(3) or "")[:9].ljust(9, "0"))
    return -ns if m.group(1) else ns


def entry_type(m: tarfile.TarInfo) -> str:
    """The entry's type flag as a character, for messages."""
    return m.type.decode("latin-1")


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= _MAX_NS else 0


def entry_times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns: PAX records keep nanoseconds; atime is never before mtime (containerd)."""
    pax = m.pax_headers
    mtime = int(m.mtime) * 1_000_000_000
    if not pax:  # (most entries of most layers)
        mtime = _bound(mtime)
        return mtime, mtime
    if "mtime" in pax:
        parsed = _pax_ns(pax["mtime"])
        if parsed is None:
            raise EntryMetadataError(f"invalid PAX mtime {pax['mtime']!r}")
        mtime = parsed
    atime = mtime
    if "atime" in pax:
        parsed = _pax_ns(pax["atime"])
        atime = max(parsed, mtime) if parsed is not None else mtime
    return _bound(atime), _bound(mtime)


def entry_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """The entry's extended attributes by name (SCHILY first, libarchive's where SCHILY has none)."""
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):  # value: the raw bytes, read back with surrogateescape
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
    for key, value in m.pax_headers.items():  # libarchive: URL-encoded name, base64 value
        if key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :], errors="surrogateescape")
            try:
                raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise EntryMetadataError(f"xattr {name!r}: value is not base64") from None
            out.setdefault(name, raw)
    return out
