"""Image reference parsing (digests themselves: tests/blockformat/test_digest.py)."""

from __future__ import annotations

import pytest

from blockformat.digest import parse_digest
from p2p.errors import InvalidReferenceError
from p2p.reference import Reference, is_loopback, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("user/app", "docker.io", "user/app", "latest", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
        ("127.0.0.1:5000/a/b/c:v1.0-rc_1", "127.0.0.1:5000", "a/b/c", "v1.0-rc_1", None),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/foo", "localhost:5000", "foo", "latest", None),
        ("registry.example.com/ns/img@" + D, "registry.example.com", "ns/img", None, D),
        ("registry.example.com/ns/img:tag@" + D, "registry.example.com", "ns/img", "tag", D),
        ("[::1]:5000/foo:bar", "[::1]:5000", "foo", "bar", None),
        ("Registry.Example/foo", "Registry.Example", "foo", "latest", None),
        ("a.b/c__d/e-f--g.h:T", "a.b", "c__d/e-f--g.h", "T", None),
    ],
)
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_docker_hub_api_host_and_display() -> None:
    ref = Reference.parse("ubuntu")
    assert ref.api_host == "registry-1.docker.io"
    assert str(ref) == "docker.io/library/ubuntu:latest"
    assert Reference.parse("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


def test_digest_decides_what_is_fetched() -> None:
    assert parse_reference(f"r.io/a:tag@{D}").reference == D
    assert parse_reference("r.io/a:tag").reference == "tag"
    assert str(parse_reference("r.io/a:tag").with_digest(parse_digest(D))) == f"r.io/a:tag@{D}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Upper",
        "r.io/Upper",
        "r.io/a:",
        "r.io/a:-bad",
        "r.io/a:" + "x" * 129,
        "r.io/a@sha256:abc",
        "r.io/a@md5:" + "a" * 32,
        "r.io/a@sha256:" + "AB" * 32,
        "r.io/a//b",
        "r.io/a_",
        "r.io/" + "a" * 260,
        "@" + D,
        "bad_host:5000:x/y",
    ],
)
def test_invalid_references_say_why(text: str) -> None:
    with pytest.raises(InvalidReferenceError) as e:
        parse_reference(text)
    assert "invalid image reference" in str(e.value) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("localhost:80", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("registry.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
