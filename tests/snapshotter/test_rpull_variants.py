"""Pure logic of converted variants: the converted manifest's source link and subject
(`snapshotter.convert.plan.converted_documents`, `blockformat.annotations.SourceLink`), what counts as
a variant (`p2p.manifest.variant_problem`), and `Puller` choosing the variant of its platform and
falling back to the source when the snapshotter refuses a converted layer — against the stand-ins
of `tests.snapshotter.test_rpull` (real containerd: tests/e2e/test_rpull_referrers.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pytest

from blockformat.annotations import (
    IMAGE_ARTIFACT_TYPE,
    KEY_SOURCE_DIGEST,
    KEY_SOURCE_REPOSITORY,
    MEDIA_TYPE_LAYER,
    SourceLink,
)
from blockformat.digest import Digest
from blockformat.errors import InvalidArgumentError, InvalidDigestError
from p2p.manifest import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    Resolved,
    build_index,
    build_manifest,
    parse_manifest,
    variant_problem,
)
from p2p.reference import Reference, parse_reference
from snapshotter.convert.plan import converted_documents
from snapshotter.errors import ImageError
from snapshotter.remote.rpull import Puller, chain_ids

from .test_rpull import FakeContainerd, sha, tar_layer

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
SRC = parse_reference("registry.example/app:1")


def source_manifest(annotations: dict[str, str] | None = None) -> Manifest:
    config = b'{"rootfs":{"type":"layers","diff_ids":["sha256:' + b"1" * 64 + b'"]}}'
    raw = build_manifest(
        Descriptor(OCI_CONFIG, sha(config), len(config)),
        [Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", sha(b"l"), 1)],
        annotations=annotations,
    )
    doc = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(doc, Manifest)
    return doc


def convert(source: Manifest, subject: Descriptor | None) -> Manifest:
    _, raw = converted_documents(
        source,
        {"rootfs": {"type": "layers", "diff_ids": []}, "os": "linux"},
        [(sha(b"blob"), 4, sha(b"index"), 8192)],
        1 << 30,
        "registry.example/app",
        SourceLink(source.digest, "registry.example/app"),
        subject,
    )
    doc = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(doc, Manifest)
    return doc


# -- the converted manifest ------------------------------------------------------------------------


def test_a_converted_manifest_records_its_source_and_keeps_the_sources_annotations() -> None:
    source = source_manifest({"org.opencontainers.image.version": "1"})
    m = convert(source, None)
    assert m.annotations == {
        "org.opencontainers.image.version": "1",
        KEY_SOURCE_DIGEST: source.digest,
        KEY_SOURCE_REPOSITORY: "registry.example/app",
    }
    # without --referrer: no subject, no artifactType, not even as null
    doc = json.loads(m.raw)
    assert "subject" not in doc and "artifactType" not in doc
    assert m.subject is None and m.artifact_type is None
    assert variant_problem(m) != ""  # so rpull never takes it for a referrer variant


def test_with_referrer_the_subject_is_the_source_manifest_and_the_type_ours() -> None:
    source = source_manifest()
    subject = Descriptor(source.media_type, source.digest, source.size)
    m = convert(source, subject)
    doc = json.loads(m.raw)
    assert doc["subject"] == {"mediaType": OCI_MANIFEST, "digest": source.digest, "size": source.size}
    assert doc["artifactType"] == IMAGE_ARTIFACT_TYPE
    assert m.subject == Descriptor(OCI_MANIFEST, source.digest, source.size)
    assert variant_problem(m) == ""
    # the documents differ only by those two fields
    del doc["subject"], doc["artifactType"]
    assert json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() == convert(source, None).raw


def test_a_converted_index_refers_to_the_source_index_only_when_asked() -> None:
    child = Descriptor(OCI_MANIFEST, sha(b"m"), 10, {}, AMD64)
    subject = Descriptor(OCI_INDEX, sha(b"i"), 20)
    plain = json.loads(build_index([child]))
    assert "subject" not in plain and "artifactType" not in plain
    referring = json.loads(build_index([child], OCI_INDEX, subject, IMAGE_ARTIFACT_TYPE))
    assert referring["subject"]["digest"] == subject.digest
    assert referring["artifactType"] == IMAGE_ARTIFACT_TYPE


def test_variant_problem_names_what_is_wrong() -> None:
    source = source_manifest()
    assert "artifactType" in variant_problem(source)
    raw = build_manifest(
        source.config, list(source.layers), subject=source.config, artifact_type=IMAGE_ARTIFACT_TYPE
    )
    plain_layers = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(plain_layers, Manifest)
    assert "block layers" in variant_problem(plain_layers)


# -- the source link -------------------------------------------------------------------------------


def test_source_link_round_trips_and_is_absent_from_other_manifests() -> None:
    link = SourceLink(sha(b"s"), "registry.example:5000/team/app")
    assert SourceLink.from_dict(link.to_dict()) == link
    assert SourceLink.from_dict(SourceLink(sha(b"s")).to_dict()) == SourceLink(sha(b"s"))
    assert SourceLink.from_dict({"org.opencontainers.image.version": "1"}) is None


@pytest.mark.parametrize(
    "value", ["sha256:abc", "sha256:" + "A" * 64, " sha256:" + "a" * 64, "md5:" + "a" * 32]
)
def test_a_malformed_source_digest_is_refused(value: str) -> None:
    with pytest.raises(InvalidDigestError, match="source-digest"):
        SourceLink.from_dict({KEY_SOURCE_DIGEST: value})


@pytest.mark.parametrize("value", ["", "app", "host/app@sha256:x", "host/a pp", "h/" + "a" * 600])
def test_a_malformed_source_repository_is_refused(value: str) -> None:
    with pytest.raises(InvalidArgumentError, match="source-repository"):
        SourceLink.from_dict({KEY_SOURCE_DIGEST: sha(b"s"), KEY_SOURCE_REPOSITORY: value})


# -- Puller: the variant of its platform, and the fallback -----------------------------------------


@dataclass
class Image:
    manifest: Manifest
    config: bytes
    blobs: dict[str, bytes]
    diff_ids: dict[str, str]  # layer digest -> what Apply reports


def plain_image(platform: Platform, content: bytes) -> Image:
    desc, blob, diff_id = tar_layer(content)
    config = json.dumps(
        {"architecture": platform.architecture, "os": "linux", "rootfs": {"diff_ids": [diff_id]}}
    ).encode()
    raw = build_manifest(Descriptor(OCI_CONFIG, sha(config), len(config)), [desc])
    m = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(m, Manifest)
    return Image(m, config, {desc.digest: blob}, {desc.digest: diff_id})


def converted_image(source: Manifest, content: bytes) -> Image:
    """A converted image of `source` (one block layer), referring to it."""
    blob = b"block:" + content
    ours = {"containerd.io/snapshot/damselfly/index-digest": sha(b"index:" + content)}
    layer = Descriptor(MEDIA_TYPE_LAYER, sha(blob), len(blob), ours)
    config = json.dumps({"rootfs": {"diff_ids": [layer.digest]}}).encode()
    raw = build_manifest(
        Descriptor(OCI_CONFIG, sha(config), len(config)),
        [layer],
        annotations=SourceLink(source.digest, "registry.example/app").to_dict(),
        subject=Descriptor(source.media_type, source.digest, source.size),
        artifact_type=IMAGE_ARTIFACT_TYPE,
    )
    m = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(m, Manifest)
    return Image(m, config, {layer.digest: blob}, {})


@dataclass
class Registry:
    """An index of platform images, and the converted variants listed as their referrers."""

    index: Index
    images: dict[str, Image]  # manifest digest -> image (sources and variants)
    variants: dict[str, Image]  # source manifest digest -> its variant
    downloads: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)  # subjects whose referrers were looked up

    def resolve(self, ref: Reference, platform: Platform) -> Resolved:
        if ref.digest is not None and ref.digest in self.images:
            return Resolved(ref, self.images[ref.digest].manifest)
        entry = self.index.select(platform)
        return Resolved(ref.with_digest(self.index.digest), self.images[entry.digest].manifest, self.index)

    def get_config(self, repository: str, manifest: Manifest) -> bytes:
        return self.images[manifest.digest].config

    def download_blob(self, repository: str, digest: Digest, out: BinaryIO, size: int | None = None) -> int:
        self.downloads.append(digest)
        blob = next(i.blobs[digest] for i in self.images.values() if digest in i.blobs)
        out.write(blob)
        return len(blob)

    def find_variant(self, ref: Reference, manifest: Manifest) -> Manifest | None:
        self.asked.append(manifest.digest)
        variant = self.variants.get(manifest.digest)
        return None if variant is None else variant.manifest


def multi_platform() -> tuple[Registry, FakeContainerd, dict[str, Image]]:
    sources = {"amd64": plain_image(AMD64, b"amd64"), "arm64": plain_image(ARM64, b"arm64")}
    entries = [
        Descriptor(OCI_MANIFEST, s.manifest.digest, s.manifest.size, {}, Platform("linux", arch))
        for arch, s in sources.items()
    ]
    raw = build_index(entries)
    index = parse_manifest(raw, OCI_INDEX, "test")
    assert isinstance(index, Index)
    variants = {s.manifest.digest: converted_image(s.manifest, arch.encode()) for arch, s in sources.items()}
    images = {i.manifest.digest: i for i in [*sources.values(), *variants.values()]}
    diff_ids = {k: v for i in sources.values() for k, v in i.diff_ids.items()}
    return Registry(index, images, variants), FakeContainerd(diff_ids), sources


def pull(registry: Registry, containerd: FakeContainerd, platform: Platform) -> tuple[Any, list[str]]:
    lines: list[str] = []
    puller = Puller(
        containerd,  # type: ignore[arg-type]
        registry,
        report=lines.append,
        variants=registry.find_variant,
    )
    return puller.pull(SRC, platform), lines


@pytest.mark.parametrize("platform", [AMD64, ARM64], ids=str)
def test_the_variant_of_the_pulled_platform_is_taken_under_the_source_name(platform: Platform) -> None:
    registry, containerd, sources = multi_platform()
    source = sources[platform.architecture].manifest
    variant = registry.variants[source.digest].manifest
    containerd.remote = {variant.layers[0].digest}  # the snapshotter takes its block layer

    result, lines = pull(registry, containerd, platform)

    assert registry.asked == [source.digest]  # the platform manifest's referrers, not the index's
    assert result.variant == variant.digest and result.fallback == ""
    assert [x.how for x in result.layers] == ["remote"]
    assert containerd.images == {str(SRC): variant.digest}  # the source's name, the variant's manifest
    assert registry.downloads == []
    assert f"{SRC}: converted variant {variant.digest} ({platform}), a referrer of {source.digest}" in lines


def test_without_a_variant_the_source_is_unpacked() -> None:
    registry, containerd, _ = multi_platform()
    registry.variants = {}
    result, lines = pull(registry, containerd, ARM64)
    assert result.variant == "" and [x.how for x in result.layers] == ["unpacked"]
    assert containerd.images == {str(SRC): registry.index.digest}
    assert any(line.startswith(f"{SRC}: no converted variant") for line in lines), lines


def test_a_refused_variant_layer_falls_back_to_the_source_of_its_platform() -> None:
    registry, containerd, sources = multi_platform()
    source = sources["arm64"]
    # containerd.remote is empty: the snapshotter answers Prepare of the block layer with an active
    # snapshot, as it does when the blob check fails
    result, lines = pull(registry, containerd, ARM64)

    assert result.fallback.startswith("layer 1/1 ") and source.manifest.digest in result.fallback
    assert [x.how for x in result.layers] == ["unpacked"]
    # the image names the source (through its index), whose config's diff_ids are the unpacked chain
    assert containerd.images == {str(SRC): registry.index.digest}
    chain = chain_ids(list(source.diff_ids.values()))[-1]
    assert containerd.snapshots == {chain: "committed"}  # the refused extraction snapshot was removed
    assert len([c for c in containerd.calls if c.startswith("remove extract-")]) == 1
    assert registry.downloads == list(source.blobs)
    (line,) = [x for x in lines if x.startswith("fallback:")]
    assert "damselfly_remote_fallbacks_total" in line and source.manifest.digest in line


def test_a_refused_converted_tag_falls_back_to_the_source_its_annotations_name() -> None:
    registry, containerd, sources = multi_platform()
    source = sources["amd64"]
    variant = registry.variants[source.manifest.digest].manifest
    # the converted tag itself (a single manifest) is pulled
    registry.index = parse_manifest(  # type: ignore[assignment]
        build_index([Descriptor(OCI_MANIFEST, variant.digest, variant.size, {}, AMD64)]), OCI_INDEX, "t"
    )
    result, _ = pull(registry, containerd, AMD64)
    assert result.fallback and containerd.images == {str(SRC): source.manifest.digest}
    assert registry.asked == []  # a converted image's own referrers are not looked up


def test_a_refused_converted_image_without_a_source_fails_with_the_reason() -> None:
    registry, containerd, sources = multi_platform()
    plain = sources["amd64"]
    blob = b"block"
    layer = Descriptor(MEDIA_TYPE_LAYER, sha(blob), len(blob), {"containerd.io/snapshot/damselfly/x": "1"})
    config = json.dumps({"rootfs": {"diff_ids": [layer.digest]}}).encode()
    raw = build_manifest(Descriptor(OCI_CONFIG, sha(config), len(config)), [layer])
    old = parse_manifest(raw, OCI_MANIFEST, "test")
    assert isinstance(old, Manifest)
    registry.images[old.digest] = Image(old, config, {layer.digest: blob}, {})
    registry.index = parse_manifest(  # type: ignore[assignment]
        build_index([Descriptor(OCI_MANIFEST, old.digest, old.size, {}, AMD64)]), OCI_INDEX, "t"
    )
    with pytest.raises(ImageError, match="did not take the converted layer") as e:
        pull(registry, containerd, AMD64)
    assert "names no source" in "".join(getattr(e.value, "__notes__", []))
    assert containerd.images == {} and containerd.lease is None
    assert plain.manifest.digest not in registry.asked
