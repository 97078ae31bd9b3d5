"""Where a registry's credentials may go: its own origin, or a token realm over HTTPS — nowhere else.

Real HTTP(S) servers on loopback (`AuthProbe`, and the docker-registry with its token server) record what
reaches them; the credentials come from a Docker config.json written for the registry's host.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import pytest

from blockformat.digest import digest_of
from p2p.auth import Credentials, DockerConfig, token_request, withholding_reason
from p2p.errors import AuthError, P2PError
from p2p.registry import RegistryClient

from .conftest import ALICE, ALICE_REFRESH_TOKEN, ClientFactory, TokenRegistry, trusting
from .registry_server import LoopbackTLS
from .servers import AuthProbe

BLOB = b"the bytes behind the credentials" * 8
BLOB_DIGEST = digest_of(BLOB)
USERS = {ALICE.username: ALICE.password}
REFRESH = {ALICE_REFRESH_TOKEN: ALICE.username}
SECRETS = [ALICE.password, ALICE_REFRESH_TOKEN, base64.b64encode(f"alice:{ALICE.password}".encode()).decode()]

Kind = Literal["password", "identitytoken"]
KINDS: list[Kind] = ["password", "identitytoken"]
ClientFor = Callable[..., RegistryClient]


def probe(
    auth: Literal["bearer", "basic", "none"] = "bearer",
    public: bool = False,
    tls: ssl.SSLContext | None = None,
) -> AuthProbe:
    return AuthProbe(auth, users=USERS, refresh_tokens=REFRESH, blob=BLOB, public=public, tls=tls)


@pytest.fixture
def probes(loopback_tls: LoopbackTLS) -> Iterator[dict[str, AuthProbe]]:
    """Running probes by role: registries ``r`` (HTTP) and ``r_tls``; other origins ``other`` (HTTP) and
    ``other_tls``; realms and storage point at each other per test."""
    tls = loopback_tls.server_context()
    servers = {
        "r": probe(),
        "r_tls": probe(tls=tls),
        "other": probe("none"),
        "other_tls": probe("none", tls=tls),
    }
    with contextlib.ExitStack() as stack:
        yield {role: stack.enter_context(p) for role, p in servers.items()}


def failure(call: Callable[[], object]) -> P2PError | None:
    """The error `call` ends with, or None; tests first check what the servers saw, then the error."""
    try:
        call()
    except P2PError as e:
        return e
    return None


def config_for(directory: Path, host: str, kind: Kind) -> DockerConfig:
    """A config.json holding alice's password, or her identity token, for `host` only."""
    entry = (
        {"auth": base64.b64encode(f"{ALICE.username}:{ALICE.password}".encode()).decode()}
        if kind == "password"
        else {"identitytoken": ALICE_REFRESH_TOKEN}
    )
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": {host: entry}}))
    return DockerConfig.load(path)


@pytest.fixture
def client_for(make_client: ClientFactory, loopback_tls: LoopbackTLS, tmp_path: Path) -> ClientFor:
    """``client_for(registry_probe, kind)``: a client for the probe, with config.json credentials for it
    (none without `kind`), trusting the test CA."""

    def factory(registry: AuthProbe, kind: Kind | None = None, **kwargs: object) -> RegistryClient:
        creds = config_for(tmp_path, registry.host, kind) if kind else DockerConfig(tmp_path, {}, {}, None)
        return make_client(
            registry.host,
            plain_http=registry.scheme == "http",
            credentials=creds,
            transport=trusting(loopback_tls),
            **kwargs,
        )

    return factory


# -- the rule -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("registry", "realm", "allowed"),
    [
        ("https://127.0.0.1:5000", "https://127.0.0.2/token", True),  # Docker Hub's shape
        ("http://127.0.0.1:5000", "https://127.0.0.1:5001/token", True),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000/token", True),  # the same origin
        ("http://127.0.0.1", "http://127.0.0.1:80/token", True),  # the default port is the same port
        ("https://127.0.0.1", "https://127.0.0.1:443/token", True),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5001/token", False),  # another port
        ("http://127.0.0.1:5000", "http://localhost:5000/token", False),  # another host
        ("https://127.0.0.1", "http://127.0.0.1/token", False),  # a downgrade
        ("https://127.0.0.1", "http://127.0.0.1:443/token", False),
        ("http://127.0.0.1:5000", "tok", False),  # not even absolute
        ("http://127.0.0.1:5000", "ftp://127.0.0.1:5000/token", False),
    ],
)
def test_credentials_go_only_to_an_https_realm_or_the_registry_origin(
    registry: str, realm: str, allowed: bool
) -> None:
    reason = withholding_reason(httpx.URL(registry), httpx.URL(realm))
    assert (reason is None) == allowed, reason


