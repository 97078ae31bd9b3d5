"""What a converted layer's labels say, and the chain of converted layers a snapshot stands on.

containerd's unpacker calls ``Prepare(key, parent, labels)`` for every layer with
``containerd.io/snapshot.ref=<chainID>`` and the layer descriptor's annotations under
``containerd.io/snapshot/`` (DESIGN §6, `snapshotter.labels`). A Prepare whose labels carry our
layer annotations (`blockformat.annotations`) is a `Candidate` for the remote path::

    containerd.io/snapshot/damselfly/*            the converter's annotations (index digest, vsize...)
    containerd.io/snapshot/cri.layer-digest       the blob digest (from CRI or `damselfly rpull`; else
                                                  the converter's .../damselfly/blob-digest annotation;
                                                  for a bottom layer without either, the chain ID, which
                                                  is the blob digest of a converted image's first layer)

Where the blob lives: the registry and repository of ``containerd.io/snapshot/cri.image-ref``, else the
converter's ``.../damselfly/repository`` annotation. Labels that do not parse, or name no source, are a
`FallbackError`: the layer takes the normal path (`snapshotter.remote.snapshots`).

A recorded remote snapshot (`RemoteLayer`) adds ``.../damselfly/source`` and ``.../damselfly/blob-size``.
A snapshot's ancestors split into a `Chain`: plain layers (a ``ctr snapshots commit`` of a container on
a converted image) above converted ones; plain layers may sit above remote ones, never below.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from blockformat.annotations import KEY_FSTYPE, PREFIX, LayerAnnotations
from blockformat.digest import Digest, parse_digest
from blockformat.errors import InvalidArgumentError
from p2p.errors import InvalidReferenceError
from p2p.reference import parse_reference

from ..device.manager import LayerSpec, SourceSpec
from ..errors import ImageError, SnapshotterError
from ..image.spec import device_name
from ..labels import (
    LABEL_BLOB_SIZE,
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_MANIFEST_DIGEST,
    LABEL_SNAPSHOT_REF,
    LABEL_SOURCE,
)
from ..service.records import Layer

log = logging.getLogger(__name__)


class FallbackError(SnapshotterError):
    """Why a converted layer cannot take the remote path; `reason` is the metric label. Raised by the
    label and registry checks and caught by `RemoteSnapshots.claim`, which logs and counts it: it never
    reaches a caller of the service."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why


@dataclass(frozen=True)
class Candidate:
    """A Prepare that names a converted layer, and where its blob should be."""

    ref: str  # the chain ID containerd will look the snapshot up by
    digest: Digest
    annotations: LayerAnnotations
    registry: str
    repository: str

    @property
    def source(self) -> str:
        return f"{self.registry}/{self.repository}"


def is_converted(labels: Mapping[str, str]) -> bool:
    """Whether a Prepare carries any damselfly layer annotation (then it is a remote candidate)."""
    return any(k.startswith(PREFIX) for k in labels)


def is_top_layer(cand: Candidate, labels: Mapping[str, str]) -> bool:
    """Whether the Prepare is of an image's top layer: its ``cri.image-layers`` (the digests from this
    layer up, set by CRI and `damselfly rpull`) names this layer alone."""
    return labels.get(LABEL_IMAGE_LAYERS, "").split(",") == [cand.digest]


