"""One authenticated, retrying conversation with a registry endpoint: the policy layer under `RegistryClient`.

`Session.call` sends one logical request and hands the response to a *consumer* that reads the body.
Around it, in this order:

1. **Auth** (`p2p.authflow`). If the endpoint is known to want a bearer token (or basic credentials)
   the header is added before sending. On ``401`` the ``WWW-Authenticate`` challenge is parsed, a token
   fetched (or basic credentials looked up) and the request repeated — once per call: a second 401 is an
   `AuthError`. That one renewal also covers a cached token the registry no longer accepts.
   Credentials stay with their owner: an ``Authorization`` header is added only to requests for the
   endpoint's own origin (scheme, host, port), and a ``401`` from any other origin (a redirect target,
   a foreign upload location) is final — its challenge is not answered with this registry's
   credentials. What the token realm may get is `p2p.authflow`'s business.
2. **Retries.** Transport errors (connect, read, write, timeouts, a body cut short), ``5xx`` and ``429``
   are retried within the `RetryPolicy` (count and time). A body failure inside the consumer is retried
   too, because the consumer runs inside the loop. Non-idempotent requests (an upload ``PATCH``/``PUT``)
   are retried only where the request cannot have been applied: a connect failure, or ``429``.
   Under a caller's deadline (`p2p.deadline`) every attempt's timeouts are cut to what is left of it,
   and no attempt or backoff starts past it (`_time_left`).
3. **Mapping.** Every ``httpx`` exception ends here as a `p2p.errors` class naming the URL.

The consumer gets the response and the attempt's `Deadline`; it must read the body with
`p2p.wire.read_body` or `iter_body`, which check it at every network read, so that a trickling server is
cut off in bounded time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import httpx

from . import deadline as read_deadline
from .auth import CredentialProvider, TokenCache, origin_text, same_origin
from .authflow import AuthFlow
from .errors import (
    DeadlineExceededError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnavailableError,
    TLSVerifyError,
)
from .retry import RETRY_STATUSES, Deadline, RetryPolicy, Timeouts, parse_retry_after
from .wire import (
    USER_AGENT,
    Consumer,
    Endpoint,
    TransientError,
    describe_transport_error,
    error_detail,
    read_error_body,
    status_error,
    tls_verify_failure,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: An attempt under a caller's deadline ends this long before it, so that the attempt's own timeout,
#: with its cause, is what the caller sees (and the upstream's breaker learns of), not a bare expiry.
DEADLINE_MARGIN = 0.2


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
        self.retry = retry
        self.timeouts = timeouts
        self.clock = clock
        self.sleep = sleep
        self.auth = AuthFlow(credentials, clock, self.call)

    @property
    def tokens(self) -> TokenCache:
        return self.auth.tokens

    @property
    def token_requests(self) -> int:
        """How many tokens were fetched (tests and metrics)."""
        return self.auth.token_requests

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
            send_headers = {"user-agent": USER_AGENT}
            if endpoint.headers and same_origin(url, endpoint.origin_url):  # hosts.toml's, not a realm's
                send_headers.update(endpoint.headers)
            send_headers.update(headers or {})
            if authenticate_here:
                auth = self.auth.authorization(endpoint, scopes, renew)
                renew = False
                if auth is not None:
                    send_headers["authorization"] = auth
            deadline = Deadline.starting_now(self.timeouts, self.clock, read_deadline.current())
            try:
                http = endpoint.http or self.http
                request = http.build_request(
                    method, url, headers=send_headers, content=content, timeout=self.timeouts.httpx(cap)
                )
                resp = http.send(request, stream=True, follow_redirects=follow_redirects)
                try:
                    status = resp.status_code
                    if status == 401 and authenticate:
                        body = read_error_body(resp)
                        if not same_origin(resp.url, endpoint.origin_url):
                            raise self.auth.foreign_refusal(endpoint, resp, body, what)
                        if auth_rounds >= 1:
                            raise self.auth.refused(endpoint, resp, body, what, scopes)
                        # Learn how to authenticate (or renew a token the registry no longer takes) and
                        # repeat — once: a second 401 in this call is final.
                        auth_rounds += 1
                        self.auth.learn_challenge(endpoint, resp)
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
                        raise status_error(resp, read_error_body(resp), what)
                    return consume(resp, deadline)
                finally:
                    resp.close()
            except TransientError as e:
                failure = e
            except (httpx.TooManyRedirects, httpx.UnsupportedProtocol) as e:
                raise RegistryProtocolError(where, f"{what}: {e}") from None
            except httpx.TransportError as e:
                verify = tls_verify_failure(e)
                if verify is not None:  # not transient: no retry can make the certificate verify
                    failed = e.request.url if _has_request(e) else url
                    raise TLSVerifyError(
                        str(failed), origin_text(failed), verify, endpoint.hint or "the registry's hosts.toml"
                    ) from None
                cause = describe_transport_error(e)
                proxy = endpoint.proxy or self.proxy
                if proxy is not None and isinstance(e, httpx.ConnectError | httpx.ProxyError):
                    cause += f" (through the HTTP proxy {proxy}: check it too)"
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


def _has_request(e: httpx.TransportError) -> bool:
    try:
        _ = e.request  # raises when the error has none
    except RuntimeError:
        return False
    return True
