"""Content digests (OCI image-spec, "Digests"): ``algorithm ":" encoded``.

We accept the two registered algorithms, ``sha256`` (64 lowercase hex digits) and ``sha512`` (128), and
verify every complete download against the digest it was asked for with `Verifier`.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

from .errors import DigestMismatchError, InvalidReferenceError

Digest = NewType("Digest", str)

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


def parse_digest(text: str) -> Digest:
    """Check that `text` is a digest we can verify; return it typed."""
    m = _DIGEST_RE.match(text)
    if m is None:
        raise InvalidReferenceError(text, "not a digest of the form sha256:<64 lowercase hex digits>")
    if len(m.group(2)) != _ALGORITHMS[m.group(1)]:
        raise InvalidReferenceError(
            text, f"a {m.group(1)} digest has {_ALGORITHMS[m.group(1)]} hex digits, not {len(m.group(2))}"
        )
    return Digest(text)


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

    def check(self, where: str) -> None:
        """Raise `DigestMismatchError` unless the bytes seen have the expected size and digest."""
        if self.size is not None and self.count != self.size:
            raise DigestMismatchError(where, f"{self.size} bytes", f"{self.count} bytes", "size")
        got = self.digest()
        if got != self.expected:
            raise DigestMismatchError(where, self.expected, got)
