"""Fixtures of the registry client's tests: a mirror, token-auth registries, TLS, a DOCKER_CONFIG.

The plain and basic-auth registries and the client factories (`registry`, `basic_registry`, `client`,
`make_client`) are in tests/conftest.py. The token registry's token server speaks HTTPS on another port
(Docker Hub's shape): credentials go only to an HTTPS realm or to the registry's own origin. Its clients
trust the test CA (`token_client`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2p.registry import RegistryClient
from tests.conftest import ALICE, BOB, ClientFactory

from .registry_server import (
    LoopbackTLS,
    RegistryServer,
    TokenKey,
    TokenServer,
    token_auth_config,
)

ALICE_REFRESH_TOKEN = "refresh-token-of-alice"


@pytest.fixture(scope="session")
def mirror_registry() -> Iterator[RegistryServer]:
    """A second registry without authentication, used as a mirror."""
    with RegistryServer(name="mirror") as server:
        yield server


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
        with RegistryServer(auth=token_auth_config(tokens, cert), name=name) as server:
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
def docker_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory set as DOCKER_CONFIG for the test."""
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d
