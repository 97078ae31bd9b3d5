"""Authentication against real registries: htpasswd basic auth, Docker config.json, and bearer tokens."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import pytest

from p2p.auth import Credentials, DockerConfig, DockerConfigFile, static_credentials
from p2p.errors import AuthError, NotFoundError
from p2p.keychain import Keychain
from p2p.registry import RegistryClient

from .conftest import ALICE, ALICE_REFRESH_TOKEN, BOB, ClientFactory, TokenRegistry
from .images import make_image, push_image
from .registry_server import RegistryServer, TokenKey


def _write_config(directory: Path, auths: dict[str, dict[str, str]]) -> Path:
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def _b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


# -- basic ----------------------------------------------------------------------------------------


def test_basic_auth_push_and_pull(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    client = make_client(basic_registry.host, credentials=static_credentials({basic_registry.host: ALICE}))
    image = make_image([os.urandom(64)])
    push_image(client, repo, image)
    assert client.resolve(f"{basic_registry.host}/{repo}").manifest.digest == image.manifest_digest


def test_basic_auth_without_credentials_says_none_were_found(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    client = make_client(basic_registry.host)
    with pytest.raises(AuthError) as e:
        client.get_manifest(repo, "latest")
    assert f"no credentials for {basic_registry.host}" in str(e.value)
    assert e.value.status == 401


def test_basic_auth_with_a_wrong_password_is_refused(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    creds = static_credentials({basic_registry.host: Credentials("alice", "not-her-password")})
    client = make_client(basic_registry.host, credentials=creds)
    with pytest.raises(AuthError) as e:
        client.get_manifest(repo, "latest")
    assert "refused the credentials" in str(e.value) and basic_registry.host in str(e.value)


def test_basic_auth_from_docker_config_json_via_docker_config_env(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str, docker_config_dir: Path
) -> None:
    _write_config(docker_config_dir, {basic_registry.host: {"auth": _b64(ALICE.username, ALICE.password)}})
    client = make_client(basic_registry.host, credentials=DockerConfig.load())
    assert client.push_blob(repo, b"via config.json").how == "uploaded"


def test_docker_config_with_scheme_in_key_and_explicit_path(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str, tmp_path: Path
) -> None:
    path = _write_config(
        tmp_path,
        {f"http://{basic_registry.host}/v2/": {"username": ALICE.username, "password": ALICE.password}},
    )
    client = make_client(basic_registry.host, credentials=DockerConfig.load(path))
    assert client.push_blob(repo, b"explicit path").how == "uploaded"


def test_default_client_reads_docker_config(
    basic_registry: RegistryServer, repo: str, docker_config_dir: Path
) -> None:
    _write_config(docker_config_dir, {basic_registry.host: {"auth": _b64(ALICE.username, ALICE.password)}})
    with RegistryClient(basic_registry.host) as client:  # no credentials argument: DOCKER_CONFIG applies
        assert client.push_blob(repo, b"default provider").how == "uploaded"


# -- token ----------------------------------------------------------------------------------------


def test_token_auth_push_and_pull(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    image = make_image([os.urandom(64)])
    push_image(client, repo, image, "v1")
    resolved = client.resolve(f"{token_registry.host}/{repo}:v1")
    assert client.get_blob(repo, resolved.manifest.layers[0].digest) == image.layers[0]
    # The token was asked for with the repository's scope and alice's credentials.
    assert any(
        r["user"] == "alice" and f"repository:{repo}:pull,push" in r["scope"]
        for r in token_registry.tokens.requests
    )


def test_token_is_cached_per_scope(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    digest = client.push_blob(repo, os.urandom(100)).digest
    before = client.session.token_requests

    for _ in range(5):
        client.read_blob_range(repo, digest, 0, 10)
    assert client.session.token_requests == before + 1  # one pull-scope token, then cached

    with pytest.raises(NotFoundError):  # another repository: another scope, another token
        client.get_manifest(repo + "-other", "latest")
    assert client.session.token_requests == before + 2


def test_expired_token_is_renewed(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    now = [1000.0]
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}), clock=lambda: now[0])
    digest = client.push_blob(repo, b"expiry").digest
    client.read_blob_range(repo, digest, 0, 3)
    count = client.session.token_requests

    now[0] += 250  # tokens live 300 s (less a margin): still valid
    client.read_blob_range(repo, digest, 0, 3)
    assert client.session.token_requests == count

    now[0] += 100  # past expiry on the client's clock: fetched anew before sending
    client.read_blob_range(repo, digest, 0, 3)
    assert client.session.token_requests == count + 1


def test_refused_cached_token_is_renewed_once(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    digest = client.push_blob(repo, b"renewal").digest
    client.read_blob_range(repo, digest, 0, 3)
    # The registry stops accepting the cached token (e.g. a key rotation): poison it in the cache.
    for key in list(client.session.tokens._tokens):
        token = client.session.tokens._tokens[key]
        client.session.tokens._tokens[key] = type(token)(token.value[:-8] + "AAAAAAAA", token.expires_at)
    count = client.session.token_requests

    assert client.read_blob_range(repo, digest, 0, 7) == b"renewal"
    assert client.session.token_requests == count + 1


def test_token_the_registry_never_accepts_fails_after_one_renewal(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    token_registry.tokens.bad_signer = TokenKey.generate("an untrusted signer")
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    with pytest.raises(AuthError) as e:
        client.get_manifest(repo, "latest")
    assert "refused the credentials" in str(e.value)
    assert client.session.token_requests == 1  # no loop: one challenge, one token, one refusal


def test_token_server_refuses_a_wrong_password(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    creds = static_credentials({token_registry.host: Credentials("alice", "wrong")})
    client = token_client(credentials=creds)
    with pytest.raises(AuthError) as e:
        client.get_manifest(repo, "latest")
    assert "token server refused the credentials of alice" in str(e.value)
    assert token_registry.tokens.realm.split("/token")[0] in str(e.value)


def test_pull_only_user_cannot_push(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: BOB}))
    with pytest.raises(AuthError) as e:
        client.push_blob(repo, b"bob may not push")
    assert "refused" in str(e.value)


def test_anonymous_pull_of_a_public_repository(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    public = "public/" + repo.replace("/", "-")
    writer = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    image = make_image([os.urandom(32)])
    push_image(writer, public, image)

    anonymous = token_client()
    assert anonymous.resolve(f"{token_registry.host}/{public}").manifest.digest == image.manifest_digest
    assert token_registry.tokens.requests[-1]["user"] is None
    with pytest.raises(AuthError) as e:
        anonymous.get_manifest(repo, "latest")  # not public
    assert f"no credentials were found for {token_registry.host}" in str(e.value)


def test_identity_token_from_docker_config_uses_the_oauth_refresh_grant(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str, docker_config_dir: Path
) -> None:
    _write_config(docker_config_dir, {token_registry.host: {"identitytoken": ALICE_REFRESH_TOKEN}})
    client = token_client(credentials=DockerConfig.load())
    assert client.push_blob(repo, b"oauth").how == "uploaded"
    assert token_registry.tokens.requests[-1]["method"] == "POST"
    assert token_registry.tokens.requests[-1]["user"] == "alice"


def test_cross_repository_mount_with_tokens_asks_for_both_scopes(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    data = os.urandom(300)
    client.push_blob(repo + "-src", data)
    assert client.push_blob(repo, data, mount_from=repo + "-src").how == "mounted"
    assert any(f"repository:{repo}-src:pull" in r["scope"] for r in token_registry.tokens.requests)


def test_one_client_shared_by_many_threads(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    data = os.urandom(256 * 1024)
    digest = client.push_blob(repo, data).digest
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            for i in range(20):
                offset = (seed * 7919 + i * 104729) % (len(data) - 4096)
                assert client.read_blob_range(repo, digest, offset, 4096) == data[offset : offset + 4096]
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


# -- credentials that change while a client lives -------------------------------------------------


def test_a_live_client_heeds_a_docker_login_made_after_it_started(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str, docker_config_dir: Path
) -> None:
    client = make_client(basic_registry.host, credentials=DockerConfigFile())
    with pytest.raises(AuthError, match="no credentials"):
        client.push_blob(repo, b"before the login")
    _write_config(docker_config_dir, {basic_registry.host: {"auth": _b64(ALICE.username, ALICE.password)}})
    assert client.push_blob(repo, b"after the login").how == "uploaded"  # same client, no restart


def test_a_short_lived_token_is_renewed_on_the_real_clock(
    token_registry: TokenRegistry, token_client: ClientFactory, repo: str
) -> None:
    token_registry.tokens.expires_in = 2  # kept for 1 s (half a short lifetime), then fetched anew
    client = token_client(credentials=static_credentials({token_registry.host: ALICE}))
    digest = client.push_blob(repo, b"short-lived").digest
    client.read_blob_range(repo, digest, 0, 3)
    count = client.session.token_requests
    client.read_blob_range(repo, digest, 0, 3)
    assert client.session.token_requests == count  # still valid
    time.sleep(1.2)
    assert client.read_blob_range(repo, digest, 0, 3) == b"sho"
    assert client.session.token_requests == count + 1


def test_repository_credentials_are_used_for_their_repository_only(
    basic_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    keychain = Keychain()
    keychain.put(basic_registry.host, repo, ALICE)
    client = make_client(basic_registry.host, credentials=keychain)
    assert client.push_blob(repo, b"for this repository").how == "uploaded"
    with pytest.raises(AuthError, match="no credentials"):
        client.push_blob(repo + "-other", b"not for that one")
