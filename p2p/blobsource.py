"""A registry blob as a `blockformat.source.RangeSource`: lazy, ranged reads straight from the registry.

This is what lets ``blockformat.chunkfile.ChunkReader`` open a layer blob without downloading it: the
reader asks for the tail, then for exact chunk ranges, and each becomes one ranged GET. The bytes are
not verified here (a range cannot be checked against the blob digest); the chunk reader checks every
chunk's SHA-256 against its index, and the index against the manifest's annotation.

With a `Breaker` (`p2p.health`), a registry that stopped answering is not asked again for a cool-down:
reads fail at once with a `SourceError` caused by `CoolingDownError`.

Errors follow the RangeSource contract: any `p2p` failure is raised as ``blockformat``'s `SourceError`,
with the original error as its ``__cause__`` (and in the message), so format code needs to know one type.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from blockformat.digest import Digest
from blockformat.errors import SourceError

from .errors import DeadlineExceededError, P2PError, RegistryUnavailableError, UnavailableError
from .health import Breaker
from .registry import RegistryClient

T = TypeVar("T")


class RegistryBlobSource:
    """Reads of one blob in one repository through a `RegistryClient`.

    `size` may be given (from the manifest's descriptor) to save the HEAD request that otherwise
    learns it on first use. ``read`` returns exactly ``length`` bytes, fewer only past the end of the
    blob, as the protocol asks.
    """

    def __init__(
        self,
        client: RegistryClient,
        repository: str,
        digest: Digest,
        size: int | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.repository = repository
        self.digest = digest
        self._size = size
        self._lock = threading.Lock()
        self.requests = 0  # ranged GETs sent, for tests and read-amplification figures
        self.bytes_fetched = 0

    @property
    def name(self) -> str:
        return f"{self.client.registry}/{self.repository}@{self.digest}"

    def size(self) -> int:
        with self._lock:
            if self._size is None:
                try:
                    self._size = self._guarded(lambda: self.client.blob_size(self.repository, self.digest))
                except P2PError as e:
                    raise SourceError(self.name, 0, 0, f"cannot learn the blob size: {e}") from e
            return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise SourceError(self.name, offset, length, "negative offset or length")
        end = min(offset + length, self.size())
        if end <= offset:
            return b""
        try:
            data = self._guarded(
                lambda: self.client.read_blob_range(self.repository, self.digest, offset, end - offset)
            )
        except P2PError as e:
            raise SourceError(self.name, offset, end - offset, str(e)) from e
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        return data

    def _guarded(self, request: Callable[[], T]) -> T:
        """Run `request` past the breaker (if any), telling it what the answer says of the registry."""
        if self.breaker is None:
            return request()
        admission = self.breaker.admit(self.name)
        try:
            result = request()
        except (RegistryUnavailableError, UnavailableError) as e:
            if isinstance(e, DeadlineExceededError):
                self.breaker.done(admission)  # our own time ran out before asking: no news
            else:
                self.breaker.failed(admission, e.cause if isinstance(e, RegistryUnavailableError) else str(e))
            raise
        except P2PError:
            self.breaker.succeeded(admission)  # it answered, if not with what we wanted
            raise
        except BaseException:
            self.breaker.done(admission)
            raise
        self.breaker.succeeded(admission)
        return result
