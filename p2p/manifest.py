"""Image manifests and indexes, OCI and Docker flavours (OCI image-spec v1.1, Docker image manifest v2.2).

Four media types are read; they differ in name, not in the fields we use:

==========================  =======================================================================
kind                        media type
==========================  =======================================================================
manifest (OCI)              ``application/vnd.oci.image.manifest.v1+json``
manifest (Docker schema 2)  ``application/vnd.docker.distribution.manifest.v2+json``
index (OCI)                 ``application/vnd.oci.image.index.v1+json``
index (Docker list)         ``application/vnd.docker.distribution.manifest.list.v2+json``
==========================  =======================================================================

The media type is taken from the document's ``mediaType`` field, else the response's ``Content-Type``,
else guessed from the shape (``manifests`` → index, ``layers`` → manifest), as the OCI spec allows the
field to be absent. Docker schema 1 is refused (signed, unverifiable here, and deprecated since 2017).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blockformat.annotations import IMAGE_ARTIFACT_TYPE, MEDIA_TYPES_LAYER
from blockformat.digest import Digest, digest_of, parse_digest
from blockformat.errors import InvalidDigestError

from .errors import (
    InvalidManifestError,
    InvalidReferenceError,
    NoMatchingPlatformError,
    UnsupportedMediaTypeError,
)
from .reference import Reference, parse_reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: The Accept header for manifest GETs, most preferred first.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
#: The largest manifest, index or image config read into memory, wherever it comes from (a registry, an
#: OCI layout, an archive): a larger descriptor or body is refused before anything is allocated for it.
#: The distribution spec asks registries to accept manifests of at least 4 MiB; real manifests and
#: configs are a few KiB.
MAX_DOCUMENT_SIZE = 4 * 1024 * 1024
#: Descriptor sizes are int64 (image-spec v1.1, descriptor.md).
MAX_DESCRIPTOR_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, as in an index entry's ``platform``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidReferenceError(text, "a platform is os/architecture[/variant], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


DEFAULT_PLATFORM = Platform("linux", "amd64")

# containerd's platforms.Normalize: the variant an architecture has when none is written.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


def _variant(p: Platform) -> str | None:
    return p.variant or _DEFAULT_VARIANT.get(p.architecture)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob or manifest is, how big, and its digest."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        if self.platform is not None:
            plat = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest: a config descriptor and layer descriptors. `raw` holds the exact bytes."""

    media_type: str
    digest: Digest
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: OCI 1.1: the manifest this one refers to (a referrer), and what kind of artifact it is.
    subject: Descriptor | None = None
    artifact_type: str | None = None

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class Index:
    """An image index (manifest list): one manifest descriptor per platform."""

    media_type: str
    digest: Digest
    raw: bytes
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    def select(self, platform: Platform, where: str = "") -> Descriptor:
        """The first manifest for `platform`: same os and architecture, variant equal after defaults.

        An entry without a variant matches any wanted variant only when nothing matches exactly.
        """
        fallback: Descriptor | None = None
        for d in self.manifests:
            p = d.platform
            if p is None or d.media_type not in MANIFEST_TYPES:
                continue
            if (p.os, p.architecture) != (platform.os, platform.architecture):
                continue
            if _variant(p) == _variant(platform):
                return d
            if p.variant is None and fallback is None:
                fallback = d
        if fallback is not None:
            return fallback
        available = [str(d.platform) for d in self.manifests if d.platform is not None]
        raise NoMatchingPlatformError(where or self.digest, str(platform), available)


