"""Manifest and index parsing, media types, platform selection."""

from __future__ import annotations

import json

import pytest

from blockformat.digest import digest_of
from p2p.errors import (
    InvalidManifestError,
    InvalidReferenceError,
    NoMatchingPlatformError,
    UnsupportedMediaTypeError,
)
from p2p.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    Resolved,
    build_index,
    parse_manifest,
)
from p2p.reference import parse_reference

CFG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"c"), "size": 1}
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(b"l"), "size": 1}


def _entry(platform: Platform | None, tag: bytes, media_type: str = OCI_MANIFEST) -> Descriptor:
    return Descriptor(media_type, digest_of(tag), 10, platform=platform)


def test_media_type_from_field_header_or_shape() -> None:
    doc = {"schemaVersion": 2, "config": CFG, "layers": [LAYER]}
    raw = json.dumps(doc).encode()
    assert parse_manifest(raw, None, "w").media_type == OCI_MANIFEST  # shape
    assert (
        parse_manifest(raw, DOCKER_MANIFEST + "; charset=utf-8", "w").media_type == DOCKER_MANIFEST
    )  # header
    typed = json.dumps({**doc, "mediaType": DOCKER_MANIFEST}).encode()
    m = parse_manifest(typed, OCI_MANIFEST, "w")
    assert isinstance(m, Manifest) and m.media_type == DOCKER_MANIFEST  # the document wins
    assert m.digest == digest_of(typed) and m.layers[0].digest == digest_of(b"l")
    idx = parse_manifest(json.dumps({"schemaVersion": 2, "manifests": []}).encode(), None, "w")
    assert isinstance(idx, Index) and idx.media_type == OCI_INDEX


def test_schema1_and_unknown_types_are_refused() -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="schema 2"):
        parse_manifest(json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), None, "w")
    with pytest.raises(UnsupportedMediaTypeError):
        parse_manifest(json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), None, "w")


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        (b"\xff", "not JSON"),
        ({"schemaVersion": 3}, "schemaVersion"),
        ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}, "config is not an object"),
        ({"schemaVersion": 2, "config": {**CFG, "digest": "sha256:zz"}, "layers": []}, "malformed digest"),
        ({"schemaVersion": 2, "config": {**CFG, "size": -1}, "layers": []}, "no valid size"),
        ({"schemaVersion": 2, "config": CFG, "layers": [{**LAYER, "annotations": {"a": 1}}]}, "annotations"),
        (
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{**CFG, "platform": "linux"}]},
            "platform",
        ),
    ],
)
def test_malformed_manifests_say_what_is_wrong(doc: object, why: str) -> None:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(InvalidManifestError, match=why):
        parse_manifest(raw, None, "https://r/v2/a/manifests/x")


def _index(*entries: Descriptor) -> Index:
    raw = build_index(list(entries), DOCKER_MANIFEST_LIST)
    idx = parse_manifest(raw, None, "w")
    assert isinstance(idx, Index)
    return idx


def test_platform_selection() -> None:
    idx = _index(
        _entry(Platform("unknown", "unknown"), b"attestation"),
        _entry(Platform("linux", "arm", "v6"), b"armv6"),
        _entry(Platform("linux", "arm", "v7"), b"armv7"),
        _entry(Platform("linux", "arm64"), b"arm64"),
        _entry(Platform("linux", "amd64"), b"amd64"),
        _entry(Platform("windows", "amd64"), b"win"),
    )
    assert idx.select(Platform("linux", "amd64")).digest == digest_of(b"amd64")
    assert idx.select(Platform.parse("linux/arm64/v8")).digest == digest_of(b"arm64")  # v8 is arm64's default
    assert idx.select(Platform.parse("linux/arm")).digest == digest_of(b"armv7")  # v7 is arm's default
    assert idx.select(Platform.parse("linux/arm/v6")).digest == digest_of(b"armv6")
    assert idx.select(Platform.parse("windows/amd64")).digest == digest_of(b"win")
    with pytest.raises(NoMatchingPlatformError) as e:
        idx.select(Platform.parse("linux/riscv64"))
    assert e.value.wanted == "linux/riscv64" and "linux/arm/v7" in e.value.available


def test_entry_without_variant_is_a_fallback() -> None:
    idx = _index(_entry(Platform("linux", "arm"), b"arm-any"))
    assert idx.select(Platform.parse("linux/arm/v6")).digest == digest_of(b"arm-any")


@pytest.mark.parametrize("text", ["linux", "linux/", "a/b/c/d", "/amd64"])
def test_bad_platform_strings(text: str) -> None:
    with pytest.raises(InvalidReferenceError):
        Platform.parse(text)


def _resolution() -> tuple[Manifest, Index]:
    raw = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": CFG, "layers": [LAYER]}
    ).encode()
    manifest = parse_manifest(raw, None, "m")
    assert isinstance(manifest, Manifest)
    entry = Descriptor(OCI_MANIFEST, manifest.digest, manifest.size, platform=Platform("linux", "amd64"))
    index = parse_manifest(build_index([entry]), None, "i")
    assert isinstance(index, Index)
    return manifest, index


def test_a_resolution_crosses_processes_as_it_was() -> None:
    manifest, index = _resolution()
    ref = parse_reference(f"example.com/app@{index.digest}")
    got = Resolved.from_json(Resolved(ref, manifest, index).to_json(), Platform("linux", "amd64"), "r")
    assert got == Resolved(ref, manifest, index)


@pytest.mark.parametrize("tamper", ["manifest", "reference", "platform"])
def test_a_resolution_that_does_not_hold_together_is_refused(tamper: str) -> None:
    manifest, index = _resolution()
    ref = parse_reference(f"example.com/app@{index.digest}")
    doc = Resolved(ref, manifest, index).to_json()
    platform = Platform("linux", "amd64")
    if tamper == "manifest":
        doc["manifest"] = doc["manifest"].replace('"layers"', ' "layers"')  # other bytes, other digest
    elif tamper == "reference":
        doc["reference"] = f"example.com/app@{manifest.digest}"
    else:
        platform = Platform("linux", "arm64")
    with pytest.raises((InvalidManifestError, NoMatchingPlatformError)):
        Resolved.from_json(doc, platform, "r")