def test_withholding_reasons_name_the_problem() -> None:
    other = withholding_reason(httpx.URL("http://127.0.0.1:5000"), httpx.URL("http://127.0.0.1:5001/t"))
    assert other is not None and "plain HTTP on another origin (http://127.0.0.1:5001)" in other
    down = withholding_reason(httpx.URL("https://127.0.0.1"), httpx.URL("http://127.0.0.1/t"))
    assert down is not None and "downgrade" in down


@pytest.mark.parametrize(
    ("status", "keeps_body"), [(301, False), (302, False), (303, False), (307, True), (308, True)]
)
def test_a_redirected_refresh_token_post_keeps_its_body_only_on_307_and_308(
    status: int, keeps_body: bool
) -> None:
    creds = Credentials(identity_token="secret")
    post = token_request(httpx.URL("https://127.0.0.1/token"), "svc", ["repository:a:pull"], creds)
    assert post.method == "POST" and post.carries_credentials
    assert b"refresh_token=secret" in (post.content or b"")
    again = post.redirected(status, httpx.URL("https://127.0.0.1/token-moved"))
    expected = ("POST", post.content, True) if keeps_body else ("GET", None, False)
    assert (again.method, again.content, again.carries_credentials) == expected


# -- token realms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_plain_http_realm_on_another_port_gets_no_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    registry, realm = probes["r"], probes["other"]
    registry.realm = f"{realm.url}/token"
    client = client_for(registry, kind)

    with caplog.at_level(logging.WARNING, logger="p2p.authflow"):
        error = failure(lambda: client.get_blob("a/b", BLOB_DIGEST))

    assert [r.path.split("?")[0] for r in realm.seen] == ["/token"]  # asked, anonymously
    assert realm.credentials_seen(SECRETS) == []
    assert registry.credentials_seen(SECRETS) == []  # the anonymous token got nothing
    assert isinstance(error, AuthError)
    message = str(error)
    assert f"credentials for {registry.host} were withheld from the token realm {registry.realm}" in message
    assert "plain HTTP on another origin" in message and "serve the token realm over HTTPS" in message
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert registry.realm in warning.getMessage() and "plain HTTP on another origin" in warning.getMessage()


@pytest.mark.parametrize("kind", KINDS)
def test_https_registry_with_a_plain_http_realm_gets_no_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, kind: Kind
) -> None:
    registry, realm = probes["r_tls"], probes["other"]
    registry.realm = f"{realm.url}/token"
    error = failure(lambda: client_for(registry, kind).get_blob("a/b", BLOB_DIGEST))
    assert realm.seen and realm.credentials_seen(SECRETS) == []
    assert isinstance(error, AuthError) and "downgrade" in str(error) and "withheld" in str(error)


@pytest.mark.parametrize("kind", KINDS)
def test_same_origin_plain_http_realm_gets_the_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, kind: Kind
) -> None:
    registry = probes["r"]  # its realm is its own /token
    assert client_for(registry, kind).get_blob("a/b", BLOB_DIGEST) == BLOB
    [token_request] = [r for r in registry.seen if r.path.startswith("/token")]
    assert token_request.method == ("GET" if kind == "password" else "POST")
    assert registry.credentials_seen(SECRETS)[0] == token_request


@pytest.mark.parametrize("kind", KINDS)
def test_https_realm_on_another_origin_gets_the_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, kind: Kind
) -> None:
    registry, realm = probes["r"], probes["other_tls"]
    registry.realm = f"{realm.url}/token"
    assert client_for(registry, kind).get_blob("a/b", BLOB_DIGEST) == BLOB
    assert [r.method for r in realm.credentials_seen(SECRETS)] == ["GET" if kind == "password" else "POST"]


def test_real_registry_with_a_plain_http_realm_elsewhere_gets_an_anonymous_token_only(
    http_realm_registry: TokenRegistry, make_client: ClientFactory, tmp_path: Path, repo: str
) -> None:
    client = make_client(
        http_realm_registry.host, credentials=config_for(tmp_path, http_realm_registry.host, "password")
    )
    error = failure(lambda: client.get_manifest(repo, "latest"))
    seen = http_realm_registry.tokens.seen
    assert seen and all(r.authorization is None and r.method == "GET" for r in seen)
    assert isinstance(error, AuthError)
    assert f"withheld from the token realm {http_realm_registry.tokens.realm}" in str(error)


