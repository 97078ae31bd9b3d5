"""Content digests (OCI image-spec, "Digests"): ``algorithm ":" encoded`` — checked here, and only here.

A `Digest` is a string that went through `parse_digest` (or was computed: `digest_of`, `sha256_digest`,
`Verifier.digest`), so code that holds one never checks it again: a label, an annotation or a JSON
field is parsed once where it enters, and the typed value travels from there (to the node cache, where
it names a directory, and to the chunk reader, where it is compared with a trailer).

We accept the two registered algorithms, ``sha256`` (64 lowercase hex digits) and ``sha512`` (128);
where the format says SHA-256 (index and chunk digests, docs/format.md) a caller narrows the set with
``algorithms=SHA256_ONLY``. Every complete download is checked against the digest it was asked for
with `Verifier`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from typing import NewType

from .errors import DigestMismatchError, InvalidDigestError

Digest = NewType("Digest", str)

#: Algorithm -> length of its hex encoding.
ALGORITHMS = {"sha256": 64, "sha512": 128}
SHA256_ONLY = ("sha256",)
_DIGEST_RE = re.compile(r"([a-z0-9]+):([0-9a-f]+)")


def parse_digest(text: str, algorithms: Collection[str] = ("sha256", "sha512")) -> Digest:
    """Check that `text` is a digest of one of `algorithms`; return it typed (else `InvalidDigestError`)."""
    m = _DIGEST_RE.fullmatch(text)  # not `match` with "$", which lets a trailing newline through
    if m is None or m.group(1) not in ALGORITHMS:
        raise InvalidDigestError(text, "not a digest of the form sha256:<64 lowercase hex digits>")
    algo, encoded = m.group(1), m.group(2)
    if algo not in algorithms:
        raise InvalidDigestError(text, f"a {algo} digest where only {', '.join(algorithms)} is accepted")
    if len(encoded) != ALGORITHMS[algo]:
        raise InvalidDigestError(
            text, f"a {algo} digest has {ALGORITHMS[algo]} hex digits, not {len(encoded)}"
        )
    return Digest(text)


def sha256_digest(raw: bytes) -> Digest:
    """The written-out form of a raw 32-byte SHA-256 (what the chunk container stores)."""
    return Digest("sha256:" + raw.hex())


def digest_bytes(digest: Digest) -> bytes:
    """The raw bytes a (parsed) digest encodes."""
    return bytes.fromhex(digest.partition(":")[2])


def digest_of(data: bytes | memoryview, algorithm: str = "sha256") -> Digest:
    """The digest of `data` with `algorithm`."""
    return Digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


class Verifier:
    """Hashes bytes as they stream in and checks the total against the expected digest and size."""

    def __init__(self, expected: Digest, size: int | None = None) -> None:
        self.expected = expected
        self.size = size
        self.algorithm = expected.partition(":")[0]
        self._hash = hashlib.new(self.algorithm)
        self.count = 0

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self.count += len(data)

    def digest(self) -> Digest:
        return Digest(f"{self.algorithm}:{self._hash.hexdigest()}")

    def mismatch(self) -> tuple[str, str, str] | None:
        """(what, expected, got) of the first check the bytes seen fail — size, then digest — or None."""
        if self.size is not None and self.count != self.size:
            return "size", f"{self.size} bytes", f"{self.count} bytes"
        got = self.digest()
        if got != self.expected:
            return "digest", self.expected, got
        return None

    def check(self, where: str) -> None:
        """Raise `DigestMismatchError` unless the bytes seen have the expected size and digest."""
        bad = self.mismatch()
        if bad is not None:
            what, expected, got = bad
            raise DigestMismatchError(where, expected, got, what)
