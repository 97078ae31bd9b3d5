"""The peer server: every node serves the blob ranges it has (or fetches them up its tree) to its peers.

An ASGI app (`PeerApp`) run by hypercorn's trio worker in the node's trio loop (`p2p.runtime`), next
to the node's health checks and DNS refreshes (`run_peer_network`). The protocol is `p2p.peerwire`'s.

Per request, in this order, so that nothing is spent on a request that is not a peer's:
1. the signature (`p2p.peerauth`): missing, malformed, wrong, stale or replayed is ``401`` — before the
   path's digest is even parsed;
2. the request itself: digest, size, index digest, origin, range (``400``/``416``);
3. the upload cap: past ``[p2p] upload_limit`` concurrent uploads, ``503`` with ``Retry-After``;
4. the range, made present in this node's cache and read from it on a worker thread
   (`BlobNode.serve_range`, bounded by the requester's deadline), then sent as ``206``.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from blockformat.digest import parse_digest
from blockformat.errors import SourceError

from .errors import DeadlineExceededError, P2PError, RefusedError, unavailable_cause
from .manifest import MAX_DOCUMENT_SIZE
from .peerauth import PeerAuthError
from .peerclient import PeerError
from .peerwire import (
    BLOBS_PATH,
    DEADLINE_HEADER,
    HEALTH_PATH,
    HOPS_HEADER,
    METRICS_PATH,
    NODE_HEADER,
    TO_HEADER,
    BlobRef,
    parse_hops,
    parse_range,
    parse_size,
)

if TYPE_CHECKING:
    from .node import BlobNode

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: The requester's deadline less this: the answer (even a 504) arrives before it gives up.
ANSWER_MARGIN = 0.1
#: A registry host[:port] and a repository name (OCI distribution's grammar, loosely; bounded).
_REGISTRY = re.compile(r"^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253})(:\d{1,5})?$")
_REPOSITORY = re.compile(r"^[a-z0-9]+([._/-][a-z0-9]+)*$")
SEND_PIECE = 1 << 20


class HTTPError(Exception):
    def __init__(self, status: int, why: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(why)
        self.status = status
        self.headers = headers or {}


class PeerApp:
    def __init__(self, node: BlobNode) -> None:
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        try:
            await self._handle(scope, send)
        except HTTPError as e:
            if e.status == 401:
                log.warning("refused a peer request from %s: %s", _client(scope), e)
            await _reply(send, e.status, json.dumps({"error": str(e)}).encode(), e.headers)

    async def _handle(self, scope: Scope, send: Send) -> None:
        node = self.node
        path: str = scope["path"]
        if scope["method"] != "GET":
            raise HTTPError(405, "only GET")
        if path == METRICS_PATH:
            await _reply(
                send, 200, generate_latest(node.metrics.registry), {"content-type": CONTENT_TYPE_LATEST}
            )
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        target = (scope.get("raw_path") or path.encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        assert node.verifier is not None
        try:
            node.verifier.verify("GET", target, headers)
        except PeerAuthError as e:
            node.metrics.upload_refused.labels(f"auth-{e.reason}").inc()
            raise HTTPError(401, str(e)) from None
        to = headers.get(TO_HEADER, "")
        if to not in (node.me, node.settings.listen):
            node.metrics.upload_refused.labels("auth-elsewhere").inc()
            raise HTTPError(401, f"the request is for {to[:60]!r}, not this node ({node.me})")
        if path == HEALTH_PATH:
            await _reply(
                send, 200, json.dumps({"id": node.me}).encode(), {"content-type": "application/json"}
            )
            return
        if not path.startswith(BLOBS_PATH):
            raise HTTPError(404, f"no such resource {path[:100]!r}")
        ref, offset, length, hops = _parse_blob_request(path, scope.get("query_string", b""), headers)
        if ref.document and not ref.has_origin:
            raise HTTPError(400, "a document request names its registry and repository")
        if node.me in hops:
            raise HTTPError(400, "the request already passed this node (a loop)")
        if node.uploads >= node.settings.upload_limit:
            node.metrics.upload_refused.labels("busy").inc()
            raise HTTPError(503, "too many uploads at once", {"retry-after": "1"})
        left = _deadline(headers.get(DEADLINE_HEADER, ""), node.settings.timeout)
        at = time.monotonic() + max(0.0, left - ANSWER_MARGIN)
        node.uploads += 1
        try:
            if ref.document:
                data = await trio.to_thread.run_sync(node.serve_document, ref, hops, at)
            else:
                data = await trio.to_thread.run_sync(node.serve_range, ref, offset, length, hops, at)
        except RefusedError as e:
            node.metrics.upload_refused.labels("refused").inc()
            raise HTTPError(403, str(e)) from None
        except (SourceError, P2PError, OSError, ValueError) as e:
            if _refused(e):
                node.metrics.upload_refused.labels("refused").inc()
                raise HTTPError(403, str(e)) from None
            late = isinstance(unavailable_cause(e), DeadlineExceededError) or time.monotonic() >= at
            raise HTTPError(504 if late else 502, str(e)) from None
        finally:
            node.uploads -= 1
        if ref.document:
            await _reply(send, 200, data, {"content-type": "application/octet-stream", NODE_HEADER: node.me})
        else:
            await _send_range(send, data, offset, ref.size, node.me)


def _refused(e: BaseException) -> bool:
    """Whether `e` comes down to "nobody here fetches this for a peer" (this node, or every upstream it
    asked, refused): the answer is then 403, which the requester skips without demoting anyone."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, RefusedError) or (isinstance(seen, PeerError) and seen.kind == "refused"):
            return True
        if isinstance(seen, BaseExceptionGroup):
            return all(_refused(x) for x in seen.exceptions)
        seen = seen.__cause__
    return False


