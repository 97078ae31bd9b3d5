"""Finding a converted image's layers: from an OCI layout directory or a registry reference.

The result is a `DeviceSpec` for the device daemon: the layers bottom to top, each with the blob digest
and size from the manifest, the index digest from our annotations (what every fetched chunk is checked
against), and where to read the blob from.
"""

from __future__ import annotations

import hashlib
import os

from blockformat.chunkfile import MAX_BLOB_SIZE
from p2p.hosts import Resolver
from p2p.manifest import Platform
from p2p.reference import parse_reference

from ..device.manager import DeviceSpec, LayerSpec, SourceSpec
from ..errors import ImageError
from .blockimage import layer_annotations, read_oci_layout
from .ocilayout import is_layout, split_ref


def _split_layout(src: str) -> tuple[str, str | None] | None:
    """`DIR` or `DIR:REF` naming an existing OCI layout directory, else None."""
    path, ref = split_ref(src)
    if os.path.isdir(path) and (ref is None or is_layout(path)):
        return path, ref
    return None


def device_name(digests: list[str], upper: str | None = None) -> str:
    """A stable device name for a chain of layers (and an upper directory, for a writable device)."""
    key = "\n".join(digests) + ("\nupper:" + os.path.abspath(upper) if upper else "")
    return ("rw-" if upper else "img-") + hashlib.sha256(key.encode()).hexdigest()[:32]


def device_spec_for(
    src: str,
    *,
    plain_http: bool = False,
    platform: str = "linux/amd64",
    name: str | None = None,
    upper: str | None = None,
    resolver: Resolver | None = None,
) -> DeviceSpec:
    """The device of image `src` (an OCI layout ``DIR[:REF]`` or a registry reference, resolved through
    `resolver`: default, containerd's hosts.toml tree)."""
    plat = Platform.parse(platform)
    layout = _split_layout(src)
    if layout is not None:
        image = read_oci_layout(layout[0], layout[1])
        manifest = image.manifest
        paths: dict[str, str] = {x.descriptor.digest: os.path.abspath(x.path) for x in image.layers}

        def source(digest: str) -> SourceSpec:
            return SourceSpec(path=paths[digest])

    else:
        ref = parse_reference(src)
        with (resolver or Resolver()).client(ref.registry, True if plain_http else None) as client:
            manifest = client.resolve(ref, plat).manifest

        def source(digest: str) -> SourceSpec:
            return SourceSpec(registry=ref.registry, repository=ref.repository, plain_http=plain_http or None)

    layers: list[LayerSpec] = []
    vsizes = set()
    for i, desc in enumerate(manifest.layers):
        ann = layer_annotations(src, i, desc)
        # The device daemon sizes a layer's cache (a presence bit per fetch unit) by this size.
        if desc.size > MAX_BLOB_SIZE:
            raise ImageError(
                src,
                f"layer {i} ({desc.digest}) declares {desc.size} bytes, more than a damselfly layer "
                f"blob can hold ({MAX_BLOB_SIZE})",
                "the manifest is damaged; re-convert the image",
            )
        vsizes.add(ann.vsize)
        layers.append(
            LayerSpec(desc.digest, desc.size, ann.index_digest, source(desc.digest), ann.vsize, ann.fstype)
        )
    if not layers:
        raise ImageError(src, "the image has no layers")
    if len(vsizes) != 1:
        raise ImageError(src, f"its layers disagree on the device size: {sorted(vsizes)}")
    digests: list[str] = [x.digest for x in layers]
    return DeviceSpec(name or device_name(digests, upper), layers, None, upper)