def _str_map(where: str, value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidManifestError(where, f"{what} is not an object of strings")
    return dict(value)


def parse_descriptor(where: str, value: object, what: str) -> Descriptor:
    """Check and read one descriptor object."""
    if not isinstance(value, dict):
        raise InvalidManifestError(where, f"{what} is not an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidManifestError(where, f"{what} has no mediaType")
    if not isinstance(digest, str):
        raise InvalidManifestError(where, f"{what} has no digest")
    try:
        parsed = parse_digest(digest)
    except InvalidDigestError:
        raise InvalidManifestError(where, f"{what} has a malformed digest {digest!r}") from None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_DESCRIPTOR_SIZE:
        raise InvalidManifestError(where, f"{what} has no valid size")
    platform = None
    raw_platform = value.get("platform")
    if raw_platform is not None:
        if not isinstance(raw_platform, dict):
            raise InvalidManifestError(where, f"{what}.platform is not an object")
        os_, arch, variant = (
            raw_platform.get("os"),
            raw_platform.get("architecture"),
            raw_platform.get("variant"),
        )
        if (
            not isinstance(os_, str)
            or not isinstance(arch, str)
            or not (variant is None or isinstance(variant, str))
        ):
            raise InvalidManifestError(where, f"{what}.platform needs string os and architecture")
        platform = Platform(os_, arch, variant or None)
    urls = value.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise InvalidManifestError(where, f"{what}.urls is not a list of strings")
    annotations = _str_map(where, value.get("annotations"), f"{what}.annotations")
    return Descriptor(media_type, parsed, size, annotations, platform, tuple(urls))


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to: the platform manifest, and the index it was chosen from, if any."""

    reference: Reference  # the input, with the digest of what it resolved to (index digest if an index)
    manifest: Manifest
    index: Index | None = None

    def to_json(self) -> dict[str, Any]:
        """The exact documents (as text: they are JSON), for another process (`from_json`)."""
        return {
            "reference": str(self.reference),
            "manifest": self.manifest.raw.decode(),
            "manifest_type": self.manifest.media_type,
            "index": None if self.index is None else self.index.raw.decode(),
            "index_type": None if self.index is None else self.index.media_type,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], platform: Platform, where: str) -> Resolved:
        """`to_json`'s documents parsed and checked again: the digests, and that the manifest is the
        index's entry for `platform`."""
        try:
            ref = parse_reference(str(d["reference"]))
            manifest = parse_manifest(str(d["manifest"]).encode(), str(d["manifest_type"]), where)
            index = None
            if d.get("index") is not None:
                index = parse_manifest(str(d["index"]).encode(), str(d["index_type"]), where)
        except (KeyError, TypeError, UnicodeError) as e:
            raise InvalidManifestError(where, f"a malformed resolution: {e}") from None
        if not isinstance(manifest, Manifest) or not (index is None or isinstance(index, Index)):
            raise InvalidManifestError(where, "the resolution's manifest and index are of the wrong kinds")
        top = index if index is not None else manifest
        if ref.digest != top.digest:
            raise InvalidManifestError(
                where, f"the reference names {ref.digest}, the document is {top.digest}"
            )
        if index is not None:
            entry = index.select(platform, where)
            if (entry.digest, entry.size) != (manifest.digest, manifest.size):
                raise InvalidManifestError(
                    where, f"the index's entry for {platform} is not {manifest.digest}"
                )
        return cls(ref, manifest, index)


def parse_manifest(
    raw: bytes, content_type: str | None, where: str, digest: Digest | None = None
) -> Manifest | Index:
    """Parse a manifest or index from its exact bytes; `digest` defaults to the sha256 of `raw`."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidManifestError(where, f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InvalidManifestError(where, "the top level is not a JSON object")
    if doc.get("schemaVersion") != 2:
        if doc.get("schemaVersion") == 1:
            raise UnsupportedMediaTypeError(where, "application/vnd.docker.distribution.manifest.v1+json")
        raise InvalidManifestError(where, f"schemaVersion is {doc.get('schemaVersion')!r}, not 2")
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        ct = (content_type or "").split(";", 1)[0].strip()
        if ct in MANIFEST_TYPES + INDEX_TYPES:
            media_type = ct
        elif "manifests" in doc:
            media_type = OCI_INDEX
        elif "layers" in doc:
            media_type = OCI_MANIFEST
        else:
            raise InvalidManifestError(where, "neither a mediaType nor manifests/layers")
    digest = digest or digest_of(raw)
    annotations = _str_map(where, doc.get("annotations"), "annotations")
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise InvalidManifestError(where, "index has no manifests list")
        manifests = tuple(parse_descriptor(where, e, f"manifests[{i}]") for i, e in enumerate(entries))
        return Index(media_type, digest, raw, manifests, annotations)
    if media_type in MANIFEST_TYPES:
        config = parse_descriptor(where, doc.get("config"), "config")
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list):
            raise InvalidManifestError(where, "manifest has no layers list")
        layers = tuple(parse_descriptor(where, e, f"layers[{i}]") for i, e in enumerate(raw_layers))
        subject = None
        if doc.get("subject") is not None:
            subject = parse_descriptor(where, doc["subject"], "subject")
        artifact_type = doc.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise InvalidManifestError(where, "artifactType is not a string")
        return Manifest(media_type, digest, raw, config, layers, annotations, subject, artifact_type)
    raise UnsupportedMediaTypeError(where, media_type)


def build_manifest(
    config: Descriptor,
    layers: list[Descriptor],
    media_type: str = OCI_MANIFEST,
    annotations: Mapping[str, str] | None = None,
    subject: Descriptor | None = None,
    artifact_type: str | None = None,
) -> bytes:
    """Serialise an image manifest (canonical-ish JSON: sorted keys, no spaces) — for push and tests.
    `subject` and `artifact_type` (OCI 1.1) are written only when given."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    _refer(doc, subject, artifact_type)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build_index(
    manifests: list[Descriptor],
    media_type: str = OCI_INDEX,
    subject: Descriptor | None = None,
    artifact_type: str | None = None,
) -> bytes:
    """Serialise an image index whose entries carry their platforms."""
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [d.to_json() for d in manifests]}
    _refer(doc, subject, artifact_type)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _refer(doc: dict[str, Any], subject: Descriptor | None, artifact_type: str | None) -> None:
    if artifact_type:
        doc["artifactType"] = artifact_type
    if subject is not None:  # a referrer names its subject by media type, digest and size only
        doc["subject"] = {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}


def variant_problem(manifest: Manifest) -> str:
    """Why `manifest` is not a damselfly variant (``convert --referrer``) of its subject; "" if it is:
    our artifact type, and every layer a damselfly block layer."""
    if manifest.artifact_type != IMAGE_ARTIFACT_TYPE:
        return f"its artifactType is {manifest.artifact_type!r}, not {IMAGE_ARTIFACT_TYPE!r}"
    if not manifest.layers or any(x.media_type not in MEDIA_TYPES_LAYER for x in manifest.layers):
        return "its layers are not all damselfly block layers"
    return ""
