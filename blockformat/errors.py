"""The exceptions of `blockformat`.

Every failure this package reports is a `BlockFormatError`; lower-level exceptions (``struct.error``,
codec errors, ``OSError`` from a range source) are mapped to one of these at the boundary::

    BlockFormatError
     ├── CorruptBlobError          bytes on disk/wire are not what the format or a digest says
     │    └── TruncatedBlobError   the blob ends before a structure it needs
     ├── UnsupportedFormatError    a valid blob of a version or feature this reader does not know
     ├── InvalidArgumentError      the caller asked for something impossible (bad chunk size, range)
     └── SourceError               the range source failed to deliver bytes (I/O, network)

A message says what is wrong, where (blob name and byte offset), and what to do about it.
"""

from __future__ import annotations


class BlockFormatError(Exception):
    """Base of every error raised by `blockformat`."""


class CorruptBlobError(BlockFormatError):
    """The blob's bytes contradict its format or a digest.

    `blob` names the blob (path or digest), `offset` is the byte offset in the blob of the damaged
    structure, `what` says which structure, and `expected`/`got` carry the mismatching values.
    """

    def __init__(
        self,
        blob: str,
        offset: int,
        what: str,
        expected: object = None,
        got: object = None,
        remedy: str = "the blob is damaged; fetch it again from its source",
    ) -> None:
        self.blob = blob
        self.offset = offset
        self.what = what
        self.expected = expected
        self.got = got
        self.remedy = remedy
        detail = ""
        if expected is not None or got is not None:
            detail = f": expected {expected}, got {got}"
        super().__init__(f"{blob}: corrupt {what} at offset {offset}{detail}; {remedy}")


class TruncatedBlobError(CorruptBlobError):
    """The blob is shorter than a structure it declares."""


class UnsupportedFormatError(BlockFormatError):
    """A well-formed blob this reader cannot interpret (newer major version, unknown codec or flag)."""


class InvalidArgumentError(BlockFormatError, ValueError):
    """An argument outside what the format allows."""


class SourceError(BlockFormatError):
    """The range source could not deliver the requested bytes."""

    def __init__(self, blob: str, offset: int, length: int, cause: str) -> None:
        self.blob = blob
        self.offset = offset
        self.length = length
        self.cause = cause
        super().__init__(f"{blob}: cannot read {length} bytes at offset {offset}: {cause}")