def candidate(parent: str, labels: Mapping[str, str]) -> Candidate | None:
    """The converted layer a Prepare names; None for a plain layer; `FallbackError` when it cannot be used."""
    ref = labels.get(LABEL_SNAPSHOT_REF, "")
    if not ref or not is_converted(labels):
        return None
    try:
        ann = LayerAnnotations.from_dict(labels)
    except InvalidArgumentError as e:
        raise FallbackError("labels", f"its damselfly labels do not parse: {e}") from None
    if ann is None:
        raise FallbackError("labels", f"it has damselfly labels but no {PREFIX}index-digest")
    if ann.fstype != "ext4":
        raise FallbackError("labels", f"{KEY_FSTYPE} is {ann.fstype!r}; only ext4 chains can be mounted")
    # The converter records each blob's digest in its own annotations (nerdctl's generic path passes
    # only those); CRI and rpull also pass it as cri.layer-digest.
    digest_text = labels.get(LABEL_LAYER_DIGEST) or ann.blob_digest
    if digest_text is None and not parent:
        # A converted image's diff_ids are its layer digests, so the bottom chain ID is the blob digest.
        digest_text = ref
    if digest_text is None:
        raise FallbackError(
            "labels",
            f"no {LABEL_LAYER_DIGEST} label, so the blob is unknown; pull with `damselfly rpull` (or CRI "
            "with disable_snapshot_annotations = false), which passes it",
        )
    try:
        digest = parse_digest(digest_text)
    except (InvalidReferenceError, InvalidArgumentError) as e:
        raise FallbackError("labels", f"layer digest {digest_text!r}: {e}") from None
    registry = repository = ""
    image_ref = labels.get(LABEL_IMAGE_REF, "")
    if image_ref:
        try:
            r = parse_reference(image_ref)
            registry, repository = r.registry, r.repository
        except InvalidReferenceError as e:
            log.info("layer %s: ignoring %s: %s", ref, LABEL_IMAGE_REF, e)
    if not registry and ann.repository:
        try:
            r = parse_reference(ann.repository)
            registry, repository = r.registry, r.repository
        except InvalidReferenceError as e:
            raise FallbackError("source", f"its repository annotation {ann.repository!r}: {e}") from None
    if not registry:
        raise FallbackError(
            "source",
            f"no source for the blob: neither {LABEL_IMAGE_REF} nor a {PREFIX}repository annotation",
        )
    return Candidate(ref, digest, ann, registry, repository)


@dataclass(frozen=True)
class RemoteLayer:
    """A remote committed snapshot, as its recorded labels describe it."""

    name: str
    digest: Digest
    size: int
    annotations: LayerAnnotations
    registry: str
    repository: str
    #: The image manifest it was pulled with (``cri.manifest-digest``), if the Prepare said.
    manifest: str | None = None

    @classmethod
    def of(cls, layer: Layer) -> RemoteLayer | None:
        """The remote layer `layer` stands for; None for a plain one. Broken labels: `ImageError`."""
        labels = layer.labels
        source = labels.get(LABEL_SOURCE)
        if source is None:
            return None
        where = f"remote snapshot {layer.name!r}"
        registry, _, repository = source.partition("/")
        try:
            ann = LayerAnnotations.from_dict(labels)
            size = int(labels[LABEL_BLOB_SIZE])
            digest = parse_digest(labels[LABEL_LAYER_DIGEST])
        except (InvalidArgumentError, InvalidReferenceError, KeyError, ValueError) as e:
            ann, why = None, str(e)
        else:
            why = "no index digest"
        if ann is None or not repository:
            raise ImageError(
                where,
                f"its labels no longer describe a converted layer ({why})",
                "remove the image and pull it again (were its labels replaced by an Update?)",
            )
        return cls(layer.name, digest, size, ann, registry, repository, labels.get(LABEL_MANIFEST_DIGEST))

    def spec(self, plain_http: bool) -> LayerSpec:
        source = SourceSpec(registry=self.registry, repository=self.repository, plain_http=plain_http or None)
        ann = self.annotations
        return LayerSpec(self.digest, self.size, ann.index_digest, source, ann.vsize, ann.fstype)


@dataclass(frozen=True)
class Chain:
    """What a snapshot stands on: plain layers (nearest first) above a chain of remote ones."""

    plain: tuple[Layer, ...]
    remote: tuple[RemoteLayer, ...]  # bottom to top

    @property
    def name(self) -> str:
        return device_name([x.digest for x in self.remote])


def chain_of(parents: Sequence[Layer]) -> Chain | None:
    """Split a snapshot's ancestors (nearest first); None when none is remote."""
    for i, layer in enumerate(parents):
        first = RemoteLayer.of(layer)
        if first is None:
            continue
        remote = [first]
        for below in parents[i + 1 :]:
            r = RemoteLayer.of(below)
            if r is None:
                raise ImageError(
                    f"snapshot chain {first.name!r}",
                    f"plain layer {below.name!r} lies below the converted layer",
                    "remove the image and pull it again",
                )
            remote.append(r)
        return Chain(tuple(parents[:i]), tuple(reversed(remote)))
    return None
