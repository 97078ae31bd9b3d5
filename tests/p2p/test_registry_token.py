"""A registry token (CRI ``AuthConfig.registry_token``) is the bearer token itself: no token server asked."""

from __future__ import annotations

import httpx
import pytest

from p2p.auth import Credentials, static_credentials
from p2p.errors import AuthError
from p2p.registry import RegistryClient
from tests.conftest import FAST_RETRY, FAST_TIMEOUTS

HOST = "registry.example"
BLOB = "sha256:" + "ab" * 32


def _registry(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "from-the-token-server"})
        if request.headers.get("authorization") == "Bearer the-registry-token":
            return httpx.Response(200, headers={"content-length": "5"})
        challenge = 'Bearer realm="https://registry.example/token",service="registry.example"'
        return httpx.Response(401, headers={"www-authenticate": challenge})

    return httpx.MockTransport(handle)


def _client(creds: Credentials, seen: list[httpx.Request]) -> RegistryClient:
    return RegistryClient(
        HOST,
        credentials=static_credentials({HOST: creds}),
        transport=_registry(seen),
        retry=FAST_RETRY,
        timeouts=FAST_TIMEOUTS,
    )


def test_registry_token_is_sent_as_the_bearer_token() -> None:
    seen: list[httpx.Request] = []
    with _client(Credentials(registry_token="the-registry-token"), seen) as client:
        assert client.blob_size("team/app", BLOB) == 5  # type: ignore[arg-type]
        assert client.blob_size("team/app", BLOB) == 5  # type: ignore[arg-type]
    assert not [r for r in seen if r.url.path == "/token"]
    # the first request learns the challenge; then the token goes with every request
    token = "Bearer the-registry-token"
    assert [r.headers.get("authorization") for r in seen] == [None, token, token]


def test_a_refused_registry_token_says_so() -> None:
    seen: list[httpx.Request] = []
    with _client(Credentials(registry_token="stale"), seen) as client, pytest.raises(AuthError) as e:
        client.blob_size("team/app", BLOB)  # type: ignore[arg-type]
    assert "refused the registry token" in str(e.value) and "stale" not in str(e.value)
