"""containerd's label vocabulary, and the labels damselfly records: every label name we read or write.

Snapshot labels (what a ``Prepare`` carries, containerd 1.6)::

    containerd.io/snapshot.ref                  the chain ID the snapshot is to be committed as
                                                (``snapshots.TargetSnapshotLabel``); a remote
                                                snapshotter answers AlreadyExists under that name
    containerd.io/snapshot/...                  a layer descriptor's annotations under this prefix
                                                reach the snapshotter as labels
                                                (``snapshots.FilterInheritedLabels``): ours are
                                                ``containerd.io/snapshot/damselfly/*``
                                                (`blockformat.annotations`)
    containerd.io/snapshot/cri.image-ref        the image reference     } pkg/snapshotters/
    containerd.io/snapshot/cri.manifest-digest  its manifest's digest   } annotations.go: "cri" in
    containerd.io/snapshot/cri.layer-digest     the layer blob's digest } the name, meant for every
    containerd.io/snapshot/cri.image-layers     the digests from this   } client
                                                layer up, comma-separated, as many as fit

Recorded by damselfly on a remote snapshot (`snapshotter.remote.snapshots`)::

    containerd.io/snapshot/damselfly/source     "registry/repository" that served the blob
    containerd.io/snapshot/damselfly/blob-size  the blob's size, from a HEAD request

Content and lease labels (`damselfly rpull`, containerd's garbage collector)::

    containerd.io/gc.ref.content.<key>          this content references that digest (config, l.<i>,
                                                m.<i>: ``images.ChildGCLabels``)
    containerd.io/gc.ref.snapshot.<snapshotter> this config references that snapshot (the top chain)
    containerd.io/gc.expire                     a lease is deleted after this RFC 3339 time
    containerd.io/uncompressed                  a layer blob's diff_id
    containerd.io/distribution.source.<host>    the repository a blob came from

Every label is bounded as containerd's ``labels.Validate`` does: key and value together at most
`MAX_LABEL_SIZE` bytes. The functions below make the labels a client of containerd sets when it
pulls an image (containerd's unpacker and ``images.SetChildrenMappedLabels``; `damselfly rpull`).
"""

from __future__ import annotations

from collections.abc import Sequence

from blockformat.annotations import PREFIX
from p2p.manifest import Descriptor, Index, Manifest
from p2p.reference import Reference

#: containerd's labels.Validate: a label's key plus value, at most this many bytes.
MAX_LABEL_SIZE = 4096

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
#: Descriptor annotations under this prefix reach the snapshotter as labels.
INHERITED_PREFIX = "containerd.io/snapshot/"
LABEL_IMAGE_REF = INHERITED_PREFIX + "cri.image-ref"
LABEL_MANIFEST_DIGEST = INHERITED_PREFIX + "cri.manifest-digest"
LABEL_LAYER_DIGEST = INHERITED_PREFIX + "cri.layer-digest"
LABEL_IMAGE_LAYERS = INHERITED_PREFIX + "cri.image-layers"

LABEL_SOURCE = PREFIX + "source"
LABEL_BLOB_SIZE = PREFIX + "blob-size"

GC_REF_CONTENT = "containerd.io/gc.ref.content."
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
LABEL_GC_EXPIRE = "containerd.io/gc.expire"
LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
LABEL_DISTRIBUTION_SOURCE = "containerd.io/distribution.source."


def image_layers_label(layers: Sequence[Descriptor]) -> str:
    """The comma-separated digests of `layers`, as many as fit in one label (containerd's
    ``getLayers``: skipping some only costs a snapshotter some prefetching)."""
    out = ""
    for d in layers:
        item = d.digest if not out else f",{d.digest}"
        if len(LABEL_IMAGE_LAYERS) + len(out) + len(item) > MAX_LABEL_SIZE:
            break
        out += item
    return out


def snapshot_labels(
    layers: Sequence[Descriptor], i: int, chain_id: str, image_ref: str, manifest_digest: str
) -> dict[str, str]:
    """Labels for the Prepare (and Commit) of layer `i`: the layer's inherited annotations, then the
    ``cri.*`` labels and ``containerd.io/snapshot.ref``."""
    layer = layers[i]
    labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED_PREFIX)}
    labels[LABEL_IMAGE_REF] = image_ref
    labels[LABEL_LAYER_DIGEST] = layer.digest
    labels[LABEL_IMAGE_LAYERS] = image_layers_label(layers[i:])
    labels[LABEL_MANIFEST_DIGEST] = manifest_digest
    labels[LABEL_SNAPSHOT_REF] = chain_id
    return labels


def manifest_gc_labels(manifest: Manifest) -> dict[str, str]:
    """The manifest references its config and layers (``images.ChildGCLabels``)."""
    labels: dict[str, str] = {GC_REF_CONTENT + "config": manifest.config.digest}
    labels.update({f"{GC_REF_CONTENT}l.{i}": d.digest for i, d in enumerate(manifest.layers)})
    return labels


def index_gc_labels(index: Index) -> dict[str, str]:
    """The index references every manifest it lists (those not pulled are simply absent)."""
    return {f"{GC_REF_CONTENT}m.{i}": d.digest for i, d in enumerate(index.manifests)}


def config_gc_labels(snapshotter: str, top_chain_id: str) -> dict[str, str]:
    """The config references the image's top snapshot, which references its parents."""
    return {GC_REF_SNAPSHOT + snapshotter: top_chain_id}


def distribution_source_labels(ref: Reference) -> dict[str, str]:
    """Where a blob came from (containerd's ``docker.AppendDistributionSourceLabel``)."""
    return {LABEL_DISTRIBUTION_SOURCE + ref.registry: ref.repository}
