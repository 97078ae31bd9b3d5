"""An image archive's files: the regular members of an uncompressed tar, read in place by offset.

An OCI archive (a layout in a tar) and a ``docker save`` tarball are read through the same small
interface as a directory (`snapshotter.image.documents.Files`): the tar is listed once, keeping each
regular member's data offset and size, and a member is then read with ``pread`` from the archive file
(no extraction, no shared file position). Listing is bounded: ``tarfile`` checks that each member's
data lies inside the file, and an extended header (PAX, GNU long name) declaring more than
`MAX_EXTENDED_HEADER` bytes is refused before ``tarfile`` reads it into memory.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from typing import IO, BinaryIO, cast

from ..errors import ImageError
from ..image.documents import DirectoryFiles, Files, Reader
from .tarentries import MAX_EXTENDED_HEADER

_REMEDY = "pass `docker save` or OCI archive output"


class ArchiveFiles:
    """The regular members of the uncompressed tar at `path`, by normalised name."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._members: dict[str, tuple[int, int]] = {}
        self._tar: BinaryIO | None = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            headers = cast(IO[bytes], _HeaderReads(self._tar, path))  # tarfile only reads, seeks, tells
            with tarfile.open(fileobj=headers, mode="r:") as tf:
                for m in tf:
                    if m.isreg():
                        self._members[os.path.normpath(m.name)] = (m.offset_data, m.size)
        except tarfile.TarError as e:
            self.close()
            raise ImageError(path, f"is not an uncompressed tar archive ({e})", _REMEDY) from None
        except BaseException:
            self.close()
            raise

    def where(self, name: str) -> str:
        return f"{self.path}:{name}"

    def exists(self, name: str) -> bool:
        return os.path.normpath(name) in self._members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Reader]:
        entry = self._members.get(os.path.normpath(name))
        if entry is None or self._tar is None:
            raise ImageError(self.where(name), "is missing from the archive", "the archive is incomplete")
        offset, size = entry
        yield _Slice(self._tar, offset, size)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def open_files(path: str) -> Files:
    """The files of a directory, or of the archive at `path`."""
    return ArchiveFiles(path) if os.path.isfile(path) else DirectoryFiles(path)


class _HeaderReads:
    """The archive file as tarfile sees it while listing members: it only seeks and reads headers, so a
    read larger than a header can be is a hostile size (a PAX or GNU long-name header declaring GiBs)
    and is refused before tarfile allocates for it."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self._f = f
        self._path = path

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_EXTENDED_HEADER:
            raise ImageError(
                f"{self._path} (at byte {self._f.tell()})",
                f"a tar header declares {n} bytes of extended header (at most {MAX_EXTENDED_HEADER})",
                f"the archive is damaged or hostile; {_REMEDY}",
            )
        return self._f.read(n)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


class _Slice:
    """A window of an open file (a tar member), read with pread: no shared file position."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._fd = f.fileno()
        self._pos = offset
        self._end = offset + size

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data
