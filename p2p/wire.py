"""HTTP plumbing under the registry client: endpoints, bodies read under a deadline, error answers.

Shared by the retry loop (`p2p.session`), the token flow (`p2p.authflow`) and the operations
(`p2p.registry`, `p2p.push`). A *consumer* (`Consumer`) gets a response and the attempt's `Deadline`;
it reads the body with `read_body` or `iter_body`, which check the deadline at every network read, so
that a trickling server is cut off in bounded time, and raises `TransientError` for a failure worth
retrying (the session's loop catches it). A final, unexpected status becomes the most specific
`p2p.errors` class (`status_error`); a transport failure is described in a few words
(`describe_transport_error`).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from .errors import AuthError, NotFoundError, RegistryError, RegistryProtocolError
from .retry import Deadline

T = TypeVar("T")

USER_AGENT = "damselfly/0.1 (+registry client)"
#: Error bodies and token answers larger than this are not read.
MAX_SMALL_BODY = 1024 * 1024


class TransientError(Exception):
    """Raised inside the retry loop (by the session or a consumer) for a failure worth retrying."""

    def __init__(self, cause: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``scheme://host[:port]``, the host name credentials are looked up under, and
    how to talk to it (`p2p.hosts.HostEndpoint` made concrete: its API root, capabilities, headers, and
    the HTTP client holding its TLS and proxy)."""

    base_url: str
    host: str
    is_mirror: bool = False
    params: Mapping[str, str] = field(default_factory=dict)  # extra query parameters (a mirror's ``ns``)
    #: What ``/v2`` of the distribution spec becomes here (a mirror's prefix, or hosts.toml's
    #: ``override_path``).
    api_root: str = "/v2"
    capabilities: frozenset[str] = frozenset({"pull", "resolve", "push"})
    headers: tuple[tuple[str, str], ...] = ()  # sent to this endpoint's own origin only
    #: The client for this endpoint (its TLS and proxy); None: the session's.
    http: httpx.Client | None = field(default=None, compare=False, repr=False)
    proxy: str | None = None  # only to say so in messages
    hint: str = ""  # where its TLS is configured (a hosts.toml), for messages

    @property
    def origin_url(self) -> httpx.URL:
        return httpx.URL(self.base_url)

    def url(self, path: str) -> httpx.URL:
        """The URL of API path `path` (``/v2/...``) at this endpoint."""
        if self.api_root != "/v2" and (path == "/v2" or path.startswith("/v2/")):
            path = self.api_root + path[3:]
        url = httpx.URL(self.base_url + path)
        return url.copy_merge_params(dict(self.params)) if self.params else url


Consumer = Callable[[httpx.Response, Deadline], T]


def read_body(resp: httpx.Response, deadline: Deadline, limit: int, where: str) -> bytes:
    """The whole body, at most `limit` bytes, before `deadline`; transport failures propagate (retried)."""
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise RegistryProtocolError(
            where, f"response body of {declared} bytes exceeds the {limit}-byte limit"
        )
    parts: list[bytes] = []
    total = 0
    for chunk in iter_body(resp, deadline, where):
        total += len(chunk)
        if total > limit:
            raise RegistryProtocolError(where, f"response body exceeds the {limit}-byte limit")
        parts.append(chunk)
    return b"".join(parts)


def iter_body(resp: httpx.Response, deadline: Deadline, where: str) -> Iterable[bytes]:
    """Yield body chunks as they arrive; give up with `TransientError` once `deadline` has passed."""
    received = 0
    for chunk in resp.iter_bytes():  # each network read as it arrives, so the deadline is checked often
        received += len(chunk)
        if deadline.expired(received):
            raise TransientError(
                f"response body too slow: not complete within the request time limit ({where})"
            )
        yield chunk


def read_error_body(resp: httpx.Response) -> bytes:
    """Read a small error body for its details; a broken or huge one is dropped, not an error itself.

    (Go's http.ServeContent, which the registry uses for blobs, sends a 416 whose Content-Length is the
    blob's, not the body's — the connection then breaks, and that must not hide the 416.)
    """
    declared = resp.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_SMALL_BODY:
        return b""
    try:
        return resp.read()
    except httpx.TransportError:
        return b""


def error_detail(body: bytes) -> str:
    """``CODE: message`` from an OCI error body (``{"errors": [{"code", "message", "detail"}]}``), or ""."""
    try:
        doc = json.loads(body)
        errors = doc["errors"]
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors[:3])
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def describe_transport_error(e: httpx.TransportError) -> str:
    """A short, specific cause for a transport failure."""
    if isinstance(e, httpx.TimeoutException):
        kind = {
            httpx.ConnectTimeout: "connecting",
            httpx.ReadTimeout: "waiting for data",
            httpx.WriteTimeout: "sending data",
            httpx.PoolTimeout: "waiting for a free connection",
        }.get(type(e), "waiting")
        return f"timed out {kind}"
    if isinstance(e, httpx.ProxyError):
        return f"proxy error: {e}"
    if isinstance(e, httpx.ConnectError):
        return f"cannot connect: {e or 'connection refused'}"
    if isinstance(e, httpx.RemoteProtocolError):
        return f"connection broken: {e or 'peer closed the connection'}"
    return f"{type(e).__name__}: {e or 'connection failed'}"


def tls_verify_failure(e: httpx.TransportError) -> str | None:
    """The reason a server's certificate did not verify, if that is what `e` is (httpx wraps the
    ``ssl.SSLCertVerificationError`` in its ``ConnectError``), else None."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    return "certificate verify failed" if "CERTIFICATE_VERIFY_FAILED" in str(e) else None


def status_error(resp: httpx.Response, body: bytes, what: str) -> RegistryError:
    """The error for a final, unexpected status."""
    url = str(resp.url)
    detail = error_detail(body)
    status = resp.status_code
    if status == 404:
        return NotFoundError(url, what, detail)
    if status in (401, 403):
        return AuthError(
            url, f"{what}: access denied (HTTP {status}{': ' + detail if detail else ''})", status
        )
    return RegistryProtocolError(
        url, f"{what}: unexpected HTTP {status}" + (f" ({detail})" if detail else ""), status
    )
