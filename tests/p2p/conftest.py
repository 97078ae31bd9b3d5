"""Fixtures: real docker-registry processes on loopback (no auth, htpasswd, token) and client factories.

The token registry's token server speaks HTTPS on another port (Docker Hub's shape): credentials go only
to an HTTPS realm or to the registry's own origin. Its clients trust the test CA (`token_client`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2p.auth import CredentialProvider, Credentials, static_credentials
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts

from .registry_server import (
    LoopbackTLS,
    RegistryServer,
    TokenKey,
    TokenServer,
    htpasswd_line,
    token_auth_config,
)

ALICE = Credentials("alice", "wonderland")  # may pull and push everywhere
BOB = Credentials("bob", "builder")  # may only pull
ALICE_REFRESH_TOKEN = "refresh-token-of-alice"

#: Short bounds so a failing test fails fast instead of waiting for production budgets.
FAST_RETRY = RetryPolicy(attempts=3, budget=10.0, base_delay=0.05, max_delay=0.5)
FAST_TIMEOUTS = Timeouts(connect=2.0, read=5.0, write=5.0, pool=2.0, total=20.0)

NO_CREDENTIALS: CredentialProvider = static_credentials({})


def _start(server: RegistryServer) -> Iterator[RegistryServer]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryServer]:
    """A registry without authentication."""
    yield from _start(RegistryServer(name="plain"))


@pytest.fixture(scope="session")
def mirror_registry() -> Iterator[RegistryServer]:
    """A second registry without authentication, used as a mirror."""
    yield from _start(RegistryServer(name="mirror"))


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with htpasswd (bcrypt) basic auth for alice and bob."""
    path = tmp_path_factory.mktemp("htpasswd") / "htpasswd"
    path.write_text(htpasswd_line(ALICE.username, ALICE.password) + htpasswd_line(BOB.username, BOB.password))
    yield from _start(
        RegistryServer(auth={"htpasswd": {"realm": "damselfly-test", "path": str(path)}}, name="basic")
    )


def _acl(user: str | None, repository: str) -> set[str]:
    if user == "alice":
        return {"pull", "push"}
    if user == "bob" or repository.startswith("public/"):
        return {"pull"}
    return set()


@pytest.fixture(scope="session")
def loopback_tls(tmp_path_factory: pytest.TempPathFactory) -> LoopbackTLS:
    """A test CA and a certificate for 127.0.0.1 signed by it."""
    return LoopbackTLS.generate(tmp_path_factory.mktemp("tls"))


def trusting(tls: LoopbackTLS) -> httpx.HTTPTransport:
    """A transport for `RegistryClient(transport=…)` that verifies HTTPS servers against the test CA."""
    return httpx.HTTPTransport(verify=tls.client_context())


@dataclass
class TokenRegistry:
    registry: RegistryServer
    tokens: TokenServer

    @property
    def host(self) -> str:
        return self.registry.host


def _token_server(tls: LoopbackTLS | None) -> TokenServer:
    return TokenServer(
        TokenKey.generate(),
        {ALICE.username: ALICE.password, BOB.username: BOB.password},
        _acl,
        {ALICE_REFRESH_TOKEN: "alice"},
        tls=tls.server_context() if tls is not None else None,
    )


def _serve_token_registry(tokens: TokenServer, directory: Path, name: str) -> Iterator[TokenRegistry]:
    cert = directory / "token-signer.pem"
    cert.write_bytes(tokens.key.cert_pem())
    tokens.start()
    try:
        for server in _start(RegistryServer(auth=token_auth_config(tokens, cert), name=name)):
            yield TokenRegistry(server, tokens)
    finally:
        tokens.stop()


@pytest.fixture(scope="session")
def _token_registry(
    tmp_path_factory: pytest.TempPathFactory, loopback_tls: LoopbackTLS
) -> Iterator[TokenRegistry]:
    yield from _serve_token_registry(_token_server(loopback_tls), tmp_path_factory.mktemp("token"), "token")


def _reset(registry: TokenRegistry) -> Iterator[TokenRegistry]:
    t = registry.tokens
    t.requests.clear()
    t.seen.clear()
    yield registry
    t.expires_in, t.bad_signer = 300, None


@pytest.fixture
def token_registry(_token_registry: TokenRegistry) -> Iterator[TokenRegistry]:
    """The token-auth registry, its realm over HTTPS; the token server's knobs are reset after each test."""
    yield from _reset(_token_registry)


@pytest.fixture(scope="session")
def _http_realm_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    yield from _serve_token_registry(_token_server(None), tmp_path_factory.mktemp("token-http"), "token-http")


@pytest.fixture
def http_realm_registry(_http_realm_registry: TokenRegistry) -> Iterator[TokenRegistry]:
    """A token-auth registry whose realm is plain HTTP on another port: it may not have credentials."""
    yield from _reset(_http_realm_registry)


_counter = itertools.count()


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test, so tests sharing a registry do not meet."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:80]
    return f"t/{name}-{next(_counter)}"


ClientFactory = Callable[..., RegistryClient]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """``make_client(host, **kwargs)``: a RegistryClient with fast test bounds and no ambient credentials."""
    made: list[RegistryClient] = []

    def factory(host: str, **kwargs: Any) -> RegistryClient:
        kwargs.setdefault("plain_http", True)
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("timeouts", FAST_TIMEOUTS)
        kwargs.setdefault("credentials", NO_CREDENTIALS)
        client = RegistryClient(host, **kwargs)
        made.append(client)
        return client

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def token_client(
    token_registry: TokenRegistry, make_client: ClientFactory, loopback_tls: LoopbackTLS
) -> ClientFactory:
    """``token_client(**kwargs)``: a client for the token registry that trusts its token server's CA."""

    def factory(**kwargs: Any) -> RegistryClient:
        kwargs.setdefault("transport", trusting(loopback_tls))
        return make_client(token_registry.host, **kwargs)

    return factory


@pytest.fixture
def client(registry: RegistryServer, make_client: ClientFactory) -> RegistryClient:
    """A client for the no-auth registry."""
    return make_client(registry.host)


@pytest.fixture
def docker_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory set as DOCKER_CONFIG for the test."""
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d
