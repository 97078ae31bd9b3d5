"""A converted image's link to its source, and ``convert --referrer`` (docs/convert.md, docs/format.md §7).

Every converted manifest records its source manifest in its annotations (`SourceLink`: the platform
manifest's digest and, for a registry source, its repository), so that a node that cannot serve a
converted layer knows what to pull instead (`damselfly rpull`).

With ``--referrer`` the converted manifest also names that source manifest as its OCI 1.1
``subject``, with ``artifactType`` `IMAGE_ARTIFACT_TYPE`: a node asked for the *source* tag finds the
converted variant of its platform among the referrers of the platform manifest it resolved. The
subject must be in the same repository as the referrer (the referrers API and the referrers tag are
per repository), so the destination must be a tag in the source's repository. A multi-platform
source gives each converted platform manifest its source platform manifest as subject, and the
converted index the source index. A registry without the referrers API (docker-registry 2.8) gets
the referrers tag schema, maintained by `p2p.referrers.list_referrer`.
"""

from __future__ import annotations

from blockformat.annotations import IMAGE_ARTIFACT_TYPE, SourceLink
from blockformat.digest import Digest
from p2p.manifest import Descriptor, Index, Manifest

from ..errors import ConvertError
from .sinks import RegistrySink, Sink
from .sources import ImageSource, RegistrySource


def source_link(source: ImageSource, manifest: Manifest) -> SourceLink:
    """What a converted manifest records of the source manifest it came from."""
    repository = None
    if isinstance(source, RegistrySource):
        repository = f"{source.ref.registry}/{source.ref.repository}"
    return SourceLink(manifest.digest, repository)


def subject_of(doc: Manifest | Index) -> Descriptor:
    """The descriptor a referrer names as its subject."""
    return Descriptor(doc.media_type, doc.digest, len(doc.raw))


def check_referrer(source: ImageSource, sink: Sink) -> RegistrySink:
    """``--referrer`` needs a registry source and a destination tag in the same repository."""
    if not isinstance(source, RegistrySource) or not isinstance(sink, RegistrySink):
        raise ConvertError(
            "--referrer pushes the converted image as an OCI referrer of the source image, so both must "
            f"be in a registry ({source.name} -> {sink.name})",
            "convert registry to registry, or leave --referrer out",
        )
    src, dst = source.ref, sink.ref
    if (src.registry, src.repository) != (dst.registry, dst.repository):
        raise ConvertError(
            f"--referrer: the destination {dst} is not in the source's repository "
            f"{src.registry}/{src.repository}; a referrer is found only in its subject's repository",
            f"push to a tag of {src.registry}/{src.repository} (e.g. {src.registry}/{src.repository}:"
            f"{src.tag or 'latest'}-damselfly)",
        )
    return sink


def list_variants(sink: RegistrySink, pairs: list[tuple[Descriptor, Descriptor]]) -> list[str]:
    """Make each pushed (converted, source) pair findable from the source: per pair, ``api`` or
    ``tag`` (how the registry lists it). The converted entry carries its manifest's annotations."""
    from p2p.referrers import list_referrer  # noqa: PLC0415  # httpx: only for a registry

    repository = sink.ref.repository
    return [
        list_referrer(sink.client, repository, Digest(subject.digest), converted, IMAGE_ARTIFACT_TYPE)
        for converted, subject in pairs
    ]
