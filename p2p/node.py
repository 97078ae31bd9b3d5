"""The node: the one place that decides where a blob's bytes come from (docs/p2p.md).

`BlobNode` owns the node blob cache (`p2p.cache`), the transports (the registry, the peers), the
background full downloads, and — with ``[p2p] enabled`` — the peer network: the peer server
(`p2p.peerserver`), transfers from peers (`p2p.peerclient`), membership and health checks
(`p2p.membership`), all on one trio loop (`p2p.runtime`). The device manager opens a blob with one
call (`BlobNode.open`) and reads it as a `CachedBlob`.

**Where a missing range comes from** (`TreeSource`): each blob has its own tree over the live members,
ordered by rendezvous hash of (blob digest, node id) with seeds first (`p2p.tree`); rank 0 is the root
and the parent of rank i is rank (i-1)//fanout. A node asks its parent; a parent that refuses, times out
or errors is skipped to the next ancestor, then the registry, and demoted for `demote_seconds`. Bytes
from a peer are handed to the cache, which checks every chunk against the verified index before it keeps
them (`CachedBlob._verify_and_store`): a peer whose bytes fail is demoted, counted, and the range is
fetched from the next source. The root fetches from the registry, with this node's credentials: those
handed to it for a repository (`keychain`: a CRI pull's, from `damselfly serve`), else Docker's
config.json (read again when it changes).

**Serving peers** (`BlobNode.serve_range`, called by the peer server on a worker thread): the range is
made present in this node's cache the same way — so a miss goes up this node's own tree, and concurrent
requests for the same units coalesce in the cache (`p2p.flights`): each unit crosses each edge once —
and only then read from the cache: a node passes on verified bytes only. The request's hops (the nodes
it already passed) are never asked again, so trees that differ while membership changes cannot loop.

**One deadline** travels down: a device read's (`p2p.deadline`) bounds the registry session, and a peer
transfer runs in a trio cancel scope at it; a peer request carries what is left of it to the next node.

One node with no peers (or ``enabled = false``) fetches everything from the registry, as before.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from blockformat.source import RangeSource

from . import deadline
from .auth import CredentialProvider, DockerConfigFile, chain_providers
from .background import BackgroundDownload
from .cache import BLOCK, BlobCache, CachedBlob, blocks
from .documents import DocumentStore
from .errors import P2PError, RefusedError, UpstreamsFailedError
from .health import Breaker
from .hosts import RegistrySettings, Resolver
from .keychain import Keychain
from .membership import Membership
from .nodemetrics import NodeMetrics
from .peerauth import RequestVerifier, Signer, load_secret
from .peerclient import PeerClient, PeerError, ssl_context
from .peerserver import run_peer_network
from .peerwire import BlobRef
from .registry import RegistryClient
from .runtime import TrioLoop
from .settings import P2PSettings, split_address
from .transport import BlobTransport, RegistryTransport
from .tree import Demotions, ancestors, rendezvous
from .treesource import PeerTransport, TreeSource

log = logging.getLogger(__name__)

#: Background download streams per blob.
BACKGROUND_CONCURRENCY = 2
#: Blobs opened only to serve peers that stay open (their parsed index kept) between requests.
SERVED_OPEN = 64


@dataclass(frozen=True)
class CacheSettings:
    """What `BlobNode` needs of ``[device]``: the cache and the background downloads."""

    unit_size: int
    cache_limit: int = 0
    fail_cooldown: float = 0.0
    background_delay: float = 5.0
    background_rate: float = 0.0


@dataclass
class _Opened:
    blob: CachedBlob
    source: TreeSource
    background: BackgroundDownload | None
    refs: int = 0


class BlobNode:
    """See the module docstring. `start` before use (with the peer network: binds its port)."""

    def __init__(
        self,
        cache_dir: str,
        cache: CacheSettings,
        settings: P2PSettings | None = None,
        plain_http: bool = False,
        registry: RegistrySettings | None = None,
    ) -> None:
        self.cache_settings = cache
        self.settings = settings or P2PSettings()
        self.plain_http = plain_http
        # Where registry requests go (mirrors, TLS, proxies): containerd's hosts.toml tree, read when
        # this node first talks to a registry.
        self.resolver = Resolver(registry or RegistrySettings())
        # The document store first: the cache's ledger, scanned at its start, counts it (its limit
        # bounds the whole directory).
        self.documents = DocumentStore(os.path.join(cache_dir, "documents"))
        self.cache = BlobCache(cache_dir, cache.unit_size, cache.cache_limit, cache.fail_cooldown)
        self.metrics = NodeMetrics(self._cache_reads, self.cache.stats, lambda: self.cache.repairs)
        self._released_reads = 0
        self.me = self.settings.node_id
        self.enabled = self.settings.enabled
        self.membership: Membership | None = None
        self.demotions = Demotions()
        self.loop: TrioLoop | None = None
        self.peers: PeerClient | None = None
        self.verifier: RequestVerifier | None = None
        self.server_address: str | None = None
        self._lock = threading.Lock()
        self._opened: dict[str, _Opened] = {}
        self._served: OrderedDict[str, _Opened] = OrderedDict()
        self._own_registries: set[str] = set()  # registries this node's own devices read from
        self._clients: dict[tuple[str, bool | None], RegistryClient] = {}
        self._breakers: dict[str, Breaker] = {}
        #: Credentials per repository, in memory only (`p2p.keychain`), asked before config.json.
        self.keychain = Keychain()
        self.credentials: CredentialProvider = chain_providers(self.keychain, DockerConfigFile())
        self._ctx = threading.local()
        self.uploads = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if not self.enabled:
            return
        s = self.settings
        problems = s.problems()
        if problems:
            raise P2PError("bad [p2p] settings: " + "; ".join(problems))
        secret = load_secret(s.secret_file)
        host = split_address(self.me)
        assert host is not None
        self.membership = Membership(self.me, s.peers, s.dns, s.dns_port or host[1], s.dns_server)
        self.verifier = RequestVerifier(secret, s.clock_skew)
        tls = ssl_context(s.tls_cert, s.tls_key, s.tls_ca) if s.tls else None
        self.peers = PeerClient(self.me, Signer(secret), s.timeout, tls, max_connections=4 * s.upload_limit)
        # httpx logs every request at INFO: the health checks alone would be a line per peer per second.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.loop = TrioLoop("p2p")
        self.loop.start(lambda nursery: run_peer_network(self, nursery))
        log.info("peer network: node %s, %d static members, fan-out %d", self.me, len(s.peers), s.fanout)

    def close(self) -> None:
        with self._lock:
            opened = list(self._opened.values()) + list(self._served.values())
            self._opened.clear()
            self._served.clear()
        for o in opened:
            if o.background is not None:
                o.background.stop()
            self.cache.release(o.blob)
        if self.loop is not None:
            self.loop.stop()
            self.loop = None
        for client in self._clients.values():
            client.close()

    # -- registries -------------------------------------------------------------------------------

    def registry_client(self, registry: str, plain_http: bool | None) -> tuple[RegistryClient, Breaker]:
        with self._lock:
            key = (registry, plain_http)
            if key not in self._clients:
                self._clients[key] = self.resolver.client(registry, plain_http, credentials=self.credentials)
            breaker = self._breakers.setdefault(
                registry, Breaker(f"registry {registry}", self.cache_settings.fail_cooldown)
            )
            return self._clients[key], breaker

    def fetches_for_peers(self, ref: BlobRef) -> bool:
        """Whether this node asks `ref`'s registry for a peer: one listed in ``[p2p] registries``
        (``*``: any), or one this node's own devices read from (its own workloads reach it)."""
        allowed = self.settings.registries
        return "*" in allowed or ref.registry in allowed or ref.registry in self._own_registries

    # -- the tree ---------------------------------------------------------------------------------

    def hops(self) -> list[str]:
        """The nodes the peer request this thread serves already passed (empty: our own read)."""
        hops: list[str] = getattr(self._ctx, "hops", [])
        return hops

    def serving_peer(self) -> bool:
        """Whether this thread serves a peer's request (not a read of this node's own)."""
        return bool(getattr(self._ctx, "serving", False))

    def ancestors(self, digest: str) -> list[str]:
        if self.membership is None or self.loop is None or not self.loop.running:
            return []
        members = self.membership.members()
        if len(members) < 2:
            return []
        order = rendezvous(digest, members, self.settings.seeds)
        skip = set(self.hops())
        return [
            m
            for m in ancestors(order, self.me, self.settings.fanout)
            if m not in skip and not self.demotions.is_demoted(m)
        ]

    def route(self, digest: str, registry: BlobTransport | None) -> list[BlobTransport]:
        """Where to ask for a blob's bytes, in order: the live, not demoted ancestors in its tree that
        the request did not pass already, then the registry (if this node may fetch it). For this node's
        own reads, last the other live members, by rank: a root whose registry fails (or a node whose
        whole chain did) still gets what a peer holds. A request served for a peer does not go wide:
        its requester does, so one read asks each member at most once."""
        out: list[BlobTransport] = [PeerTransport(self, m) for m in self.ancestors(digest)]
        if registry is not None:
            out.append(registry)
        if (
            not self.serving_peer()
            and self.membership is not None
            and self.loop is not None
            and self.loop.running
        ):
            asked = {t.member for t in out if isinstance(t, PeerTransport)} | {self.me}
            order = rendezvous(digest, self.membership.members(), self.settings.seeds)
            out += [
                PeerTransport(self, m) for m in order if m not in asked and not self.demotions.is_demoted(m)
            ]
        return out

    def demote(self, member: str, seconds: float, why: str) -> None:
        self.demotions.demote(member, seconds, why)
        self.metrics.demotions.inc()
        log.warning("peer %s demoted for %.0fs: %s", member, seconds, why)

    def fetch_failed(self, source: str, digest: str, e: Exception) -> None:
        """A fetch from a transport of kind `source` failed: counted, and kept among the last errors.
        A peer's refusal is none (it answered: it only does not fetch that blob for others)."""
        if isinstance(e, PeerError) and e.kind == "refused":
            return
        self.metrics.fetch_failures.labels(source).inc()
        self.metrics.errors.add(source, digest, str(e))

    def peer_failed(self, e: PeerError) -> None:
        self.metrics.peer_errors.labels(e.kind).inc()
        if e.kind == "refused":
            return  # it is there and answered: it just does not fetch this blob for us
        seconds = e.retry_after if e.kind == "busy" and e.retry_after else self.settings.demote_seconds
        self.demote(e.member, seconds, str(e))

    # -- blobs ------------------------------------------------------------------------------------

    def open(self, ref: BlobRef, plain_http: bool | None = None) -> CachedBlob:
        """The cached blob `ref` for this node's own use (a device's layer); `release` when done.
        Opening it again shares it. `start_background` downloads the rest of it."""
        with self._lock:
            if ref.registry is not None:
                self._own_registries.add(ref.registry)
            o = self._opened.get(ref.digest)
            if o is None:
                o = self._open_locked(ref, plain_http)
                self._opened[ref.digest] = o
            o.refs += 1
        return o.blob

    def start_background(self, blob: CachedBlob) -> None:
        """Download every missing unit of `blob` (opened with `open`) in the background, then verify
        the whole blob and seal it (`p2p.background`); once per blob while it is open."""
        with self._lock:
            o = self._opened.get(blob.digest)
            if o is None or o.background is not None:
                return
            c = self.cache_settings
            bg = BackgroundDownload(blob, c.background_delay, c.background_rate, BACKGROUND_CONCURRENCY)
            o.background = bg.start()

    def _open_locked(self, ref: BlobRef, plain_http: bool | None) -> _Opened:
        served = self._served.pop(ref.digest, None)
        if served is not None:
            if served.blob.index_digest == ref.index_digest:
                return _Opened(served.blob, served.source, None)
            # Opened for a peer that named another index digest: the manifest's (ours) decides.
            self.cache.release(served.blob)
        source = TreeSource(self, ref, plain_http)
        blob = self.cache.open(ref.digest, ref.size, source, ref.index_digest)
        up = blob.upstream
        return _Opened(blob, up if isinstance(up, TreeSource) else source, None)

    def _cache_reads(self) -> float:
        with self._lock:
            blobs = [o.blob for o in (*self._opened.values(), *self._served.values())]
            return float(self._released_reads + sum(b.local_bytes for b in blobs))

    def release(self, blob: CachedBlob) -> None:
        with self._lock:
            o = self._opened.get(blob.digest)
            if o is None:
                return
            o.refs -= 1
            if o.refs > 0:
                return
            del self._opened[blob.digest]
            self._released_reads += blob.local_bytes
        if o.background is not None:
            o.background.stop()
        self.cache.release(o.blob)

    def background(self, digest: str) -> BackgroundDownload | None:
        o = self._opened.get(digest)
        return None if o is None else o.background

    def source_of(self, blob: CachedBlob) -> TreeSource | None:
        return _source_of(blob, None)

    # -- serving peers ----------------------------------------------------------------------------

    def serve_range(self, ref: BlobRef, offset: int, length: int, hops: list[str], at: float) -> bytes:
        """Bytes [offset, offset+length) of `ref`, every unit verified in this node's cache, for a peer
        request that passed `hops`, before `at` (runs on a worker thread of the peer server)."""
        blob = self._serving(ref)
        self._ctx.hops, self._ctx.serving = hops, True
        try:
            with deadline.scope(at):
                data = blob.read(offset, length)  # also units the cache has no room to keep, verified
        finally:
            self._ctx.hops, self._ctx.serving = [], False
        self.metrics.uploaded.inc(len(data))
        return data

    # -- documents (image configs) ---------------------------------------------------------------

    def document(self, ref: BlobRef, plain_http: bool | None = None) -> bytes:
        """The whole small blob `ref` (an image config): from this node's document store, else from
        its tree, the registry, then the other members (`route`), verified against its digest before it
        is kept (``<cache>/documents``) or returned. Runs under the thread's deadline."""
        data = self.documents.get(ref.digest, ref.size)
        if data is not None:
            return data
        registry: RegistryTransport | None = None
        if ref.has_origin and (not self.serving_peer() or self.fetches_for_peers(ref)):
            assert ref.registry is not None
            client, breaker = self.registry_client(ref.registry, plain_http)
            registry = RegistryTransport(client, ref, breaker)
        errors: list[Exception] = []
        for transport in self.route(ref.digest, registry):
            deadline.check(f"{ref.digest}: the document")
            started = time.monotonic()
            try:
                data = transport.fetch_document(ref)
            except PeerError as e:
                errors.append(e)
                self.fetch_failed(transport.kind, ref.digest, e)
                self.peer_failed(e)
                continue
            except P2PError as e:
                errors.append(e)
                self.fetch_failed(transport.kind, ref.digest, e)
                continue
            if not self.documents.matches(ref.digest, ref.size, data):
                errors.append(P2PError(f"{transport.name} sent a document that is not {ref.digest}"))
                self.metrics.corrupt.inc(transport.kind)
                self.metrics.errors.add(transport.kind, ref.digest, errors[-1].args[0])
                if isinstance(transport, PeerTransport):
                    self.metrics.bad_bytes.inc()
                    self.demote(transport.member, self.settings.demote_seconds, "sent a wrong document")
                continue
            self._keep_document(ref.digest, data)
            self.metrics.fetch_seconds.labels(transport.kind).observe(time.monotonic() - started)
            self.metrics.fetched.labels(transport.kind).inc(len(data))
            return data
        if not errors:
            raise RefusedError(f"{ref.digest}: no upstream to fetch the document from")
        if len(errors) == 1:
            raise errors[0]
        raise UpstreamsFailedError(f"{ref.digest} (a document)", errors) from ExceptionGroup(
            f"{ref.digest}: every upstream failed", errors
        )

    def _keep_document(self, digest: str, data: bytes) -> None:
        """Keep a verified document in the store, within the cache's limit (without room it is not
        kept: it was fetched for this request, and will be again)."""
        need = blocks(len(data)) + BLOCK
        if not self.cache.reserve(need):
            log.info("%s: no room within the cache limit to keep this document", digest)
            return
        try:
            self.documents.put(digest, data)
        finally:
            self.cache.settle(need, path=self.documents.path(digest))

    def serve_document(self, ref: BlobRef, hops: list[str], at: float) -> bytes:
        """`document` for a peer request that passed `hops`, before `at` (a worker thread)."""
        self._ctx.hops, self._ctx.serving = hops, True
        try:
            with deadline.scope(at):
                data = self.document(ref, self.plain_http or None)
        finally:
            self._ctx.hops, self._ctx.serving = [], False
        self.metrics.uploaded.inc(len(data))
        return data

    def _serving(self, ref: BlobRef) -> CachedBlob:
        with self._lock:
            o = self._opened.get(ref.digest) or self._served.get(ref.digest)
            if o is not None:
                if o.blob.index_digest != ref.index_digest:
                    raise RefusedError(
                        f"{ref.digest}: this node reads it with index {o.blob.index_digest}, "
                        f"not {ref.index_digest}"
                    )
                if ref.digest in self._served:
                    self._served.move_to_end(ref.digest)
                return o.blob
            if ref.size <= 0:
                raise RefusedError(f"{ref.digest}: unknown size")
            o = self._open_locked(ref, self.plain_http or None)
            self._served[ref.digest] = o
            while len(self._served) > SERVED_OPEN:
                _d, old = self._served.popitem(last=False)
                self.cache.release(old.blob)
            return o.blob

    # -- status -----------------------------------------------------------------------------------

    def blob_status(self, blob: CachedBlob) -> dict[str, Any]:
        source = _source_of(blob, None)
        if source is None:
            return {}
        return {
            "registry_bytes": source.registry_bytes,
            "peer_bytes": source.peer_bytes,
            "bad_peers": source.bad_peers,
        }

    def status(self) -> dict[str, Any]:
        m = self.metrics
        out: dict[str, Any] = {
            "enabled": self.enabled,
            "fetched_bytes": {
                k: int(m.value("damselfly_fetched_bytes", source=k)) for k in ("peer", "registry")
            },
        }
        if not self.enabled or self.membership is None:
            return out
        assert self.peers is not None
        out.update(
            id=self.me,
            address=self.server_address,
            members=self.membership.members(),
            down=self.membership.down(),
            demoted={k: {"seconds": round(v[0], 1), "why": v[1]} for k, v in self.demotions.active().items()},
            demotions=int(m.value("damselfly_peer_demotions")),
            bad_bytes=int(m.value("damselfly_peer_bad_bytes")),
            uploads=self.uploads,
            upload_bytes=int(m.value("damselfly_peer_upload_bytes")),
            active_transfers=self.peers.active,
            cancelled_transfers=self.peers.cancelled,
            peer_errors={
                k: int(m.value("damselfly_peer_errors", kind=k))
                for k in ("busy", "refused", "auth", "timeout", "error", "upstream")
            },
            served_blobs=len(self._served),
        )
        return out

    # -- trio side --------------------------------------------------------------------------------

    async def health_loop(self) -> None:
        """Check every other member every `health_interval` seconds: one that fails is routed around
        (left out of every tree) until it answers again."""
        assert self.membership is not None and self.peers is not None
        interval = self.settings.health_interval
        while True:
            members = [m for m in self.membership.all_members() if m != self.me]
            async with trio.open_nursery() as nursery:
                for m in members:
                    nursery.start_soon(self._check, m, min(2.0, interval))
            await trio.sleep(interval)

    async def _check(self, member: str, timeout: float) -> None:
        assert self.membership is not None and self.peers is not None
        try:
            await self.peers.health(member, timeout)
        except PeerError as e:
            self.membership.mark_down(member, str(e))
            return
        self.membership.mark_up(member)

    async def dns_loop(self) -> None:
        assert self.membership is not None
        while True:
            await self.membership.refresh_dns()
            await trio.sleep(self.settings.dns_interval)


def _source_of(blob: CachedBlob, default: TreeSource | None) -> TreeSource | None:
    up: RangeSource = blob.upstream
    return up if isinstance(up, TreeSource) else default


__all__ = ["BlobNode", "BlobRef", "CacheSettings", "RefusedError", "TreeSource"]
