"""Registry authentication: credentials, ``WWW-Authenticate`` challenges, and the bearer-token cache.

The flow (distribution's "Token Authentication Specification", and RFC 7235 for the header syntax):

1. A request without credentials gets ``401`` and ``WWW-Authenticate: Bearer realm="…",service="…",
   scope="repository:foo:pull"`` (or ``Basic realm="…"``).
2. For Bearer, the client GETs ``realm?service=…&scope=…`` — with HTTP basic credentials if it has some,
   anonymously otherwise — and gets ``{"token": …, "expires_in": …}``. With an identity token (what
   ``docker login`` stores for OAuth registries) it POSTs ``grant_type=refresh_token`` instead.
3. It repeats the request with ``Authorization: Bearer <token>``, and caches the token per
   (realm, service, scopes) until shortly before it expires.

Where credentials may go (`withholding_reason`): the realm is whatever URL the registry's challenge names,
so the registry's credentials (basic header or refresh token) go to it only if it is served over HTTPS or
from the registry endpoint's own origin (scheme, host and port; RFC 6454). Any other realm gets an
anonymous token request. A token request that carries credentials never follows a redirect to another
origin, and basic credentials go only to the endpoint's own origin (`p2p.session`).

Credentials come from a `CredentialProvider`: a callable from registry host to `Credentials`. `DockerConfig`
reads Docker's ``config.json`` (``auths`` with a base64 ``auth`` or ``username``/``password``, and
``identitytoken``; ``credHelpers``/``credsStore`` through ``docker-credential-*`` programs);
`DockerConfigFile` is the provider a long-lived client uses: it reads the file again when it changed (a
``docker login`` while the node runs). A provider may answer per repository too (`RepositoryProvider`:
the credentials a kubelet sent with a CRI ``PullImage`` are for that image, `p2p.keychain`);
`lookup_credentials` asks it that way when the request names a repository.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx

from .errors import AuthError, CredentialsError

#: A token is treated as expired this long before the server says, so it does not expire in flight.
TOKEN_EXPIRY_MARGIN = 10.0
#: Token lifetime when the server does not say (the token spec's default).
DEFAULT_TOKEN_LIFETIME = 60.0
#: How long a credential helper may take.
HELPER_TIMEOUT = 10.0


@dataclass(frozen=True)
class Credentials:
    """A user name and password, or an identity (refresh) token for the OAuth2 flow, or a registry token:
    a bearer token sent to the registry as it is (a CRI ``AuthConfig.registry_token``), no token server
    asked. No field but the user name is ever in a repr, a log line or a message."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """What these credentials are, for logs (not even the user name)."""
        if self.username or self.password:
            return "user name and password"
        return "identity token" if self.identity_token else "registry token"

    def describe(self) -> str:
        """Which kind of credentials these are, for messages (no secret)."""
        if self.username:
            return f"the credentials of {self.username}"
        if self.identity_token:
            return "the identity token"
        return "the registry token" if self.registry_token else "empty credentials"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


CredentialProvider = Callable[[str], "Credentials | None"]


@runtime_checkable
class RepositoryProvider(Protocol):
    """A `CredentialProvider` that may also answer for one repository of a host (`lookup_credentials`)."""

    def __call__(self, host: str) -> Credentials | None: ...

    def for_repository(self, host: str, repository: str) -> Credentials | None: ...


def lookup_credentials(provider: CredentialProvider, host: str, repository: str | None) -> Credentials | None:
    """The credentials `provider` has for `repository` on `host` (per repository where it can tell), else
    for `host`."""
    if repository is not None and isinstance(provider, RepositoryProvider):
        return provider.for_repository(host, repository)
    return provider(host)


def scope_repository(scopes: list[str]) -> str | None:
    """The repository the first ``repository:<name>:<actions>`` scope names (what a request is for)."""
    for scope in scopes:
        kind, _, rest = scope.partition(":")
        name, sep, _actions = rest.rpartition(":")
        if kind == "repository" and sep and name:
            return name
    return None


def normalize_host(key: str) -> str:
    """The registry host a config key or host names: no scheme, no path; Docker Hub aliases unified."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip()).split("/", 1)[0].lower()
    if host in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
        return "docker.io"
    return host


