"""One authenticated, retrying conversation with a registry endpoint: the policy layer under `RegistryClient`.

`Session.call` sends one logical request and hands the response to a *consumer* that reads the body.
Around it, in this order:

1. **Auth.** If the endpoint is known to want a bearer token (or basic credentials) the header is added
   before sending. On ``401`` the ``WWW-Authenticate`` challenge is parsed, a token fetched (or basic
   credentials looked up) and the request repeated — once per call: a second 401 is an `AuthError`. That
   one renewal also covers a cached token the registry no longer accepts.
   Credentials stay with their owner: an ``Authorization`` header is added only to requests for the
   endpoint's own origin (scheme, host, port), and a ``401`` from any other origin (a redirect target,
   a foreign upload location) is final — its challenge is not answered with this registry's
   credentials. The token realm gets the credentials only over HTTPS or on the endpoint's origin
   (`p2p.auth.withholding_reason`; otherwise the token is fetched anonymously, with a warning), and a
   token request carrying them follows redirects within the realm's origin only.
2. **Retries.** Transport errors (connect, read, write, timeouts, a body cut short), ``5xx`` and ``429``
   are retried within the `RetryPolicy` (count and time). A body failure inside the consumer is retried
   too, because the consumer runs inside the loop. Non-idempotent requests (an upload ``PATCH``/``PUT``)
   are retried only where the request cannot have been applied: a connect failure, or ``429``.
   Under a caller's deadline (`p2p.deadline`) every attempt's timeouts are cut to what is left of it,
   and no attempt or backoff starts past it (`_time_left`).
3. **Mapping.** Every ``httpx`` exception ends here as a `p2p.errors` class naming the URL.

The consumer gets the response and the attempt's `Deadline`; it must read the body with `read_body` or
`iter_body`, which check it at every network read, so that a trickling server is cut off in bounded time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from . import deadline as read_deadline
from .auth import (
    Challenge,
    CredentialProvider,
    Credentials,
    Token,
    TokenCache,
    origin_text,
    parse_token_response,
    parse_www_authenticate,
    same_origin,
    token_request,
    withholding_reason,
)
from .errors import (
    AuthError,
    DeadlineExceededError,
    NotFoundError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnavailableError,
)
from .retry import RETRY_STATUSES, Deadline, RetryPolicy, Timeouts, parse_retry_after

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "damselfly/0.1 (+registry client)"
#: Error bodies and token answers larger than this are not read.
MAX_SMALL_BODY = 1024 * 1024
#: An attempt under a caller's deadline ends this long before it, so that the attempt's own timeout,
#: with its cause, is what the caller sees (and the upstream's breaker learns of), not a bare expiry.
DEADLINE_MARGIN = 0.2
#: Same-origin redirects a token request carrying credentials may follow (httpx's own limit is 20).
MAX_TOKEN_REDIRECTS = 5
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
WITHHELD_REMEDY = (
    "serve the token realm over HTTPS (or from the registry's own origin) so the credentials may go to it"
)


class TransientError(Exception):
    """Raised inside the retry loop (by the session or a consumer) for a failure worth retrying."""

    def __init__(self, cause: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Endpoint:
    """Where requests go: ``scheme://host[:port]`` and the host name credentials are looked up under."""

    base_url: str
    host: str
    is_mirror: bool = False
    params: Mapping[str, str] = field(default_factory=dict)  # extra query parameters (a mirror's ``ns``)

    @property
    def origin_url(self) -> httpx.URL:
        return httpx.URL(self.base_url)

    def url(self, path: str) -> httpx.URL:
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


