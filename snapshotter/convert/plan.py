"""The images on both sides of a conversion: what of the source converts, and what the result says.

Before anything is converted (`plan`): the platforms chosen from an index (``--platform``, default
linux/amd64; ``all``), each platform's config read as JSON, and every layer checked to be a tar
layer the converter can apply (`snapshotter.convert.layerstream.LAYER_MEDIA_TYPES`, not already a
damselfly layer), with one ``diff_id`` per layer.

After (`converted_documents`): the source config with ``rootfs.diff_ids`` = the new blobs' digests (a
block layer is not a tar, it is its own uncompressed diff; history and runtime config are kept) and
an OCI manifest whose layers are typed `MEDIA_TYPE_LAYER` and carry the
``containerd.io/snapshot/damselfly/`` annotations, and whose own annotations link it to its source
manifest (`SourceLink`); with ``--referrer`` it also names that manifest as its ``subject`` (OCI 1.1)
with ``artifactType`` `IMAGE_ARTIFACT_TYPE`. JSON is written with sorted keys and no spaces, so the
same layers give the same digests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockformat.annotations import (
    IMAGE_ARTIFACT_TYPE,
    MEDIA_TYPE_LAYER,
    MEDIA_TYPES_LAYER,
    LayerAnnotations,
    SourceLink,
)
from blockformat.digest import Digest, digest_of
from p2p.manifest import (
    DEFAULT_PLATFORM,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    build_manifest,
)

from ..errors import ImageError
from .layerstream import LAYER_MEDIA_TYPES
from .sources import ImageSource


@dataclass(frozen=True)
class PlatformPlan:
    """One platform's image to convert: its index entry (None for a single manifest), manifest, config
    and the diff_ids of its layers."""

    desc: Descriptor | None
    manifest: Manifest
    config: dict[str, Any]
    diff_ids: list[str]

    @property
    def label(self) -> str:
        """``os/architecture[/variant]``, for progress and results."""
        if self.desc is None:
            return str(self.config.get("os", "?")) + "/" + str(self.config.get("architecture", "?"))
        p = self.desc.platform
        if p is None:
            return "unknown"
        return f"{p.os}/{p.architecture}" + (f"/{p.variant}" if p.variant else "")


def plan(
    source: ImageSource, top: Manifest | Index, platforms: tuple[str, ...], where: str
) -> list[PlatformPlan]:
    """What to convert, every layer of every chosen platform checked before any is converted."""
    images: list[tuple[Descriptor | None, Manifest]]
    if isinstance(top, Index):
        images = [(d, source.manifest(d)) for d in choose_platforms(top, platforms, where)]
    else:
        images = [(None, top)]
    plans = []
    for desc, manifest in images:
        at = f"{source.name}@{manifest.digest}"
        try:
            config = json.loads(source.read_small(manifest.config, "config"))
        except ValueError as e:
            raise ImageError(at, f"the config is not JSON ({e})", "fix the image config") from None
        if not isinstance(config, dict):
            raise ImageError(at, "the config is not a JSON object", "fix the image config")
        plans.append(PlatformPlan(desc, manifest, config, check_layers(manifest, config, at)))
    return plans


def choose_platforms(index: Index, wanted: tuple[str, ...], where: str) -> list[Descriptor]:
    entries = [d for d in index.manifests if d.platform is not None and d.platform.os != "unknown"]
    if wanted == ("all",):
        if not entries:
            raise ImageError(where, "the index names no platforms", "pass a single-platform image")
        return entries
    chosen: list[Descriptor] = []
    for text in wanted or (str(DEFAULT_PLATFORM),):
        desc = index.select(Platform.parse(text), where)
        if desc not in chosen:
            chosen.append(desc)
    return chosen


def check_layers(manifest: Manifest, config: dict[str, Any], where: str) -> list[str]:
    """The config's diff_ids, after checking every layer can be converted (before converting any)."""
    for i, desc in enumerate(manifest.layers):
        if desc.media_type in MEDIA_TYPES_LAYER:
            raise ImageError(
                where, f"layer {i} ({desc.digest}) is already a damselfly layer", "it is converted"
            )
        if desc.media_type not in LAYER_MEDIA_TYPES:
            raise ImageError(
                where,
                f"layer {i} ({desc.digest}) has unsupported media type {desc.media_type!r}",
                "convert images whose layers are plain, gzip or zstd tars",
            )
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ImageError(where, "the config has no rootfs.diff_ids list", "fix the image config")
    if len(diff_ids) != len(manifest.layers):
        raise ImageError(
            where,
            f"the config lists {len(diff_ids)} diff_ids for {len(manifest.layers)} layers",
            "fix the image config",
        )
    return list(diff_ids)


def converted_documents(
    manifest: Manifest,
    config: dict[str, Any],
    layers: Sequence[tuple[str, int, str, int]],
    vsize: int,
    repository: str | None,
    source: SourceLink | None = None,
    subject: Descriptor | None = None,
) -> tuple[bytes, bytes]:
    """(config, manifest) of the converted image; `layers` are (blob digest, blob size, index digest,
    data size) bottom first, `repository` where the blobs will be (an annotation, or None), `source`
    the source manifest it records (annotations), `subject` the manifest it refers to (``--referrer``:
    the source's, with our ``artifactType``; None writes neither field)."""
    new_config = dict(config)
    new_config["rootfs"] = {"type": "layers", "diff_ids": [digest for digest, *_ in layers]}
    raw_config = json.dumps(new_config, sort_keys=True, separators=(",", ":")).encode()
    config_desc = Descriptor(OCI_CONFIG, digest_of(raw_config), len(raw_config))
    descs = [
        Descriptor(
            MEDIA_TYPE_LAYER,
            Digest(digest),
            size,
            LayerAnnotations(
                index_digest, data_size, vsize, repository=repository, blob_digest=digest
            ).to_dict(),
        )
        for digest, size, index_digest, data_size in layers
    ]
    annotations = {**manifest.annotations, **(source.to_dict() if source is not None else {})}
    raw_manifest = build_manifest(
        config_desc,
        descs,
        OCI_MANIFEST,
        annotations or None,
        subject,
        IMAGE_ARTIFACT_TYPE if subject is not None else None,
    )
    return raw_config, raw_manifest
