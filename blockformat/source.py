"""Range sources: where a reader gets a blob's bytes from.

A range source is the one small interface between the formats and the world: a name for messages,
the blob's total size, and ``read(offset, length)``. A local file implements it here; the HTTP client
and the node blob cache (``p2p``) implement it later, and tests use plain ``bytes``.

``read`` returns exactly ``length`` bytes unless the blob ends first, in which case it returns what
there is; it raises `SourceError` when the bytes cannot be had at all.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from .errors import SourceError


@runtime_checkable
class RangeSource(Protocol):
    @property
    def name(self) -> str: ...

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class BytesSource:
    """A blob held in memory."""

    def __init__(self, data: bytes, name: str = "<memory>") -> None:
        self._data = bytes(data)
        self._name = name
        self.reads: list[tuple[int, int]] = []  # (offset, length) of every read, for tests

    @property
    def name(self) -> str:
        return self._name

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self._data[offset : offset + length]


class FileSource:
    """A blob in a local file, read with ``pread``; the file stays open until `close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.fspath(path)
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise SourceError(self._path, 0, 0, e.strerror or str(e)) from None

    @property
    def name(self) -> str:
        return self._path

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as e:
            raise SourceError(self._path, offset, length, e.strerror or str(e)) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