class Session:
    """Sends requests to one registry's endpoints with auth, retries and timeouts (see module docstring)."""

    def __init__(
        self,
        http: httpx.Client,
        credentials: CredentialProvider,
        retry: RetryPolicy,
        timeouts: Timeouts,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        proxy: str | None = None,
    ) -> None:
        self.http = http
        self.proxy = proxy  # only to say so in messages: httpx routes through it
        self.credentials = credentials
        self.retry = retry
        self.timeouts = timeouts
        self.clock = clock
        self.sleep = sleep
        self.tokens = TokenCache(clock)
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}  # host -> the scheme it asked for last
        self._warned: set[tuple[str, str]] = set()  # (host, realm) whose withheld credentials were logged
        self.token_requests = 0  # how many tokens were fetched (tests and metrics)

    # -- auth ------------------------------------------------------------------------------------

    def _creds(self, host: str) -> Credentials | None:
        return self.credentials(host)

    def _authorization(self, endpoint: Endpoint, scopes: list[str], renew: bool) -> str | None:
        """The Authorization header for a request to `endpoint`; with `renew`, never a cached token."""
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds(endpoint.host)
            if creds is None or creds.identity_token:
                raise AuthError(
                    str(endpoint.url("/v2/")),
                    f"registry requires basic authentication; no credentials for {endpoint.host}",
                    401,
                )
            return creds.basic_header()
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(str(endpoint.url("/v2/")), "bearer challenge without a realm", 401)
        service = challenge.params.get("service", "")
        key = TokenCache.key(realm, service, scopes)
        if not renew:
            cached = self.tokens.get(key)
            if cached is not None:
                return f"Bearer {cached}"
        all_scopes = sorted(set(scopes) | set(challenge.scopes))
        token = self._fetch_token(endpoint, realm, service, all_scopes)
        self.tokens.put(key, token)
        return f"Bearer {token.value}"

    def _withheld(self, endpoint: Endpoint) -> tuple[str, str] | None:
        """(realm, reason) if the endpoint's bearer realm may not have its credentials, else None."""
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
        realm = challenge.params.get("realm") if challenge is not None else None
        if challenge is None or challenge.scheme != "bearer" or not realm:
            return None
        try:
            reason = withholding_reason(endpoint.origin_url, httpx.URL(realm))
        except httpx.InvalidURL:
            reason = f"the realm {realm!r} is not a valid URL"
        return None if reason is None else (realm, reason)

    def _fetch_token(self, endpoint: Endpoint, realm: str, service: str, scopes: list[str]) -> Token:
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL as e:
            raise RegistryProtocolError(
                str(endpoint.url("/v2/")), f"bearer challenge with an unusable realm {realm!r}: {e}"
            ) from None
        creds = self._creds(endpoint.host)
        withheld = withholding_reason(endpoint.origin_url, realm_url) if creds is not None else None
        if withheld is not None:
            with self._lock:
                first = (endpoint.host, realm) not in self._warned
                self._warned.add((endpoint.host, realm))
            if first:
                log.warning(
                    "not sending the credentials for %s to the token realm %s: %s; asking for an "
                    "anonymous token instead; to use them, %s",
                    endpoint.host,
                    realm,
                    withheld,
                    WITHHELD_REMEDY,
                )
            creds = None
        request = token_request(realm_url, service, scopes, creds)
        with self._lock:
            self.token_requests += 1

        def consume(resp: httpx.Response, deadline: Deadline) -> Token | tuple[int, httpx.URL]:
            if resp.status_code in _REDIRECT_STATUSES:  # only asked for when carrying credentials
                location = resp.headers.get("location")
                if not location:
                    raise RegistryProtocolError(
                        str(resp.url), f"token: HTTP {resp.status_code} without a Location header"
                    )
                return resp.status_code, resp.url.join(location)
            body = read_body(resp, deadline, MAX_SMALL_BODY, str(resp.url))
            return parse_token_response(body, str(resp.url), self.clock())

        # With credentials, redirects are followed here, one by one, and only within the realm's origin:
        # httpx would keep a POST body (the refresh token) on a 307/308 to any host. An anonymous request
        # has nothing to lose and lets httpx follow wherever the token service lives.
        for _ in range(MAX_TOKEN_REDIRECTS + 1):
            secret = request.carries_credentials
            try:
                answer = self.call(
                    request.method,
                    endpoint,
                    request.url,
                    consume,
                    headers=request.headers,
                    content=request.content,
                    ok=(200, *_REDIRECT_STATUSES) if secret else (200,),
                    authenticate=False,
                    follow_redirects=not secret,
                    what="token",
                )
            except AuthError as e:
                raise self._token_refused(endpoint, request.url, creds, scopes, withheld, e) from None
            if isinstance(answer, Token):
                return answer
            status, target = answer
            if not same_origin(target, realm_url):
                raise AuthError(
                    str(request.url),
                    f"token server answered the request carrying the credentials for {endpoint.host} with "
                    f"HTTP {status} to another origin ({origin_text(target)}); not followed, so that the "
                    f"credentials go nowhere but {origin_text(realm_url)}",
                    remedy="make the registry's token realm (its WWW-Authenticate challenge) name the URL "
                    "that issues tokens, or have the token server redirect within its own origin",
                )
            request = request.redirected(status, target)
        raise RegistryProtocolError(str(request.url), f"token: more than {MAX_TOKEN_REDIRECTS} redirects")

    @staticmethod
    def _token_refused(
        endpoint: Endpoint,
        url: httpx.URL,
        creds: Credentials | None,
        scopes: list[str],
        withheld: str | None,
        e: AuthError,
    ) -> AuthError:
        who = (
            "anonymous access"
            if creds is None
            else f"the credentials of {creds.username or 'identity token'}"
        )
        why = f"token server refused {who} for scope {' '.join(scopes) or '(none)'}"
        if withheld is None:
            return AuthError(str(url), why, e.status)
        why += f"; the credentials for {endpoint.host} were withheld from this token realm: {withheld}"
        return AuthError(str(url), why, e.status, WITHHELD_REMEDY)

    def _learn_challenge(self, endpoint: Endpoint, resp: httpx.Response) -> None:
        challenges = parse_www_authenticate(resp.headers.get_list("www-authenticate"))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise AuthError(
                str(resp.url),
                "401 without a usable WWW-Authenticate challenge"
                + (f" (got {challenges[0].scheme!r})" if challenges else ""),
                401,
            )
        # Prefer bearer: it is what registries mean when they offer both.
        usable.sort(key=lambda c: c.scheme != "bearer")
        with self._lock:
            self._challenges[endpoint.host] = usable[0]

    # -- the loop --------------------------------------------------------------------------------

    def call(
        self,
        method: str,
        endpoint: Endpoint,
        url: httpx.URL,
        consume: Consumer[T],
        *,
        scopes: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        ok: Iterable[int] = (200,),
        idempotent: bool = True,
        authenticate: bool = True,
        follow_redirects: bool = False,
        what: str = "resource",
        retry: RetryPolicy | None = None,
    ) -> T:
        """Send `method url` and return ``consume(response, deadline)`` for a status in `ok`.

        `what` names the thing for error messages ("manifest", "blob sha256:…"); `retry` overrides the
        session's policy for this call.
        """
        policy = retry or self.retry
        ok = frozenset(ok)
        scopes = scopes or []
        start = self.clock()
        attempt = 0
        auth_rounds = 0
        renew = False
        where = str(url)
        # Credentials only for the endpoint's own origin (an upload Location may name another host).
        authenticate_here = authenticate and same_origin(url, endpoint.origin_url)
        failure: TransientError | None = None
        while True:
            attempt += 1
            cap = self._time_left(where, what, failure, attempt, start)
            send_headers = {"user-agent": USER_AGENT, **(headers or {})}
            if authenticate_here:
                auth = self._authorization(endpoint, scopes, renew)
                renew = False
                if auth is not None:
                    send_headers["authorization"] = auth
            deadline = Deadline.starting_now(self.timeouts, self.clock, read_deadline.current())
            try:
                request = self.http.build_request(
                    method, url, headers=send_headers, content=content, timeout=self.timeouts.httpx(cap)
                )
                resp = self.http.send(request, stream=True, follow_redirects=follow_redirects)
                try:
                    status = resp.status_code
                    if status == 401 and authenticate:
                        body = read_error_body(resp)
                        if not same_origin(resp.url, endpoint.origin_url):
                            raise self._foreign_refusal(endpoint, resp, body, what)
                        if auth_rounds >= 1:
                            raise self._refused(endpoint, resp, body, what)
                        # Learn how to authenticate (or renew a token the registry no longer takes) and
                        # repeat — once: a second 401 in this call is final.
                        auth_rounds += 1
                        self._learn_challenge(endpoint, resp)
                        renew = True
                        attempt -= 1  # an auth round trip is not a failed attempt
                        continue
                    if status in RETRY_STATUSES and (idempotent or status == 429):
                        detail = error_detail(read_error_body(resp))
                        raise TransientError(
                            f"HTTP {status}" + (f" ({detail})" if detail else ""),
                            status,
                            parse_retry_after(resp.headers.get("retry-after")),
                        )
                    if status not in ok:
                        raise self.status_error(resp, read_error_body(resp), what)
                    return consume(resp, deadline)
                finally:
                    resp.close()
            except TransientError as e:
                failure = e
            except (httpx.TooManyRedirects, httpx.UnsupportedProtocol) as e:
                raise RegistryProtocolError(where, f"{what}: {e}") from None
            except httpx.TransportError as e:
                cause = describe_transport_error(e)
                if self.proxy is not None and isinstance(e, httpx.ConnectError | httpx.ProxyError):
                    cause += f" (through the HTTP proxy {self.proxy}: check it too)"
                never_sent = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
                if not idempotent and not never_sent:
                    raise RegistryUnavailableError(
                        where,
                        cause + " (not retried: the request may have been applied)",
                        attempt,
                        self.clock() - start,
                    ) from None
                failure = TransientError(cause)
            except httpx.HTTPError as e:
                raise RegistryError(f"{where}: {what}: {type(e).__name__}: {e}", where) from None
            self._backoff(policy, failure, attempt, start, where)

    def _refused(self, endpoint: Endpoint, resp: httpx.Response, body: bytes, what: str) -> AuthError:
        detail = error_detail(body)
        suffix = f" ({detail})" if detail else ""
        remedy = ""
        if self._creds(endpoint.host) is None:
            why = (
                f"{what}: registry requires authentication and no credentials were found for {endpoint.host}"
            )
        elif (withheld := self._withheld(endpoint)) is not None:
            realm, reason = withheld
            why = (
                f"{what}: registry refused the anonymous token; the credentials for {endpoint.host} were "
                f"withheld from the token realm {realm}: {reason}"
            )
            remedy = WITHHELD_REMEDY
        else:
            why = f"{what}: registry refused the credentials for {endpoint.host}"
        return AuthError(str(resp.url), why + suffix, 401, remedy)

    @staticmethod
    def _foreign_refusal(endpoint: Endpoint, resp: httpx.Response, body: bytes, what: str) -> AuthError:
        """A 401 from another origin than the endpoint's (a redirect target, an upload location): final."""
        detail = error_detail(body)
        return AuthError(
            str(resp.url),
            f"{what}: {origin_text(resp.url)}, not the registry endpoint {origin_text(endpoint.origin_url)}, "
            f"asks for authentication (HTTP 401{': ' + detail if detail else ''}); the credentials for "
            f"{endpoint.host} go only to the endpoint's own origin, so it gets none",
            401,
            "the registry must send blobs and uploads to a place that takes the request as it is "
            "(a pre-signed URL), or serve them itself",
        )

    def _time_left(
        self, where: str, what: str, failure: TransientError | None, attempt: int, start: float
    ) -> float | None:
        """Seconds the next attempt may take under the caller's deadline (`p2p.deadline`), less a margin
        so that the attempt fails — and says why — just before the caller gives up; None: no deadline.

        No time left: `DeadlineExceededError` if nothing was tried yet (the registry is not to blame),
        else `RegistryUnavailableError` with the last failure's cause."""
        left = read_deadline.remaining()
        if left is None:
            return None
        if left > DEADLINE_MARGIN:
            return left - DEADLINE_MARGIN
        if failure is None:
            raise DeadlineExceededError(f"{what} at {where}")
        raise RegistryUnavailableError(
            where,
            failure.cause + "; the read's deadline came",
            attempt - 1,
            self.clock() - start,
            failure.status,
        )

    def _backoff(
        self, policy: RetryPolicy, failure: TransientError, attempt: int, start: float, where: str
    ) -> None:
        """Sleep before the next attempt, or raise `RegistryUnavailableError` if the budget is spent."""
        elapsed = self.clock() - start
        if attempt >= policy.attempts:
            raise RegistryUnavailableError(where, failure.cause, attempt, elapsed, failure.status)
        delay = failure.retry_after if failure.retry_after is not None else policy.backoff(attempt - 1)
        left = read_deadline.remaining()
        if left is not None and delay >= left - DEADLINE_MARGIN:
            raise RegistryUnavailableError(
                where, failure.cause + "; no time for a retry before the read's deadline", attempt, elapsed
            )
        if elapsed + delay > policy.budget:
            cause = failure.cause
            if failure.retry_after is not None:
                cause += f"; server asked to retry after {failure.retry_after:.0f}s, past the retry budget"
            raise RegistryUnavailableError(where, cause, attempt, elapsed, failure.status)
        log.info("%s: %s; retry %d in %.2fs", where, failure.cause, attempt, delay)
        self.sleep(delay)

    @staticmethod
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
