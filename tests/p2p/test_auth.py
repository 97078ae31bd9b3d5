"""Challenge parsing, Docker config.json credentials, credential helpers and the token cache."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from p2p.auth import (
    Credentials,
    DockerConfig,
    Token,
    TokenCache,
    chain_providers,
    parse_token_response,
    parse_www_authenticate,
    static_credentials,
)
from p2p.errors import AuthError, CredentialsError


def test_bearer_challenge_with_quoted_scope_list() -> None:
    [c] = parse_www_authenticate(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:samalba/my-app:pull,push repository:other:pull",error="insufficient_scope"'
        ]
    )
    assert c.scheme == "bearer"
    assert c.params["realm"] == "https://auth.docker.io/token"
    assert c.params["service"] == "registry.docker.io"
    assert c.scopes == ["repository:samalba/my-app:pull,push", "repository:other:pull"]


def test_several_challenges_and_escapes() -> None:
    cs = parse_www_authenticate(
        ['Basic realm="Registry \\"realm\\"", Bearer realm=tok,service=x', "Digest nonce=1"]
    )
    assert [c.scheme for c in cs] == ["basic", "bearer", "digest"]
    assert cs[0].params["realm"] == 'Registry "realm"'
    assert cs[1].params == {"realm": "tok", "service": "x"}


def _config(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_config_auth_field_and_key_spellings(tmp_path: Path) -> None:
    auth = base64.b64encode(b"user:pa:ss").decode()
    cfg = DockerConfig.load(
        _config(
            tmp_path,
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": auth},
                    "http://127.0.0.1:5000": {"username": "u2", "password": "p2"},
                    "empty.example": {},
                }
            },
        )
    )
    assert cfg("docker.io") == Credentials("user", "pa:ss")
    assert cfg("registry-1.docker.io") == Credentials("user", "pa:ss")
    assert cfg("127.0.0.1:5000") == Credentials("u2", "p2")
    assert cfg("empty.example") is None
    assert cfg("elsewhere.example") is None


def test_config_path_from_docker_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _config(tmp_path, {"auths": {"r.example": {"identitytoken": "idt"}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert DockerConfig.load()("r.example") == Credentials(identity_token="idt")


def test_missing_config_means_no_credentials(tmp_path: Path) -> None:
    assert DockerConfig.load(tmp_path / "nope.json")("r.example") is None


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ("{not json", "not valid JSON"),
        ([], "not a JSON object"),
        ({"auths": []}, '"auths" is not an object'),
        ({"auths": {"r": {"auth": "!!notbase64"}}}, "not base64"),
        ({"auths": {"r": {"auth": base64.b64encode(b"nocolon").decode()}}}, 'no "user:password"'),
        ({"auths": {"r": "x"}}, "not an object"),
    ],
)
def test_malformed_config_names_the_file_and_the_problem(tmp_path: Path, doc: object, why: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(CredentialsError) as e:
        DockerConfig.load(path)
    assert str(path) in str(e.value) and why in str(e.value)


def _helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = bindir / "docker-credential-fake"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _helper(
        tmp_path,
        monkeypatch,
        'read server\nif [ "$server" = "r.example" ]; then echo \'{"Username":"hu","Secret":"hs"}\'; '
        "else echo 'credentials not found in native keychain'; exit 1; fi\n",
    )
    cfg = DockerConfig.load(_config(tmp_path, {"credHelpers": {"r.example": "fake"}, "credsStore": "fake"}))
    assert cfg("r.example") == Credentials("hu", "hs")
    assert cfg("other.example") is None


def test_failing_credential_helper_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _helper(tmp_path, monkeypatch, "echo 'keychain locked' >&2; exit 3\n")
    cfg = DockerConfig.load(_config(tmp_path, {"credsStore": "fake"}))
    with pytest.raises(CredentialsError, match="keychain locked"):
        cfg("r.example")
    cfg2 = DockerConfig.load(_config(tmp_path, {"credsStore": "absent"}))
    with pytest.raises(CredentialsError, match="not found in PATH"):
        cfg2("r.example")


def test_providers_chain_in_order() -> None:
    a = static_credentials({"https://r.example/": Credentials("a", "1")})
    b = static_credentials({"r.example": Credentials("b", "2"), "s.example": Credentials("b", "3")})
    chained = chain_providers(a, b)
    assert chained("r.example") == Credentials("a", "1")
    assert chained("s.example") == Credentials("b", "3")
    assert chained("t.example") is None
    assert "1" not in repr(Credentials("a", "1"))  # passwords never show in logs


def test_token_response_and_cache_expiry() -> None:
    now = [0.0]
    cache = TokenCache(lambda: now[0])
    token = parse_token_response(b'{"access_token": "abc", "expires_in": 120}', "u", now[0])
    assert token == Token("abc", 110.0)  # 10 s margin
    key = TokenCache.key("realm", "svc", ["repository:a:pull", "repository:a:pull"])
    cache.put(key, token)
    assert cache.get(key) == "abc"
    cache.drop(key, "other")  # a refusal of an older token leaves the newer one
    assert cache.get(key) == "abc"
    now[0] = 110.0
    assert cache.get(key) is None  # expired
    cache.put(key, Token("def", 500.0))
    cache.drop(key, "def")
    assert cache.get(key) is None
    short = parse_token_response(b'{"token": "t", "expires_in": 4}', "u", 0.0)
    assert short.expires_at == 2.0  # a short token keeps half its life
    assert parse_token_response(b'{"token": "t"}', "u", 0.0).expires_at == 50.0  # default 60 s


@pytest.mark.parametrize("body", [b"not json", b"[]", b"{}", b'{"token": ""}'])
def test_bad_token_responses(body: bytes) -> None:
    with pytest.raises(AuthError, match="token"):
        parse_token_response(body, "https://auth.example/token", 0.0)
