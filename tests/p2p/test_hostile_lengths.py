"""Hostile lengths from a registry: descriptor sizes and headers are bounded before they size anything.

The network is an ``httpx.MockTransport`` that records every request, so a size that should have been
refused before any request shows up as a request.
"""

from __future__ import annotations

import json

import httpx
import pytest

from blockformat.digest import Digest, digest_of
from p2p.errors import InvalidManifestError, RegistryProtocolError
from p2p.manifest import MAX_DOCUMENT_SIZE, OCI_MANIFEST, Descriptor, Manifest, build_manifest, parse_manifest
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy
from tests.conftest import NO_CREDENTIALS

CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def client(handler: httpx.MockTransport) -> RegistryClient:
    return RegistryClient(
        "registry.test",
        transport=handler,
        credentials=NO_CREDENTIALS,
        retry=RetryPolicy(attempts=1, budget=1, base_delay=0, max_delay=0),
        sleep=lambda s: None,
    )


def test_a_descriptor_size_beyond_int64_is_an_invalid_manifest() -> None:
    # image-spec v1.1, descriptor.md: size is an int64.
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest_of(b"c"), "size": 1 << 63},
        "layers": [],
    }
    with pytest.raises(InvalidManifestError, match="config has no valid size"):
        parse_manifest(json.dumps(doc).encode(), None, "w")
    doc["config"] = {"mediaType": CONFIG, "digest": digest_of(b"c"), "size": (1 << 63) - 1}
    assert isinstance(parse_manifest(json.dumps(doc).encode(), None, "w"), Manifest)


@pytest.mark.parametrize("size", [MAX_DOCUMENT_SIZE + 1, 1 << 50])
def test_a_config_larger_than_a_document_may_be_is_refused_before_any_request(size: int) -> None:
    requests: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(f"{request.method} {request.url.path}")
        return httpx.Response(404)

    config = Descriptor(CONFIG, digest_of(b"config"), size)
    raw = build_manifest(config, [Descriptor(LAYER, digest_of(b"layer"), 10)])
    manifest = parse_manifest(raw, OCI_MANIFEST, "w")
    assert isinstance(manifest, Manifest)
    with client(httpx.MockTransport(handler)) as c, pytest.raises(RegistryProtocolError) as ei:
        c.get_config("repo", manifest)
    assert str(size) in str(ei.value) and f"{MAX_DOCUMENT_SIZE}-byte limit" in str(ei.value)
    assert requests == []


@pytest.mark.parametrize("value", ["9" * 5000, "\u00b2", "12345678901234567890"])
def test_a_content_length_that_is_no_blob_size_is_a_protocol_error(value: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", value.encode("latin-1"))])

    with client(httpx.MockTransport(handler)) as c, pytest.raises(RegistryProtocolError) as ei:
        c.blob_size("repo", Digest(digest_of(b"blob")))
    assert "Content-Length" in str(ei.value)


def test_a_plausible_content_length_is_the_blob_size() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-length": "1234"})

    with client(httpx.MockTransport(handler)) as c:
        assert c.blob_size("repo", Digest(digest_of(b"blob"))) == 1234
