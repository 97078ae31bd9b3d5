"""Pulling from a real docker-registry: resolve, manifests, configs, blobs, ranges, verification."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from blockformat.digest import Digest, digest_of
from p2p.errors import (
    DigestMismatchError,
    InvalidReferenceError,
    NoMatchingPlatformError,
    NotFoundError,
    RangeResponseError,
    RegistryUnavailableError,
)
from p2p.manifest import (
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
)
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy
from scripts.demolib.registry import free_port

from .conftest import ClientFactory
from .images import make_image, push_image, push_multiarch, write_oci_layout
from .registry_server import RegistryServer
from .servers import RedirectServer

LAYER = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes, no two neighbouring ranges alike


def _corrupt(path: Path, offset: int = 10) -> None:
    """Flip one byte of a blob in the registry's storage (only ever of content unique to one test)."""
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_resolve_tag_returns_the_pushed_oci_manifest(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    image = make_image([LAYER, b"second layer"])
    digest = push_image(client, repo, image, "v1")
    assert digest == image.manifest_digest

    resolved = client.resolve(f"{registry.host}/{repo}:v1")

    assert resolved.index is None
    assert resolved.manifest.digest == digest
    assert resolved.manifest.media_type == OCI_MANIFEST
    assert resolved.manifest.raw == image.manifest
    assert [d.digest for d in resolved.manifest.layers] == [digest_of(LAYER), digest_of(b"second layer")]
    assert resolved.reference.digest == digest
    assert resolved.reference.tag == "v1"


def test_resolve_by_digest_and_fetch_config_and_blobs(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    image = make_image([LAYER])
    digest = push_image(client, repo, image, tag=None)

    resolved = client.resolve(f"{registry.host}/{repo}@{digest}")

    assert resolved.manifest.digest == digest
    config = client.get_config(repo, resolved.manifest)
    assert json.loads(config)["rootfs"]["diff_ids"] == [digest_of(LAYER)]
    layer = resolved.manifest.layers[0]
    assert client.get_blob(repo, layer.digest, layer.size) == LAYER
    assert client.blob_size(repo, layer.digest) == len(LAYER)


def test_docker_schema2_manifest_list_selects_the_platform(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    amd = make_image([b"amd64 layer"], Platform("linux", "amd64"), docker=True)
    arm = make_image([b"arm64 layer"], Platform("linux", "arm64", "v8"), docker=True)
    list_digest, _ = push_multiarch(client, repo, [amd, arm], "multi", docker=True)

    default = client.resolve(f"{registry.host}/{repo}:multi")
    arm64 = client.resolve(f"{registry.host}/{repo}:multi", Platform("linux", "arm64"))

    assert default.index is not None and default.index.media_type == DOCKER_MANIFEST_LIST
    assert default.reference.digest == list_digest
    assert default.manifest.digest == amd.manifest_digest
    assert default.manifest.media_type == DOCKER_MANIFEST
    assert arm64.manifest.digest == arm.manifest_digest
    assert client.get_blob(repo, arm64.manifest.layers[0].digest) == b"arm64 layer"


def test_oci_index_without_the_platform_names_what_is_available(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    arm = make_image([b"a"], Platform("linux", "arm", "v7"))
    s390 = make_image([b"s"], Platform("linux", "s390x"))
    push_multiarch(client, repo, [arm, s390], "idx")

    top = client.get_manifest(repo, "idx")
    assert isinstance(top, Index) and top.media_type == OCI_INDEX
    with pytest.raises(NoMatchingPlatformError) as e:
        client.resolve(f"{registry.host}/{repo}:idx")
    assert "linux/amd64" in str(e.value) and "linux/arm/v7" in str(e.value) and "linux/s390x" in str(e.value)
    assert client.resolve(f"{registry.host}/{repo}:idx", Platform.parse("linux/arm")).manifest.digest == (
        arm.manifest_digest
    )


def test_image_pushed_by_skopeo_resolves(
    client: RegistryClient, registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    image = make_image([LAYER])
    write_oci_layout(tmp_path / "layout", image, "v1")
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
            f"oci:{tmp_path / 'layout'}:v1",
            f"docker://{registry.host}/{repo}:from-skopeo",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )

    resolved = client.resolve(f"{registry.host}/{repo}:from-skopeo")

    # skopeo converted the OCI image to Docker schema 2, gzipping the uncompressed layer on the way.
    assert resolved.manifest.media_type == DOCKER_MANIFEST
    layer = resolved.manifest.layers[0]
    assert layer.media_type == DOCKER_LAYER_GZIP
    assert gzip.decompress(client.get_blob(repo, layer.digest, layer.size)) == LAYER
    config = json.loads(client.get_config(repo, resolved.manifest))
    assert config["rootfs"]["diff_ids"] == [digest_of(LAYER)]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (0, 4096), (1, 255), (65536, 65536), (len(LAYER) - 4, 4), (12345, len(LAYER) - 12345), (5, 0)],
)
def test_ranged_read_returns_exactly_the_requested_bytes(
    client: RegistryClient, repo: str, offset: int, length: int
) -> None:
    digest = client.push_blob(repo, LAYER).digest
    assert client.read_blob_range(repo, digest, offset, length) == LAYER[offset : offset + length]


def test_ranged_read_past_the_end_raises_naming_the_blob_size(client: RegistryClient, repo: str) -> None:
    digest = client.push_blob(repo, LAYER).digest
    with pytest.raises(RangeResponseError) as e:
        client.read_blob_range(repo, digest, len(LAYER) - 10, 20)
    assert f"only {len(LAYER)} bytes" in str(e.value)
    with pytest.raises(RangeResponseError):
        client.read_blob_range(repo, digest, len(LAYER) + 10, 5)


def test_ranged_read_follows_redirects(
    registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    direct = make_client(registry.host)
    digest = direct.push_blob(repo, LAYER).digest
    with RedirectServer(registry.url) as redirector:
        via = make_client(redirector.host)
        assert via.read_blob_range(repo, digest, 1000, 3000) == LAYER[1000:4000]
        assert via.get_blob(repo, digest) == LAYER
        assert redirector.redirects >= 2


def test_corrupt_blob_in_registry_storage_is_rejected_naming_both_digests(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    data = os.urandom(5000)
    digest = client.push_blob(repo, data).digest
    _corrupt(registry.blob_data_path(digest))

    with pytest.raises(DigestMismatchError) as e:
        client.get_blob(repo, digest)

    assert e.value.expected == digest
    assert e.value.got.startswith("sha256:") and e.value.got != digest
    assert digest in str(e.value) and e.value.got in str(e.value) and f"/blobs/{digest}" in str(e.value)


def test_download_blob_streams_to_a_file_and_leaves_nothing_on_mismatch(
    client: RegistryClient, registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    data = os.urandom(1_000_000)  # unique: this test corrupts it in the registry's storage
    digest = client.push_blob(repo, data).digest
    with (tmp_path / "ok").open("w+b") as f:
        assert client.download_blob(repo, digest, f, len(data)) == len(data)
        f.seek(0)
        assert f.read() == data

    _corrupt(registry.blob_data_path(digest), 500_000)
    with (tmp_path / "bad").open("w+b") as f:
        f.write(b"prefix")
        with pytest.raises(DigestMismatchError):
            client.download_blob(repo, digest, f)
        f.seek(0)
        assert f.read() == b"prefix"  # rewound: no unverified byte left behind


def test_wrong_size_is_a_mismatch_even_with_the_right_digest(client: RegistryClient, repo: str) -> None:
    digest = client.push_blob(repo, b"12345").digest
    with pytest.raises(DigestMismatchError) as e:
        client.get_blob(repo, digest, size=4)
    assert e.value.what == "size"


def test_manifest_by_digest_is_verified(client: RegistryClient, registry: RegistryServer, repo: str) -> None:
    image = make_image([os.urandom(16)])  # unique: this test corrupts the manifest in storage
    digest = push_image(client, repo, image)
    _corrupt(registry.blob_data_path(digest), 5)
    with pytest.raises(DigestMismatchError) as e:
        client.get_manifest(repo, digest)
    assert e.value.expected == digest


def test_missing_tag_repository_and_blob_are_not_found(client: RegistryClient, repo: str) -> None:
    push_image(client, repo, make_image([b"x"]))
    with pytest.raises(NotFoundError) as e:
        client.get_manifest(repo, "no-such-tag")
    assert "no-such-tag" in str(e.value) and "MANIFEST_UNKNOWN" in str(e.value)
    with pytest.raises(NotFoundError):
        client.get_manifest("t/never-pushed", "latest")
    with pytest.raises(NotFoundError) as e2:
        client.get_blob(repo, digest_of(b"never pushed"))
    assert e2.value.url.endswith(f"/blobs/{digest_of(b'never pushed')}")


def test_manifest_read_is_typed(client: RegistryClient, repo: str) -> None:
    push_image(client, repo, make_image([b"x"]))
    assert isinstance(client.get_manifest(repo, "latest"), Manifest)


def test_loopback_registry_defaults_to_plain_http(
    registry: RegistryServer, make_client: ClientFactory
) -> None:
    client = make_client(registry.host, plain_http=None)
    assert client.origin.base_url == f"http://{registry.host}"
    client.ping()
    assert RegistryClient("registry.example.com", credentials=lambda h: None).origin.base_url.startswith(
        "https://"
    )


def test_reference_for_another_registry_is_refused(client: RegistryClient) -> None:
    with pytest.raises(InvalidReferenceError):
        client.resolve("docker.io/library/busybox:latest")


def test_unreachable_registry_fails_within_the_retry_budget(make_client: ClientFactory) -> None:
    client = make_client(f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, budget=5, base_delay=0.01))
    with pytest.raises(RegistryUnavailableError) as e:
        client.get_manifest("a/b", "latest")
    assert e.value.attempts == 3
    assert "cannot connect" in str(e.value)


def test_digest_helper_matches_registry(client: RegistryClient, repo: str) -> None:
    data = io.BytesIO(b"file contents " * 1000)
    result = client.push_blob(repo, data)
    assert result.digest == Digest(digest_of(b"file contents " * 1000))
