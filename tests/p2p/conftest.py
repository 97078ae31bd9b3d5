"""Fixtures: real docker-registry processes on loopback (no auth, htpasswd, token) and client factories."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2p.auth import CredentialProvider, Credentials, static_credentials
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts

from .registry_server import RegistryServer, TokenKey, TokenServer, htpasswd_line, token_auth_config

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


@dataclass
class TokenRegistry:
    registry: RegistryServer
    tokens: TokenServer

    @property
    def host(self) -> str:
        return self.registry.host


@pytest.fixture(scope="session")
def _token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    key = TokenKey.generate()
    cert = tmp_path_factory.mktemp("token") / "token-signer.pem"
    cert.write_bytes(key.cert_pem())
    tokens = TokenServer(
        key,
        {ALICE.username: ALICE.password, BOB.username: BOB.password},
        _acl,
        {ALICE_REFRESH_TOKEN: "alice"},
    )
    tokens.start()
    try:
        for server in _start(RegistryServer(auth=token_auth_config(tokens, cert), name="token")):
            yield TokenRegistry(server, tokens)
    finally:
        tokens.stop()


@pytest.fixture
def token_registry(_token_registry: TokenRegistry) -> Iterator[TokenRegistry]:
    """The token-auth registry; the token server's knobs are reset after each test."""
    t = _token_registry.tokens
    t.requests.clear()
    yield _token_registry
    t.expires_in, t.bad_signer = 300, None


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
