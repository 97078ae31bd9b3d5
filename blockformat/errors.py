"""The exceptions of `blockformat`.

Every failure this package reports is a `BlockFormatError`; lower-level exceptions (``struct.error``,
codec errors, ``OSError`` from a range source) are mapped to one of these at the boundary::

    BlockFormatError
     ├── CorruptBlobError          bytes on disk/wire are not what the format or a digest says
     │    └── TruncatedBlobError   the blob ends before a structure it needs
     ├── UnsupportedFormatError    a valid blob of a version or feature this reader does not know
     ├── InvalidArgumentError      the caller asked for something impossible (bad chunk size, range)
     │    └── InvalidDigestError   a string that is not a digest we can verify (``sha256:<64 hex>``)
     ├── DigestMismatchError       bytes whose digest (or size) is not the one they were asked for
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


class InvalidDigestError(InvalidArgumentError):
    """A string that is not a digest of an algorithm we verify (`blockformat.digest.parse_digest`)."""

    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why
        shown = text if len(text) <= 140 else text[:140] + "..."
        super().__init__(f"{shown!r} is not a valid digest: {why}")


class DigestMismatchError(BlockFormatError):
    """Bytes whose digest (or size) is not the one they were expected to have (`digest.Verifier`).

    `where` says which bytes, `what` is "digest" or "size"; the bytes were not handed to anyone."""

    def __init__(
        self,
        where: str,
        expected: str,
        got: str,
        what: str = "digest",
        remedy: str = "fetch them again from their source",
    ) -> None:
        self.where = where
        self.expected = expected
        self.got = got
        self.what = what
        super().__init__(
            f"{where}: {what} mismatch: expected {expected}, got {got}; the bytes were discarded, {remedy}"
        )


class SourceError(BlockFormatError):
    """The range source could not deliver the requested bytes."""

    def __init__(self, blob: str, offset: int, length: int, cause: str) -> None:
        self.blob = blob
        self.offset = offset
        self.length = length
        self.cause = cause
        super().__init__(f"{blob}: cannot read {length} bytes at offset {offset}: {cause}")
