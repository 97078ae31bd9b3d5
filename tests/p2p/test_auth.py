"""Challenge parsing, Docker config.json credentials, credential helpers and the token cache."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from p2p.auth import (
    Credentials,
    DockerConfig,
    DockerConfigFile,
    Token,
    TokenCache,
    chain_providers,
    lookup_credentials,
    parse_token_response,
    parse_www_authenticate,
    scope_repository,
    static_credentials,
)
from p2p.errors import AuthError, CredentialsError
from p2p.keychain import Keychain


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


def test_config_file_is_read_again_when_it_changes_and_only_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    watched = DockerConfigFile()
    assert watched.path == tmp_path / "config.json"
    assert watched("r.example") is None  # no file yet: no credentials, nothing parsed
    assert watched.loads == 0

    _config(tmp_path, {"auths": {"r.example": {"username": "u1", "password": "p1"}}})
    assert watched("r.example") == Credentials("u1", "p1")  # a file that appears is read
    for _ in range(3):
        assert watched("r.example") == Credentials("u1", "p1")
    assert watched.loads == 1  # unchanged: one stat per lookup, no parse

    # `docker login` writes a temporary file and renames it over the old one: a new inode.
    new = tmp_path / "config.json.tmp"
    new.write_text(json.dumps({"auths": {"r.example": {"username": "u2", "password": "p2"}}}))
    os.replace(new, tmp_path / "config.json")
    assert watched("r.example") == Credentials("u2", "p2")

    # An in-place rewrite of the same length, with the same modification time forced back: the size
    # and inode are the same, so only the time tells; a different time is noticed.
    path = tmp_path / "config.json"
    before = path.stat()
    path.write_text(json.dumps({"auths": {"r.example": {"username": "u3", "password": "p3"}}}))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    assert watched("r.example") == Credentials("u3", "p3")

    path.write_text("{broken")  # caught mid-write, or a typo: an error now, read again next time
    with pytest.raises(CredentialsError, match="not valid JSON"):
        watched("r.example")
    path.write_text(json.dumps({"auths": {}}))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000))
    assert watched("r.example") is None

    path.unlink()  # removed: no credentials any more
    assert watched("r.example") is None


def test_config_file_helpers_run_at_every_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = tmp_path / "count"
    _helper(
        tmp_path,
        monkeypatch,
        f'read server\necho x >> {counter}\necho \'{{"Username":"hu","Secret":"hs"}}\'\n',
    )
    watched = DockerConfigFile(_config(tmp_path, {"credHelpers": {"r.example": "fake"}}))
    assert watched("r.example") == Credentials("hu", "hs")
    assert watched("r.example") == Credentials("hu", "hs")
    assert counter.read_text().count("x") == 2 and watched.loads == 1


def test_scope_names_the_repository_a_request_is_for() -> None:
    assert scope_repository(["repository:team/app:pull"]) == "team/app"
    assert scope_repository(["registry:catalog:*", "repository:a:pull,push", "repository:b:pull"]) == "a"
    assert scope_repository([]) is None
    assert scope_repository(["repository::pull", "nonsense"]) is None


def test_repository_credentials_are_asked_per_repository_first() -> None:
    keychain = Keychain()
    keychain.put("https://R.example", "team/app", Credentials("cri", "s1"))
    host_wide = static_credentials({"r.example": Credentials("docker", "s2")})
    chained = chain_providers(keychain, host_wide)
    assert lookup_credentials(chained, "r.example", "team/app") == Credentials("cri", "s1")
    assert lookup_credentials(chained, "r.example", "team/other") == Credentials("docker", "s2")
    assert lookup_credentials(chained, "r.example", None) == Credentials("docker", "s2")
    assert lookup_credentials(keychain, "r.example", None) is None  # never for a whole registry
    assert lookup_credentials(host_wide, "r.example", "team/app") == Credentials("docker", "s2")
    nested = chain_providers(chain_providers(keychain), host_wide)
    assert lookup_credentials(nested, "r.example", "team/app") == Credentials("cri", "s1")


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
