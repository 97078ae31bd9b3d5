"""Small test images built by code: config + layer blobs + manifest (+ index), pushed with our client."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from blockformat.digest import Digest, digest_of
from p2p.manifest import (
    DEFAULT_PLATFORM,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_index,
    build_manifest,
)
from p2p.registry import RegistryClient


@dataclass(frozen=True)
class TestImage:
    manifest: bytes
    manifest_digest: Digest
    media_type: str
    config: bytes
    layers: tuple[bytes, ...]
    layer_descriptors: tuple[Descriptor, ...]
    config_descriptor: Descriptor
    platform: Platform

    __test__ = False  # not a pytest test class


def make_image(
    layers: list[bytes],
    platform: Platform = DEFAULT_PLATFORM,
    docker: bool = False,
    annotations: dict[str, str] | None = None,
) -> TestImage:
    config_doc = {
        "architecture": platform.architecture,
        "os": platform.os,
        **({"variant": platform.variant} if platform.variant else {}),
        "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
        "config": {"Cmd": ["/bin/true"]},
    }
    config = json.dumps(config_doc, sort_keys=True).encode()
    cdesc = Descriptor(DOCKER_CONFIG if docker else OCI_CONFIG, digest_of(config), len(config))
    ldescs = tuple(
        Descriptor(
            DOCKER_LAYER_GZIP if docker else OCI_LAYER, digest_of(layer), len(layer), annotations or {}
        )
        for layer in layers
    )
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    raw = build_manifest(cdesc, list(ldescs), media_type)
    return TestImage(raw, digest_of(raw), media_type, config, tuple(layers), ldescs, cdesc, platform)


def push_image(
    client: RegistryClient, repository: str, image: TestImage, tag: str | None = "latest"
) -> Digest:
    client.push_blob(repository, image.config)
    for layer in image.layers:
        client.push_blob(repository, layer)
    return client.push_manifest(repository, image.manifest, image.media_type, tag)


def push_multiarch(
    client: RegistryClient, repository: str, images: list[TestImage], tag: str, docker: bool = False
) -> tuple[Digest, bytes]:
    """Push each image by digest, then an index (or Docker manifest list) of them under `tag`."""
    entries = []
    for image in images:
        push_image(client, repository, image, tag=None)
        entries.append(
            Descriptor(image.media_type, image.manifest_digest, len(image.manifest), platform=image.platform)
        )
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    raw = build_index(entries, media_type)
    return client.push_manifest(repository, raw, media_type, tag), raw


def write_oci_layout(path: Path, image: TestImage, tag: str = "latest") -> None:
    """An OCI image layout directory holding `image` (what skopeo reads as ``oci:PATH:TAG``)."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (image.config, image.manifest, *image.layers):
        (blobs / digest_of(data).partition(":")[2]).write_bytes(data)
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    desc = {
        "mediaType": image.media_type,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
