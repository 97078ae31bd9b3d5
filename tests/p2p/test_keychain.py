"""Credentials from CRI ``PullImage`` calls: containerd's rules for an AuthConfig; the in-memory keychain."""

from __future__ import annotations

import base64

import pytest

from p2p.auth import Credentials
from p2p.errors import CredentialsError
from p2p.keychain import Keychain, credentials_from_cri


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"username": "alice", "password": "pw"}, Credentials("alice", "pw")),
        ({"auth": _b64("bob:pa:ss")}, Credentials("bob", "pa:ss")),
        ({"identity_token": "idt"}, Credentials(identity_token="idt")),
        ({"registry_token": "rt"}, Credentials(registry_token="rt")),
        # containerd's order: user name first, then the identity token, then auth
        ({"username": "u", "password": "p", "auth": _b64("x:y")}, Credentials("u", "p")),
        ({"identity_token": "idt", "auth": _b64("x:y")}, Credentials(identity_token="idt")),
        ({"server_address": "https://r.example:5000/v2/", "username": "u"}, Credentials("u", "")),
        ({"server_address": "other.example", "username": "u", "password": "p"}, None),
        ({}, None),
    ],
)
def test_auth_config_is_read_like_containerd_does(fields: dict[str, str], expected: object) -> None:
    assert credentials_from_cri("r.example:5000", **fields) == expected


def test_docker_hub_server_address_matches_its_aliases() -> None:
    creds = credentials_from_cri("docker.io", server_address="https://index.docker.io/v1/", username="u")
    assert creds == Credentials("u", "")


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"auth": "!!!"}, "not base64"),
        ({"auth": _b64("no-colon")}, 'no "user:password"'),
        ({"password": "x" * (64 * 1024 + 1)}, "longer than"),
    ],
)
def test_malformed_auth_config_is_refused_without_its_secret(fields: dict[str, str], why: str) -> None:
    with pytest.raises(CredentialsError) as e:
        credentials_from_cri("r.example", **fields)
    assert why in str(e.value) and "no-colon" not in str(e.value) and "xxxx" not in str(e.value)


def test_keychain_answers_per_repository_and_is_bounded() -> None:
    keychain = Keychain(max_entries=2)
    assert keychain.put("R.example", "a", Credentials("u", "1"))
    assert not keychain.put("r.example", "a", Credentials("u", "1"))  # the same again: no change
    assert keychain.put("r.example", "a", Credentials("u", "2"))
    assert keychain.for_repository("r.example", "a") == Credentials("u", "2")
    assert keychain.for_repository("r.example", "b") is None
    assert keychain("r.example") is None
    keychain.put("r.example", "b", Credentials("u", "3"))
    keychain.put("r.example", "a", Credentials("u", "4"))  # stored again: the most recent
    keychain.put("r.example", "c", Credentials("u", "5"))  # over the bound: the oldest ("b") goes
    assert [(r, repo) for r, repo, _ in keychain.entries()] == [("r.example", "a"), ("r.example", "c")]
    keychain.forget("r.example", "a")
    assert len(keychain) == 1
    assert "4" not in repr(list(keychain.entries()))  # secrets never show in a repr
