"""Where one blob's missing ranges come from: its tree's ancestors, then the registry, then (for the
node's own reads) the other members — `BlobNode.route` orders them; `TreeSource` tries them in turn
and hands each one's bytes to the cache to verify (`p2p.transport.CheckedSource`).

A peer whose bytes fail verification is demoted and counted, and the next source is tried; a peer
that refuses, times out or errors is demoted too (a refusal only skipped). When every source failed,
the error names each one's failure, as an ``ExceptionGroup`` in the order tried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from blockformat.errors import CorruptBlobError, SourceError

from . import deadline, tally
from .errors import P2PError, RefusedError, UpstreamsFailedError
from .peerclient import PeerError
from .peerwire import BlobRef
from .runtime import LoopNotRunningError
from .transport import BlobTransport, RegistryTransport

if TYPE_CHECKING:
    from .node import BlobNode


class PeerTransport:
    """One peer as a blob transport: a signed ranged GET through the trio loop, at the thread's
    deadline (`p2p.peerclient`), carrying the hops of the request being served (if any)."""

    kind = "peer"

    def __init__(self, node: BlobNode, member: str) -> None:
        self.node = node
        self.member = member
        self.name = f"peer {member}"

    def fetch(self, ref: BlobRef, offset: int, length: int) -> bytes:
        node = self.node
        assert node.peers is not None
        return self._call(node.peers.fetch, ref, offset, length, node.hops(), deadline.current())

    def fetch_document(self, ref: BlobRef) -> bytes:
        node = self.node
        assert node.peers is not None
        return self._call(node.peers.fetch_document, ref, node.hops(), deadline.current())

    def _call(self, fn: Callable[..., Awaitable[bytes]], *args: Any) -> bytes:
        loop = self.node.loop
        try:
            if loop is None:
                raise LoopNotRunningError("the peer network is not running")
            return loop.call(fn, self.member, *args)
        except LoopNotRunningError as e:  # the peer network stopped: this peer is out of reach
            raise PeerError(self.member, "error", str(e)) from None


class TreeSource:
    """A blob's upstream as the cache sees it: the tree's ancestors, then the registry (module docstring)."""

    def __init__(self, node: BlobNode, ref: BlobRef, plain_http: bool | None) -> None:
        self.node = node
        self.ref = ref
        self.plain_http = plain_http
        self._registry: RegistryTransport | None = None
        self._lock = threading.Lock()
        self._unchecked = threading.local()
        self.peer_bytes = 0
        self.registry_bytes = 0
        self.bad_peers = 0

    @property
    def name(self) -> str:
        return f"{self.ref.digest}"

    def size(self) -> int:
        return self.ref.size

    # -- the route --------------------------------------------------------------------------------

    def registry(self) -> RegistryTransport | None:
        if not self.ref.has_origin:
            return None
        if self.node.serving_peer() and not self.node.fetches_for_peers(self.ref):
            return None
        with self._lock:
            if self._registry is None:
                assert self.ref.registry is not None
                client, breaker = self.node.registry_client(self.ref.registry, self.plain_http)
                self._registry = RegistryTransport(client, self.ref, breaker)
            return self._registry

    def route(self) -> list[BlobTransport]:
        """Where to ask, in order (`BlobNode.route`)."""
        return self.node.route(self.ref.digest, self.registry())

    # -- fetching ---------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Unchecked bytes (the blob's tail, while its index is learnt: `ChunkIndex.load` checks them)."""
        end = min(offset + length, self.ref.size)
        if end <= offset:
            return b""
        got: list[bytes] = []
        self._fetch(offset, end - offset, got.append, checked=False)
        return got[0]

    def fetch_checked(self, offset: int, length: int, store: Callable[[bytes], None]) -> None:
        self._fetch(offset, length, store, checked=True)

    def distrust_unchecked(self) -> None:
        member, n = getattr(self._unchecked, "last", (None, 0))
        self._unchecked.last = (None, 0)
        if member is not None:
            with self._lock:
                self.peer_bytes -= n  # counted as delivered; they were not
            self._bad_bytes(member, "its bytes of the blob's index failed their check")

    def _fetch(self, offset: int, length: int, store: Callable[[bytes], None], checked: bool) -> None:
        errors: list[Exception] = []
        route = self.route()
        for transport in route:
            deadline.check(f"{self.name}: {offset}+{length}")
            started = time.monotonic()
            try:
                data = transport.fetch(self.ref, offset, length)
                if len(data) != length:
                    raise P2PError(f"{transport.name}: {len(data)} of {length} bytes")
            except PeerError as e:
                errors.append(e)
                self.node.fetch_failed(transport.kind, self.ref.digest, e)
                self.node.peer_failed(e)
                continue
            except P2PError as e:
                errors.append(e)
                self.node.fetch_failed(transport.kind, self.ref.digest, e)
                continue
            seconds = time.monotonic() - started
            try:
                store(data)
            except CorruptBlobError as e:
                errors.append(P2PError(f"{transport.name} sent wrong bytes: {e}"))
                self.node.metrics.errors.add(transport.kind, self.ref.digest, str(errors[-1]))
                if isinstance(transport, PeerTransport):
                    self._bad_bytes(transport.member, str(e))
                    continue
                self.node.metrics.corrupt.inc(transport.kind)
                raise SourceError(self.name, offset, length, f"the registry sent wrong bytes: {e}") from e
            self.node.metrics.fetch_seconds.labels(transport.kind).observe(seconds)
            self._count(transport, len(data))
            if not checked:
                member = transport.member if isinstance(transport, PeerTransport) else None
                self._unchecked.last = (member, len(data))
            return
        what = f"{self.ref.digest} {offset}+{length}"
        if not route:
            raise SourceError(self.name, offset, length, "no upstream to fetch it from") from RefusedError(
                f"{what}: no peer has it and this node does not fetch its registry for peers"
            )
        if len(errors) == 1:
            raise SourceError(self.name, offset, length, str(errors[0])) from errors[0]
        group = ExceptionGroup(f"{what}: every upstream failed", errors)
        err = UpstreamsFailedError(what, errors)
        raise SourceError(self.name, offset, length, str(err)) from group

    def _count(self, transport: BlobTransport, n: int) -> None:
        with self._lock:
            if transport.kind == "peer":
                self.peer_bytes += n
            else:
                self.registry_bytes += n
        self.node.metrics.fetched.labels(transport.kind).inc(n)
        tally.add(transport.kind, n)
        if self.node.serving_peer():
            self.node.metrics.for_peers.labels(transport.kind).inc(n)

    def _bad_bytes(self, member: str, why: str) -> None:
        with self._lock:
            self.bad_peers += 1
        self.node.metrics.bad_bytes.inc()
        self.node.metrics.corrupt.inc("peer")
        self.node.demote(member, self.node.settings.demote_seconds, f"sent wrong bytes: {why}")