# -- redirects of token requests ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_token_request_with_credentials_is_not_redirected_to_another_origin(
    probes: dict[str, AuthProbe], client_for: ClientFor, kind: Kind
) -> None:
    registry, elsewhere = probes["r"], probes["other"]
    registry.token_redirect = f"{elsewhere.url}/token-moved"  # a 307: httpx would re-POST the form there
    error = failure(lambda: client_for(registry, kind).get_blob("a/b", BLOB_DIGEST))
    assert elsewhere.seen == []
    assert isinstance(error, AuthError)
    assert f"HTTP 307 to another origin ({elsewhere.url}); not followed" in str(error)


def test_token_request_with_credentials_follows_a_same_origin_redirect(
    probes: dict[str, AuthProbe], client_for: ClientFor
) -> None:
    registry = probes["r"]
    registry.token_redirect = f"{registry.url}/token-moved"
    assert client_for(registry, "identitytoken").get_blob("a/b", BLOB_DIGEST) == BLOB
    moved = [r for r in registry.seen if r.path.startswith("/token-moved")]
    assert [r.method for r in moved] == ["POST"] and ALICE_REFRESH_TOKEN.encode() in moved[0].body


def test_anonymous_token_request_follows_a_redirect_to_another_origin(client_for: ClientFor) -> None:
    with probe(public=True) as registry, probe("none") as elsewhere:
        registry.token_redirect = f"{elsewhere.url}/token-moved"
        assert client_for(registry).get_blob("a/b", BLOB_DIGEST) == BLOB
        assert [r.path.split("?")[0] for r in elsewhere.seen] == ["/token-moved"]


# -- requests to other origins --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "kind"), [("basic", "password"), ("bearer", "password"), ("bearer", "identitytoken")]
)
def test_blob_redirected_to_another_origin_carries_no_authorization_there(
    probes: dict[str, AuthProbe], client_for: ClientFor, auth: Literal["basic", "bearer"], kind: Kind
) -> None:
    storage = probes["other"]
    with probe(auth) as registry:
        registry.blob_redirect = storage.url
        client = client_for(registry, kind)
        assert client.get_blob("a/b", BLOB_DIGEST) == BLOB
        assert client.read_blob_range("a/b", BLOB_DIGEST, 3, 5) == BLOB[3:8]
        assert any(r.authorization for r in registry.seen)  # the registry did get them
    assert len(storage.seen) == 2 and all(r.authorization is None for r in storage.seen)
    assert storage.credentials_seen(SECRETS) == []


@pytest.mark.parametrize(("auth", "kind"), [("basic", "password"), ("bearer", "identitytoken")])
def test_a_challenge_from_the_redirect_target_is_not_answered_with_the_registry_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, auth: Literal["basic", "bearer"], kind: Kind
) -> None:
    # The storage asks for a bearer token from its own HTTPS realm, which the realm rule alone would allow.
    storage = probes["other_tls"]
    storage.auth = "bearer"
    with probe(auth) as registry:
        registry.blob_redirect = storage.url
        client = client_for(registry, kind)
        # The second call starts with a registry token or basic header at hand, so the storage's challenge
        # is its first 401.
        errors = [failure(lambda: client.get_blob("a/b", BLOB_DIGEST)) for _ in range(2)]
    assert storage.seen and all(r.authorization is None for r in storage.seen)
    assert storage.credentials_seen(SECRETS) == []
    assert not any(r.path.startswith("/token") for r in storage.seen)
    for error in errors:
        assert isinstance(error, AuthError)
        assert f"{storage.url}, not the registry endpoint {registry.url}" in str(error)


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_upload_location_on_another_origin_gets_no_authorization(
    probes: dict[str, AuthProbe], client_for: ClientFor, auth: Literal["basic", "bearer"]
) -> None:
    elsewhere = probes["other"]
    with probe(auth) as registry:
        registry.upload_location = f"{elsewhere.url}/uploads/1"
        assert client_for(registry, "password").push_blob("a/b", b"pushed").how == "uploaded"
        assert any(r.method == "POST" and r.authorization for r in registry.seen)
    assert [r.method for r in elsewhere.seen] == ["PUT"] and elsewhere.seen[0].authorization is None


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_mirror_never_gets_the_origin_credentials(
    probes: dict[str, AuthProbe], client_for: ClientFor, auth: Literal["basic", "bearer"]
) -> None:
    registry = probes["r"]
    with probe(auth) as mirror:  # wants credentials of its own, which the client does not have
        client = client_for(registry, "password", mirrors=[mirror.url])
        assert client.get_blob("a/b", BLOB_DIGEST) == BLOB
    assert mirror.seen and mirror.credentials_seen(SECRETS) == []
