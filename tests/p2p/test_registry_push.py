"""Pushing to a real docker-registry: monolithic and chunked uploads, skips, mounts, manifests."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from blockformat.digest import digest_of
from p2p.errors import DigestMismatchError, NotFoundError
from p2p.manifest import OCI_MANIFEST
from p2p.registry import RegistryClient

from .images import make_image, push_image


def test_monolithic_push_then_pull_returns_the_same_bytes(client: RegistryClient, repo: str) -> None:
    data = os.urandom(200_000)
    result = client.push_blob(repo, data)
    assert (result.how, result.digest, result.size) == ("uploaded", digest_of(data), len(data))
    assert client.get_blob(repo, result.digest, result.size) == data


def test_existing_blob_is_not_uploaded_again(client: RegistryClient, repo: str) -> None:
    data = os.urandom(1000)
    assert client.push_blob(repo, data).how == "uploaded"
    assert client.push_blob(repo, data).how == "exists"


@pytest.mark.parametrize("chunk_size", [1, 999, 4096, 100_000])
def test_chunked_push_of_bytes(client: RegistryClient, repo: str, chunk_size: int) -> None:
    data = os.urandom(10_000 if chunk_size > 1 else 7)
    result = client.push_blob(repo, data, chunk_size=chunk_size)
    assert result.how == "uploaded"
    assert client.get_blob(repo, result.digest) == data


def test_push_from_a_file_in_chunks(client: RegistryClient, repo: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(b"header-not-part-of-the-blob" + data)
    with path.open("rb") as f:
        f.seek(len(b"header-not-part-of-the-blob"))
        result = client.push_blob(repo, f, chunk_size=64 * 1024)
    assert (result.digest, result.size) == (digest_of(data), len(data))
    assert client.get_blob(repo, result.digest) == data


def test_empty_blob_push(client: RegistryClient, repo: str) -> None:
    result = client.push_blob(repo, b"")
    assert client.get_blob(repo, result.digest, 0) == b""


def test_cross_repository_mount(client: RegistryClient, repo: str) -> None:
    data = os.urandom(5000)
    source = repo + "-source"
    client.push_blob(source, data)

    result = client.push_blob(repo, data, mount_from=source)

    assert result.how == "mounted"
    assert client.get_blob(repo, result.digest) == data


def test_mount_from_a_repository_without_the_blob_falls_back_to_upload(
    client: RegistryClient, repo: str
) -> None:
    data = os.urandom(5000)
    result = client.push_blob(repo, data, mount_from=repo + "-empty")
    assert result.how == "uploaded"
    assert client.get_blob(repo, result.digest) == data


def test_wrong_digest_is_refused_before_anything_is_sent(client: RegistryClient, repo: str) -> None:
    with pytest.raises(DigestMismatchError) as e:
        client.push_blob(repo, b"abc", digest_of(b"abd"))
    assert e.value.expected == digest_of(b"abd") and e.value.got == digest_of(b"abc")
    assert not client.blob_exists(repo, digest_of(b"abc"))


def test_push_manifest_by_tag_and_by_digest(client: RegistryClient, repo: str) -> None:
    image = make_image([os.urandom(100)])
    client.push_blob(repo, image.config)
    client.push_blob(repo, image.layers[0])

    by_digest = client.push_manifest(repo, image.manifest, OCI_MANIFEST)
    assert by_digest == image.manifest_digest
    with pytest.raises(NotFoundError):
        client.get_manifest(repo, "v2")

    assert client.push_manifest(repo, image.manifest, OCI_MANIFEST, "v2") == image.manifest_digest
    assert client.get_manifest(repo, "v2").raw == image.manifest
    assert client.get_manifest(repo, image.manifest_digest).raw == image.manifest


def test_manifest_push_under_a_wrong_digest_is_refused(client: RegistryClient, repo: str) -> None:
    image = make_image([b"x"])
    with pytest.raises(DigestMismatchError):
        client.push_manifest(repo, image.manifest, OCI_MANIFEST, digest_of(b"something else"))


def test_push_image_whose_blobs_exist_uploads_only_the_manifest(client: RegistryClient, repo: str) -> None:
    image = make_image([os.urandom(100)])
    push_image(client, repo, image, "a")
    results = [client.push_blob(repo, image.config), client.push_blob(repo, io.BytesIO(image.layers[0]))]
    assert [r.how for r in results] == ["exists", "exists"]
