"""Transfers from peers: a signed ranged GET to another node, cancelled at the reader's deadline.

Runs in the node's trio loop (`p2p.runtime`) with httpx's async client; worker threads reach it through
the loop's portal (`PeerClient.fetch` from a thread). Each transfer runs in a cancel scope at the
earlier of the reader's deadline and `timeout`: when it expires the connection is closed and the
thread that waits gets a `PeerError` of kind ``timeout`` — nothing keeps fetching on its behalf.

The bytes are not verified here (a peer is as trustworthy as the network): the caller hands them to
the cache, which checks every chunk against the blob's index before anything is kept or returned, and
demotes the peer if they fail (`p2p.node`).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence

import httpx
import trio

from .errors import P2PError
from .peerauth import Signer
from .peerwire import DEADLINE_HEADER, HEALTH_PATH, HOPS_HEADER, TO_HEADER, BlobRef, range_header
from .runtime import trio_deadline

#: Seconds to connect to a peer (a live peer on the same network answers in milliseconds).
CONNECT_TIMEOUT = 2.0


class PeerError(P2PError):
    """A peer did not deliver. `kind`: ``busy`` (503), ``refused`` (403/404: it will not fetch this),
    ``auth`` (401), ``timeout``, ``error`` (connection or protocol), ``upstream`` (its upstreams
    failed: 502/504)."""

    def __init__(self, member: str, kind: str, why: str, retry_after: float | None = None) -> None:
        super().__init__(f"peer {member}: {why}")
        self.member = member
        self.kind = kind
        self.retry_after = retry_after


def ssl_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The client side of peer TLS: verify the peer against the fleet's CA, present our certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


class PeerClient:
    def __init__(
        self,
        me: str,
        signer: Signer,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
    ) -> None:
        self.me = me
        self.signer = signer
        self.timeout = timeout
        self.scheme = "https" if tls is not None else "http"
        self._tls = tls
        self._max_connections = max_connections
        self._http: httpx.AsyncClient | None = None
        self.active = 0  # transfers in flight (tests: none is left running after a deadline)
        self.cancelled = 0  # transfers cut off by their deadline

    async def open(self) -> None:
        """Create the HTTP client (in the loop: it belongs to it)."""
        self._http = httpx.AsyncClient(
            verify=self._tls if self._tls is not None else False,
            limits=httpx.Limits(max_connections=self._max_connections, max_keepalive_connections=32),
            timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT),
            trust_env=False,  # peers are on the node network: never through an HTTP proxy
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _signed(self, target: str, range_value: str, extra: dict[str, str]) -> dict[str, str]:
        return {**extra, **self.signer.headers("GET", target, range_value, extra)}

    async def fetch(
        self, member: str, ref: BlobRef, offset: int, length: int, hops: Sequence[str], at: float | None
    ) -> bytes:
        """Exactly bytes [offset, offset+length) of blob `ref` from `member`, before deadline `at`
        (`time.monotonic()`; None: only `timeout`)."""
        want = f"bytes {offset}-{offset + length - 1}/"
        return await self._transfer(member, ref, range_header(offset, length), hops, at, want, length)

    async def fetch_document(self, member: str, ref: BlobRef, hops: Sequence[str], at: float | None) -> bytes:
        """The whole document `ref` (``ref.document``) from `member`, before `at`: at most its size."""
        return await self._transfer(member, ref, "", hops, at, None, ref.size)

    async def _transfer(
        self,
        member: str,
        ref: BlobRef,
        rng: str,
        hops: Sequence[str],
        at: float | None,
        content_range: str | None,
        length: int,
    ) -> bytes:
        """One signed GET of `ref` (a range: 206 with `content_range`, exactly `length` bytes; a document:
        200, at most `length` bytes) in a cancel scope at the earlier of `at` and `timeout`."""
        http = self._http
        if http is None:
            raise PeerError(member, "error", "the peer client is closed")
        now = time.monotonic()
        end = now + self.timeout if at is None else min(at, now + self.timeout)
        target = ref.target()
        extra = {
            HOPS_HEADER: ",".join([*hops, self.me]),
            DEADLINE_HEADER: f"{max(0.0, end - now):.3f}",
            TO_HEADER: member,
        }
        headers = {**({"range": rng} if rng else {}), **self._signed(target, rng, extra)}
        self.active += 1
        try:
            with trio.move_on_at(trio_deadline(end)):
                try:
                    return await self._get(
                        http, f"{self.scheme}://{member}{target}", member, headers, content_range, length
                    )
                except httpx.HTTPError as e:
                    raise PeerError(
                        member, "error", f"{type(e).__name__}: {e or 'connection failed'}"
                    ) from None
            self.cancelled += 1
            raise PeerError(
                member, "timeout", f"no answer for {rng or 'the document'} of {ref.digest} in time"
            )
        finally:
            self.active -= 1

    @staticmethod
    async def _get(
        http: httpx.AsyncClient,
        url: str,
        member: str,
        headers: dict[str, str],
        content_range: str | None,
        length: int,
    ) -> bytes:
        async with http.stream("GET", url, headers=headers) as resp:
            status = resp.status_code
            if status != (200 if content_range is None else 206):
                body = (await resp.aread())[:300].decode(errors="replace").strip()
                raise _status_error(member, status, body, resp.headers.get("retry-after"))
            if content_range is not None and not resp.headers.get("content-range", "").startswith(
                content_range
            ):
                raise PeerError(member, "error", f"206 for the wrong range: {resp.headers}")
            buf = bytearray()
            async for piece in resp.aiter_raw():
                buf += piece
                if len(buf) > length:
                    raise PeerError(member, "error", f"sent more than the {length} bytes asked for")
            if content_range is not None and len(buf) != length:
                raise PeerError(member, "error", f"sent {len(buf)} of {length} bytes")
            return bytes(buf)

    async def health(self, member: str, timeout: float) -> None:
        """Raise `PeerError` unless `member` answers its health check within `timeout`."""
        http = self._http
        if http is None:
            raise PeerError(member, "error", "the peer client is closed")
        headers = self._signed(HEALTH_PATH, "", {TO_HEADER: member})
        with trio.move_on_after(timeout):
            try:
                resp = await http.get(f"{self.scheme}://{member}{HEALTH_PATH}", headers=headers)
            except httpx.HTTPError as e:
                raise PeerError(member, "error", f"{type(e).__name__}: {e or 'connection failed'}") from None
            if resp.status_code != 200:
                raise _status_error(member, resp.status_code, resp.text[:300], None)
            return
        raise PeerError(member, "timeout", f"no health answer in {timeout:.1f}s")


def _status_error(member: str, status: int, body: str, retry_after: str | None) -> PeerError:
    why = f"HTTP {status}" + (f": {body}" if body else "")
    if status == 503:
        after = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
        return PeerError(member, "busy", why, after)
    if status == 401:
        return PeerError(member, "auth", why + " (is the cluster secret the same on both nodes?)")
    if status in (403, 404):
        return PeerError(member, "refused", why)
    if status in (502, 504):
        return PeerError(member, "upstream", why)
    return PeerError(member, "error", why)