def static_credentials(mapping: Mapping[str, Credentials]) -> CredentialProvider:
    """A provider from a ``{host: Credentials}`` mapping (hosts normalised like config.json keys)."""
    table = {normalize_host(k): v for k, v in mapping.items()}

    def lookup(host: str) -> Credentials | None:
        return table.get(normalize_host(host))

    return lookup


class ProviderChain:
    """Providers asked in order; the first that has credentials wins (per repository where one can tell:
    `RepositoryProvider`)."""

    def __init__(self, *providers: CredentialProvider) -> None:
        self.providers = providers

    def __call__(self, host: str) -> Credentials | None:
        return self.for_repository(host, None)

    def for_repository(self, host: str, repository: str | None) -> Credentials | None:
        for p in self.providers:
            c = lookup_credentials(p, host, repository)
            if c is not None:
                return c
        return None


def chain_providers(*providers: CredentialProvider) -> CredentialProvider:
    """The first provider that has credentials for a host (or repository) wins."""
    return ProviderChain(*providers)


def default_docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (Docker's own rule)."""
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


class DockerConfig:
    """Credentials from a Docker ``config.json``; callable as a `CredentialProvider`."""

    def __init__(
        self,
        path: Path,
        auths: Mapping[str, Credentials],
        helpers: Mapping[str, str],
        default_helper: str | None,
    ) -> None:
        self.path = path
        self._auths = {normalize_host(k): v for k, v in auths.items()}
        self._helpers = {normalize_host(k): v for k, v in helpers.items()}
        self._default_helper = default_helper
        # Helper hosts keep their original spelling: helpers match the server URL they were given.
        self._helper_keys = {normalize_host(k): k for k in helpers}

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> DockerConfig:
        """Read `path` (default: `default_docker_config_path`); a missing file means no credentials."""
        p = Path(path) if path is not None else default_docker_config_path()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(p, {}, {}, None)
        except OSError as e:
            raise CredentialsError(str(p), f"cannot read Docker config: {e.strerror or e}") from None
        return cls.parse(text, p)

    @classmethod
    def parse(cls, text: str, path: Path) -> DockerConfig:
        where = str(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise CredentialsError(where, f"not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(doc, dict):
            raise CredentialsError(where, "the top level is not a JSON object")
        auths: dict[str, Credentials] = {}
        raw_auths = doc.get("auths", {})
        if not isinstance(raw_auths, dict):
            raise CredentialsError(where, '"auths" is not an object')
        for key, entry in raw_auths.items():
            creds = _parse_auth_entry(f"{where}: auths[{key!r}]", entry)
            if creds is not None:
                auths[key] = creds
        helpers = doc.get("credHelpers", {})
        if not isinstance(helpers, dict) or not all(isinstance(v, str) for v in helpers.values()):
            raise CredentialsError(where, '"credHelpers" is not an object of strings')
        store = doc.get("credsStore")
        if store is not None and not isinstance(store, str):
            raise CredentialsError(where, '"credsStore" is not a string')
        return cls(path, auths, helpers, store or None)

    def __call__(self, host: str) -> Credentials | None:
        key = normalize_host(host)
        helper = self._helpers.get(key)
        if helper is not None:
            return run_credential_helper(helper, self._helper_keys[key])
        creds = self._auths.get(key)
        if creds is not None:
            return creds
        if self._default_helper is not None:
            server = "https://index.docker.io/v1/" if key == "docker.io" else host
            return run_credential_helper(self._default_helper, server)
        return None


class DockerConfigFile:
    """A Docker ``config.json`` that is read again whenever it changes; callable as a `CredentialProvider`.

    A registry client lives as long as the node's daemon, while an operator may ``docker login`` (or a
    credential helper's configuration may change) at any time. Each lookup compares the file's identity
    — device, inode, size, modification time in nanoseconds: one ``stat``, no read — with the one it
    parsed last, and parses it again when any differs (an editor's or ``docker login``'s rename gives
    a new inode; an in-place write a new size or time). A missing file means no credentials, and a file
    that appears later is read then. A file that does not parse raises `CredentialsError` at that lookup
    and is tried again at the next (it may have been caught mid-write). Credential helpers are run at
    every lookup, as before: they hold their own state.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_docker_config_path()
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int, int] | None = None
        self._config = DockerConfig(self.path, {}, {}, None)
        self.loads = 0  # how many times the file was parsed (tests)

    def current(self) -> DockerConfig:
        """The file's credentials as they are now (parsed again only if the file changed)."""
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int, int] | None = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        except OSError as e:
            raise CredentialsError(str(self.path), f"cannot read Docker config: {e.strerror or e}") from None
        with self._lock:
            if seen == self._seen:
                return self._config
            config = DockerConfig.load(self.path)  # gone meanwhile: no credentials
            self._config, self._seen = config, seen
            self.loads += 1
            return config

    def __call__(self, host: str) -> Credentials | None:
        return self.current()(host)


def _parse_auth_entry(where: str, entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        raise CredentialsError(where, "entry is not an object")
    identity = entry.get("identitytoken") or None
    username, password = entry.get("username", ""), entry.get("password", "")
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise CredentialsError(where, '"auth" is not a string')
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(
                where, '"auth" is not base64 of "user:password"', "run docker login again"
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(
                where, '"auth" decodes to no "user:password" pair', "run docker login again"
            )
    if not all(isinstance(v, str) for v in (username, password)) or not (
        identity is None or isinstance(identity, str)
    ):
        raise CredentialsError(where, "username, password and identitytoken must be strings")
    if not (username or password or identity):
        return None  # an empty entry (credsStore writes these) means "no credentials here"
    return Credentials(username, password, identity)


def run_credential_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-<helper> get`` for `server`; None when it has nothing for it."""
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise CredentialsError(
            program, "credential helper not found in PATH", "install it or fix the config"
        ) from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(program, f"no answer within {HELPER_TIMEOUT:.0f}s for {server}") from None
    if proc.returncode != 0:
        message = proc.stdout.decode(errors="replace").strip() or proc.stderr.decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        raise CredentialsError(program, f"failed for {server}: {message or f'exit {proc.returncode}'}")
    try:
        doc = json.loads(proc.stdout)
        username, secret = doc["Username"], doc["Secret"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CredentialsError(
            program, f"answered {server} with something other than Username/Secret JSON"
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise CredentialsError(program, "Username and Secret must be strings")
    if username == "<token>":  # Docker's marker for an identity token
        return Credentials(identity_token=secret)
    return Credentials(username, secret)


# -- challenges ----------------------------------------------------------------------------------

# RFC 7235: challenge = auth-scheme [ 1*SP ( token68 / #auth-param ) ]; auth-param = token BWS "=" BWS
# ( token / quoted-string ). Several challenges may share one header, separated by commas.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(?:,|$)')
_SCHEME_RE = re.compile(rf"\s*({_TOKEN})(?:\s+|$)")


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: the scheme (lowercase) and its parameters (keys lowercase)."""

    scheme: str
    params: Mapping[str, str]

    @property
    def scopes(self) -> list[str]:
        scope = self.params.get("scope", "")
        return scope.split() if scope else []


def parse_www_authenticate(values: list[str]) -> list[Challenge]:
    """Parse every challenge in the given header values; unparsable trailing text is ignored."""
    out: list[Challenge] = []
    for value in values:
        pos = 0
        while pos < len(value):
            m = _SCHEME_RE.match(value, pos)
            if m is None:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            while True:
                p = _PARAM_RE.match(value, pos)
                if p is None:
                    break
                quoted, bare = p.group(2), p.group(3)
                params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
                pos = p.end()
            out.append(Challenge(scheme, params))
            while pos < len(value) and value[pos] in ", ":
                pos += 1
    return out


def repository_scope(repository: str, actions: str) -> str:
    """``repository:<name>:<actions>`` as the token spec spells it (actions: ``pull`` or ``pull,push``)."""
    return f"repository:{repository}:{actions}"


# -- where credentials may go --------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """RFC 6454's origin of `url`: (scheme, host, port), with the scheme's default port filled in."""
    return url.scheme, url.host, url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return origin(a) == origin(b)


def origin_text(url: httpx.URL) -> str:
    """``scheme://host[:port]`` of `url`, for messages."""
    return f"{url.scheme}://{url.netloc.decode('ascii')}"


def withholding_reason(registry: httpx.URL, realm: httpx.URL) -> str | None:
    """Why the registry's credentials must not be sent to the token `realm`, or None if they may.

    A realm over HTTPS may have them whatever its host: the registry names its token service (Docker Hub's
    is auth.docker.io), and TLS keeps them from everyone else on the way. So may the registry's own origin
    (a loopback registry over plain HTTP that serves its tokens itself): they go there anyway. Anything
    else would put them in clear text on a connection to a host only the challenge named.
    """
    if realm.scheme == "https" or same_origin(registry, realm):
        return None
    if realm.scheme != "http":
        return f"the realm {str(realm)!r} is not an https:// URL"
    if registry.scheme == "https":
        return f"the realm is plain HTTP while the registry {origin_text(registry)} is HTTPS (a downgrade)"
    return (
        f"the realm is plain HTTP on another origin ({origin_text(realm)}) than the registry "
        f"({origin_text(registry)})"
    )


# -- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # on the client's monotonic clock


@dataclass(frozen=True)
class TokenRequest:
    """The request for a token: what is sent where (`url` includes the query)."""

    method: str
    url: httpx.URL
    headers: Mapping[str, str] = field(default_factory=dict)
    content: bytes | None = field(default=None, repr=False)

    @property
    def carries_credentials(self) -> bool:
        return "authorization" in self.headers or self.content is not None

    def redirected(self, status: int, target: httpx.URL) -> TokenRequest:
        """The request to repeat at `target` after a redirect `status`: RFC 9110 §15.4 as browsers (and
        httpx) apply it — a 303, and a 301/302 after a POST, become a GET without the body."""
        if (status == 303 and self.method != "HEAD") or (status in (301, 302) and self.method == "POST"):
            headers = {k: v for k, v in self.headers.items() if k != "content-type"}
            return TokenRequest("GET", target, headers)
        return TokenRequest(self.method, target, self.headers, self.content)


def token_request(
    realm: httpx.URL, service: str, scopes: list[str], creds: Credentials | None
) -> TokenRequest:
    """A GET of ``realm?service=…&scope=…`` (with basic credentials, if any), or with an identity token the
    OAuth2 refresh-token grant POST (distribution's "oauth" token spec; what ``docker login`` stores)."""
    if creds is not None and creds.identity_token:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": creds.identity_token,
            "client_id": "damselfly",
        }
        if service:
            form["service"] = service
        if scopes:
            form["scope"] = " ".join(scopes)
        url = realm.copy_merge_params({"service": service}) if service else realm
        return TokenRequest(
            "POST",
            url,
            {"content-type": "application/x-www-form-urlencoded"},
            str(httpx.QueryParams(form)).encode(),
        )
    params: list[tuple[str, str | int | float | bool | None]] = [("service", service)] if service else []
    params.extend(("scope", s) for s in scopes)
    headers = {"authorization": creds.basic_header()} if creds is not None else {}
    return TokenRequest("GET", realm.copy_merge_params(params), headers)


def parse_token_response(body: bytes, url: str, now: float) -> Token:
    """Read ``{"token"|"access_token": …, "expires_in": …}`` from a token endpoint."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AuthError(url, "token endpoint answered with something other than JSON") from None
    if not isinstance(doc, dict):
        raise AuthError(url, "token endpoint answered with a JSON value that is not an object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value:
        raise AuthError(url, "token endpoint answer has no token")
    lifetime = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = DEFAULT_TOKEN_LIFETIME
    # Keep at least a little of a short-lived token, so a margin larger than the lifetime still lets us
    # use the token for the request it was fetched for.
    margin = min(TOKEN_EXPIRY_MARGIN, float(lifetime) / 2)
    return Token(value, now + float(lifetime) - margin)


class TokenCache:
    """Bearer tokens keyed by (realm, service, scopes), valid until their (margined) expiry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, tuple[str, ...]], Token] = {}

    @staticmethod
    def key(realm: str, service: str, scopes: list[str]) -> tuple[str, str, tuple[str, ...]]:
        return realm, service, tuple(sorted(set(scopes)))

    def get(self, key: tuple[str, str, tuple[str, ...]]) -> str | None:
        with self._lock:
            tok = self._tokens.get(key)
            if tok is None:
                return None
            if self._clock() >= tok.expires_at:
                del self._tokens[key]
                return None
            return tok.value

    def put(self, key: tuple[str, str, tuple[str, ...]], token: Token) -> None:
        with self._lock:
            self._tokens[key] = token

    def drop(self, key: tuple[str, str, tuple[str, ...]], value: str) -> None:
        """Forget the token `value` under `key` (it was refused); a newer one stays."""
        with self._lock:
            tok = self._tokens.get(key)
            if tok is not None and tok.value == value:
                del self._tokens[key]
