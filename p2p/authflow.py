"""The credential and token flow of a registry session (Docker token auth, RFC 6750 bearer, RFC 7617 basic).

What a `p2p.session.Session` asks before and after each request:

- `authorization`: the ``Authorization`` header for a request to an endpoint — none until the endpoint
  asked (a ``401``); then basic credentials, or a bearer token from the realm the challenge named
  (cached per realm, service and scopes; with ``renew`` a fresh one), or the registry token the
  credentials carry (sent as it is). Credentials are looked up for the repository the request's scope
  names (`p2p.auth.lookup_credentials`) at every request, never kept here: a provider whose answer
  changes (a config.json edited, a CRI pull's credentials) is heeded at the next request.
- `learn_challenge`: on a ``401`` from the endpoint's own origin, the ``WWW-Authenticate`` challenge to
  answer next time (bearer preferred).
- `refused` / `foreign_refusal`: the `AuthError` for a second ``401``, or for one from another origin.

Credentials stay with their owner. The token realm gets the endpoint's credentials only over HTTPS or on
the endpoint's own origin (`p2p.auth.withholding_reason`; otherwise the token is fetched anonymously,
with one warning per realm), and a token request that carries them follows redirects one by one and
only within the realm's origin (httpx would keep a POST body on a 307/308 to any host). Token requests
go through the session's own retry loop (`Call`), without authentication.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

import httpx

from .auth import (
    Challenge,
    CredentialProvider,
    Credentials,
    Token,
    TokenCache,
    lookup_credentials,
    origin_text,
    parse_token_response,
    parse_www_authenticate,
    same_origin,
    scope_repository,
    token_request,
    withholding_reason,
)
from .errors import AuthError, RegistryProtocolError
from .retry import Deadline
from .wire import MAX_SMALL_BODY, Consumer, Endpoint, error_detail, read_body

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Same-origin redirects a token request carrying credentials may follow (httpx's own limit is 20).
MAX_TOKEN_REDIRECTS = 5
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
WITHHELD_REMEDY = (
    "serve the token realm over HTTPS (or from the registry's own origin) so the credentials may go to it"
)


class Call(Protocol):
    """The session's request loop (`p2p.session.Session.call`), as the token flow uses it."""

    def __call__(
        self,
        method: str,
        endpoint: Endpoint,
        url: httpx.URL,
        consume: Consumer[T],
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        ok: Iterable[int] = (200,),
        authenticate: bool = True,
        follow_redirects: bool = False,
        what: str = "resource",
    ) -> T: ...


class AuthFlow:
    """How one session authenticates to its registry's endpoints (see the module docstring)."""

    def __init__(self, credentials: CredentialProvider, clock: Callable[[], float], call: Call) -> None:
        self.credentials = credentials
        self.clock = clock
        self._call = call
        self.tokens = TokenCache(clock)
        self._lock = threading.Lock()
        self._challenges: dict[str, Challenge] = {}  # host -> the scheme it asked for last
        self._warned: set[tuple[str, str]] = set()  # (host, realm) whose withheld credentials were logged
        self.token_requests = 0  # how many tokens were fetched (tests and metrics)

    def _creds(self, host: str, scopes: list[str]) -> Credentials | None:
        return lookup_credentials(self.credentials, host, scope_repository(scopes))

    def authorization(self, endpoint: Endpoint, scopes: list[str], renew: bool) -> str | None:
        """The Authorization header for a request to `endpoint`; with `renew`, never a cached token."""
        with self._lock:
            challenge = self._challenges.get(endpoint.host)
        if challenge is None:
            return None
        creds = self._creds(endpoint.host, scopes)
        if challenge.scheme == "basic":
            if creds is None or not (creds.username or creds.password):
                what = "no credentials" if creds is None else "no user name and password in the credentials"
                raise AuthError(
                    str(endpoint.url("/v2/")),
                    f"registry requires basic authentication; {what} for {endpoint.host}",
                    401,
                )
            return creds.basic_header()
        if creds is not None and creds.registry_token:
            # A registry token is the bearer token itself (Docker's AuthConfig.RegistryToken): no token
            # server is asked, and nothing is cached — it is the provider's to renew.
            return f"Bearer {creds.registry_token}"
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
        token = self._fetch_token(endpoint, realm, service, all_scopes, creds)
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

    def _fetch_token(
        self, endpoint: Endpoint, realm: str, service: str, scopes: list[str], creds: Credentials | None
    ) -> Token:
        try:
            realm_url = httpx.URL(realm)
        except httpx.InvalidURL as e:
            raise RegistryProtocolError(
                str(endpoint.url("/v2/")), f"bearer challenge with an unusable realm {realm!r}: {e}"
            ) from None
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
                answer = self._call(
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
        who = "anonymous access" if creds is None else creds.describe()
        why = f"token server refused {who} for scope {' '.join(scopes) or '(none)'}"
        if withheld is None:
            return AuthError(str(url), why, e.status)
        why += f"; the credentials for {endpoint.host} were withheld from this token realm: {withheld}"
        return AuthError(str(url), why, e.status, WITHHELD_REMEDY)

    def learn_challenge(self, endpoint: Endpoint, resp: httpx.Response) -> None:
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

    def refused(
        self, endpoint: Endpoint, resp: httpx.Response, body: bytes, what: str, scopes: list[str]
    ) -> AuthError:
        detail = error_detail(body)
        suffix = f" ({detail})" if detail else ""
        remedy = ""
        creds = self._creds(endpoint.host, scopes)
        if creds is None:
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
        elif creds.registry_token and not (creds.username or creds.identity_token):
            why = f"{what}: registry refused the registry token for {endpoint.host}"
        else:
            why = f"{what}: registry refused the credentials for {endpoint.host}"
        return AuthError(str(resp.url), why + suffix, 401, remedy)

    @staticmethod
    def foreign_refusal(endpoint: Endpoint, resp: httpx.Response, body: bytes, what: str) -> AuthError:
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