def _deadline(value: str, cap: float) -> float:
    try:
        left = float(value) if value else cap
    except ValueError:
        raise HTTPError(400, f"malformed {DEADLINE_HEADER} {value[:40]!r}") from None
    if not left > 0:
        raise HTTPError(504, "the requester's deadline has passed")
    return min(left, cap)


def _parse_blob_request(
    path: str, query_string: bytes, headers: dict[str, str]
) -> tuple[BlobRef, int, int, list[str]]:
    try:
        digest = parse_digest(path[len(BLOBS_PATH) :])
        q = {k: v[0] for k, v in parse_qs(query_string.decode("latin-1"), strict_parsing=False).items()}
        size = parse_size(q.get("size", ""))
        index = q.get("index")
        if index is not None:
            parse_digest(index)
        elif q.get("document") != "1":
            raise ValueError("a range request names the blob's index digest (index=sha256:...)")
        registry, repository = q.get("registry"), q.get("repository")
        if (registry is None) != (repository is None):
            raise ValueError("registry and repository go together")
        if (
            registry is not None
            and repository is not None
            and (not _REGISTRY.match(registry) or len(repository) > 255 or not _REPOSITORY.match(repository))
        ):
            raise ValueError(f"malformed origin {registry[:60]!r} {repository[:60]!r}")
        hops = parse_hops(headers.get(HOPS_HEADER, ""))
    except ValueError as e:
        raise HTTPError(400, str(e)) from None
    if q.get("document") == "1":
        if size > MAX_DOCUMENT_SIZE:
            raise HTTPError(400, f"a document has at most {MAX_DOCUMENT_SIZE} bytes, not {size}")
        return BlobRef(digest, size, None, registry, repository, document=True), 0, size, hops
    try:
        offset, length = parse_range(headers.get("range", ""), size)
    except ValueError as e:
        raise HTTPError(416, str(e), {"content-range": f"bytes */{size}"}) from None
    return BlobRef(digest, size, index, registry, repository), offset, length, hops


async def _reply(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    h = [(b"content-length", str(len(body)).encode())]
    h += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def _send_range(send: Send, data: bytes, offset: int, size: int, me: str) -> None:
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(data)).encode()),
        (b"content-range", f"bytes {offset}-{offset + len(data) - 1}/{size}".encode()),
        (NODE_HEADER.encode(), me.encode()),
    ]
    await send({"type": "http.response.start", "status": 206, "headers": headers})
    view = memoryview(data)
    for i in range(0, len(data), SEND_PIECE):
        piece = view[i : i + SEND_PIECE]
        await send(
            {"type": "http.response.body", "body": bytes(piece), "more_body": i + SEND_PIECE < len(data)}
        )


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def hypercorn_config(node: BlobNode) -> HypercornConfig:
    s = node.settings
    config = HypercornConfig()
    config.bind = [s.listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("damselfly.peerserver")
    config.keep_alive_timeout = 30
    config.graceful_timeout = 1
    if s.tls:
        config.certfile, config.keyfile, config.ca_certs = s.tls_cert, s.tls_key, s.tls_ca
        config.verify_mode = ssl.CERT_REQUIRED  # peers prove themselves with the fleet CA too
    return config


async def run_peer_network(node: BlobNode, nursery: trio.Nursery) -> None:
    """Start the node's peer services in `nursery`: the client, the server (bound before this returns),
    the health checks and the DNS refreshes."""
    assert node.peers is not None
    await node.peers.open()
    app = PeerApp(node)
    bound = await nursery.start(_serve, app, hypercorn_config(node))
    node.server_address = bound[0] if bound else node.settings.listen
    nursery.start_soon(node.health_loop)
    if node.settings.dns:
        nursery.start_soon(node.dns_loop)


async def _serve(app: PeerApp, config: HypercornConfig, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    await serve(app, config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]
