"""Image-level annotations of a converted (block) layer, and its media type.

containerd's unpacker passes a layer descriptor's annotations whose keys start with
``containerd.io/snapshot/`` to the snapshotter's ``Prepare`` as labels, so everything a node needs to
mount a layer lazily travels under that prefix (DESIGN §3; normative: docs/format.md §7)::

    containerd.io/snapshot/damselfly/version        "1"            layer format major version
    containerd.io/snapshot/damselfly/index-digest   "sha256:..."   the chunk container's index digest
    containerd.io/snapshot/damselfly/size           "123456"       uncompressed layer data bytes
    containerd.io/snapshot/damselfly/vsize          "68719476736"  virtual device size in bytes
    containerd.io/snapshot/damselfly/fstype         "ext4"         filesystem on the stacked device
    containerd.io/snapshot/damselfly/repository     "host/repo"    where the converter pushed it (optional)
    containerd.io/snapshot/damselfly/blob-digest    "sha256:..."   the layer blob's own digest (optional):
                                                                   containerd passes annotations, not the
                                                                   descriptor's digest, to Prepare

and on the converted image's manifest (image level; containerd passes these to no one, rpull reads
them)::

    containerd.io/snapshot/damselfly/source-digest      "sha256:..."  the source manifest it was
                                                                      converted from (the platform's)
    containerd.io/snapshot/damselfly/source-repository  "host/repo"   where that manifest is (registry
                                                                      sources only)

A converted manifest pushed as a referrer of its source (``convert --referrer``) also carries
``subject`` = the source manifest and ``artifactType`` = `IMAGE_ARTIFACT_TYPE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .digest import SHA256_ONLY, Digest, parse_digest
from .errors import InvalidArgumentError, InvalidDigestError
from .layer import ALIGNMENT, LAYER_MAJOR, MAX_VSIZE

PREFIX = "containerd.io/snapshot/damselfly/"
KEY_VERSION = PREFIX + "version"
KEY_INDEX_DIGEST = PREFIX + "index-digest"
KEY_SIZE = PREFIX + "size"
KEY_VSIZE = PREFIX + "vsize"
KEY_FSTYPE = PREFIX + "fstype"
KEY_REPOSITORY = PREFIX + "repository"
KEY_BLOB_DIGEST = PREFIX + "blob-digest"
KEY_SOURCE_DIGEST = PREFIX + "source-digest"
KEY_SOURCE_REPOSITORY = PREFIX + "source-repository"

#: ``artifactType`` of a converted manifest (and index) pushed as a referrer of its source image:
#: how a lookup of the source's referrers tells a damselfly variant from signatures, SBOMs or traces
#: (overlaybd's converter marks its referrer variants ``application/vnd.containerd.overlaybd.native.v1+json``,
#: nydusify an artifact type of its own, the same way). Only written with ``--referrer``.
IMAGE_ARTIFACT_TYPE = "application/vnd.damselfly.image.v1+json"
#: Longest repository annotation accepted (a reference is at most 255 + host).
MAX_REPOSITORY = 512

#: Media type of a layer blob. It must start with ``application/vnd.oci.image.layer.``: containerd 1.6's
#: unpacker (``unpacker.go``, ``images.IsLayerType``) and the CRI plugin's label wrapper treat only such
#: types (and Docker's tar types) as layers — anything else is fetched in full as plain content and
#: never offered to the snapshotter's Prepare, so a CRI or nerdctl pull would download every block
#: layer and then fail to unpack it. With this prefix each layer is Prepared with its annotations, the
#: snapshotter answers AlreadyExists, and containerd never fetches it (nydus does the same:
#: ``application/vnd.oci.image.layer.nydus.blob.v1``). An OCI registry stores any layer media type.
MEDIA_TYPE_LAYER = "application/vnd.oci.image.layer.damselfly.v1"
#: What damselfly wrote before (still read: `rpull` and `Prepare` go by the annotations).
MEDIA_TYPE_LAYER_V0 = "application/vnd.damselfly.layer.v1"
#: Every media type of a damselfly layer blob.
MEDIA_TYPES_LAYER = (MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V0)


@dataclass(frozen=True)
class LayerAnnotations:
    # Validated (`digest.parse_digest`) when parsed from annotations or labels; typed ``str`` so that
    # writers holding a plain string can build one.
    index_digest: str
    size: int
    vsize: int
    fstype: str = "ext4"
    version: int = LAYER_MAJOR
    repository: str | None = None
    blob_digest: str | None = None

    def to_dict(self) -> dict[str, str]:
        d = {
            KEY_VERSION: str(self.version),
            KEY_INDEX_DIGEST: self.index_digest,
            KEY_SIZE: str(self.size),
            KEY_VSIZE: str(self.vsize),
            KEY_FSTYPE: self.fstype,
        }
        if self.repository:
            d[KEY_REPOSITORY] = self.repository
        if self.blob_digest:
            d[KEY_BLOB_DIGEST] = self.blob_digest
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> LayerAnnotations | None:
        """Parse our annotations (or containerd labels); None if the layer is not a damselfly layer."""
        if KEY_INDEX_DIGEST not in d:
            return None
        version = _number(d, KEY_VERSION, "1")
        vsize = _number(d, KEY_VSIZE)
        size = _number(d, KEY_SIZE)
        if vsize == 0 or vsize % ALIGNMENT or vsize > MAX_VSIZE:
            raise InvalidArgumentError(
                f"damselfly virtual size {vsize} is not a multiple of {ALIGNMENT} from {ALIGNMENT} "
                f"to {MAX_VSIZE}"
            )
        if size > vsize:  # the data extents lie inside the device, without overlapping
            raise InvalidArgumentError(f"damselfly layer size {size} exceeds its virtual size {vsize}")
        if version != LAYER_MAJOR:
            raise InvalidArgumentError(f"damselfly layer format version {version} is not supported")
        idx = _digest(d, KEY_INDEX_DIGEST)
        blob = _digest(d, KEY_BLOB_DIGEST) if KEY_BLOB_DIGEST in d else None
        return cls(idx, size, vsize, d.get(KEY_FSTYPE, "ext4"), version, d.get(KEY_REPOSITORY), blob)


def _digest(d: Mapping[str, str], key: str) -> Digest:
    """The sha256 digest under `key` (the chunk container and our layer blobs use SHA-256 only)."""
    try:
        return parse_digest(d[key], SHA256_ONLY)
    except InvalidDigestError as e:
        raise InvalidDigestError(e.text, f"{e.why} (damselfly layer annotation {key})") from None


#: Longest decimal number accepted in an annotation: 20 digits hold any u64. Values come from a
#: manifest or from containerd labels, so they are checked before ``int`` sees them.
_MAX_DIGITS = 20


def _number(d: Mapping[str, str], key: str, default: str | None = None) -> int:
    """The non-negative decimal number under `key` (`default` when absent, if given)."""
    text = d.get(key, default)
    if text is None:
        raise InvalidArgumentError(f"damselfly layer annotations are incomplete or malformed: no {key}")
    if not (0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()):
        raise InvalidArgumentError(
            f"damselfly layer annotations are incomplete or malformed: {key} is {text[:40]!r}"
            + ("..." if len(text) > 40 else "")
            + f", not a decimal number of at most {_MAX_DIGITS} digits"
        )
    return int(text)


@dataclass(frozen=True)
class SourceLink:
    """Where a converted image came from: its source manifest (the platform's, not an index) and, for a
    registry source, the repository holding it (``host[:port]/path``). rpull falls back to it."""

    digest: Digest
    repository: str | None = None

    def to_dict(self) -> dict[str, str]:
        d = {KEY_SOURCE_DIGEST: str(self.digest)}
        if self.repository:
            d[KEY_SOURCE_REPOSITORY] = self.repository
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> SourceLink | None:
        """The link in a manifest's annotations; None without a source digest (not converted, or by an
        older damselfly). A malformed value is an `InvalidArgumentError` / `InvalidDigestError`."""
        if KEY_SOURCE_DIGEST not in d:
            return None
        try:
            digest = parse_digest(d[KEY_SOURCE_DIGEST])
        except InvalidDigestError as e:
            raise InvalidDigestError(e.text, f"{e.why} (damselfly annotation {KEY_SOURCE_DIGEST})") from None
        repository = d.get(KEY_SOURCE_REPOSITORY)
        if repository is not None and (
            not 0 < len(repository) <= MAX_REPOSITORY
            or not repository.isascii()
            or "/" not in repository
            or any(c.isspace() or c == "@" for c in repository)
        ):
            raise InvalidArgumentError(
                f"damselfly annotation {KEY_SOURCE_REPOSITORY} is {repository[:40]!r}, not host/repository"
            )
        return cls(digest, repository)
