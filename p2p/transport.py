"""Blob transports: the one small interface every place bytes can come from implements.

A *blob transport* hands over a range of a blob named by digest (`BlobRef`): the registry
(`RegistryTransport`), a peer (`p2p.node.PeerTransport`), later a mirror. It runs on the calling thread
under that thread's deadline (`p2p.deadline`) and raises a `P2PError` when it cannot deliver. It does
not verify: the node cache checks every chunk of what it returns against the blob's index.

A *checked source* is what the node cache fetches through (`p2p.treesource.TreeSource`): it tries transports
in order and hands each one's bytes to the cache's `store`, which verifies and keeps them; a `store`
that raises `CorruptBlobError` rejects that transport's bytes, and the next transport is tried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from blockformat.errors import SourceError

from .blobsource import RegistryBlobSource
from .errors import P2PError
from .health import Breaker
from .manifest import MAX_DOCUMENT_SIZE
from .peerwire import BlobRef
from .registry import RegistryClient


class BlobTransport(Protocol):
    #: For messages and metrics: ``registry HOST``, ``peer IP:PORT``.
    @property
    def name(self) -> str: ...

    #: ``registry`` or ``peer`` (the metrics' source label).
    @property
    def kind(self) -> str: ...

    def fetch(self, ref: BlobRef, offset: int, length: int) -> bytes: ...

    def fetch_document(self, ref: BlobRef) -> bytes:
        """The whole small blob `ref` (an image config), unverified."""


@runtime_checkable
class CheckedSource(Protocol):
    """A range source whose fetches the cache verifies before they count (see the module docstring)."""

    def fetch_checked(self, offset: int, length: int, store: Callable[[bytes], None]) -> None: ...

    def distrust_unchecked(self) -> None:
        """The bytes this thread's last unchecked reads returned failed a check the caller made
        (the blob's index): blame whoever sent them."""


class RegistryTransport:
    """A blob's bytes from its registry, through the node's client for that registry and past the
    registry's circuit breaker (`p2p.health`); one per blob (it knows the repository)."""

    kind = "registry"

    def __init__(self, client: RegistryClient, ref: BlobRef, breaker: Breaker | None) -> None:
        if ref.repository is None:
            raise ValueError(f"blob {ref.digest} has no repository to fetch it from")
        self._source = RegistryBlobSource(client, ref.repository, ref.digest, ref.size, breaker)
        self.name = f"registry {client.registry}"

    def fetch_document(self, ref: BlobRef) -> bytes:
        assert ref.repository is not None
        return self._source.client.get_blob(ref.repository, ref.digest, ref.size, MAX_DOCUMENT_SIZE)

    def fetch(self, ref: BlobRef, offset: int, length: int) -> bytes:
        try:
            return self._source.read(offset, length)
        except SourceError as e:
            cause = e.__cause__
            if isinstance(cause, P2PError):
                raise cause from None
            raise P2PError(str(e)) from e
