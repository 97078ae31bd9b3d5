"""`damselfly rpull`: pull an image into containerd the way containerd's unpacker would, but let the
snapshotter take converted layers without downloading them (like ``ctr-remote image rpull``).

containerd 1.6's ``ctr image pull`` fetches every layer blob before it unpacks, which defeats a lazy
snapshotter. `Puller.pull` talks to containerd's gRPC API instead (`ContainerdClient`), in this order:

1. a lease (``containerd.io/gc.expire`` = now + `LEASE_TTL`): everything the pull creates or reuses
   (content, ingests, snapshots) is held by it, so containerd's garbage collector takes nothing
   midway; it is deleted at the end, success or not (what only it held is then garbage);
2. the reference is resolved with our `RegistryClient` (index → the platform's manifest), the config
   read and checked (one ``diff_id`` per layer);
3. the layers, bottom to top, as containerd's ``unpacker.go`` does: chain ID (image-spec:
   ``chainID(1) = diffID(1)``, ``chainID(i) = sha256(chainID(i-1) + " " + diffID(i))``); a snapshot
   already named so is reused ("exists"); else ``Prepare(key="extract-<unique> <chainID>",
   parent=chainID(i-1))`` with the layer's ``containerd.io/snapshot/`` annotations (ours included),
   ``containerd.io/snapshot.ref`` = chainID and the ``cri.*`` labels containerd's
   ``snapshotters.AppendInfoHandlerWrapper`` adds. A snapshotter that takes the layer over answers
   ALREADY_EXISTS and containerd records the committed snapshot ("remote"). An active snapshot
   instead means a plain layer (or a snapshotter that fell back): the blob goes into the content
   store, containerd's Diff service applies it onto the snapshot's mounts, the result's digest must be
   the diffID, and the snapshot is committed under the chain ID ("unpacked");
4. the config (``containerd.io/gc.ref.snapshot.<snapshotter>`` = top chain ID), the manifest
   (``containerd.io/gc.ref.content.config``, ``...content.l.<i>``) and the index, if any
   (``...content.m.<i>``) are written into the content store with the GC labels containerd's
   ``images.SetChildrenMappedLabels`` and unpacker set: while the image exists its content and
   snapshots are referenced; after ``ctr image rm`` nothing is, and the GC removes them;
5. the image record ``name`` → the top descriptor (manifest or index), created or re-pointed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import platform as host
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal, Protocol

from blockformat.annotations import MEDIA_TYPES_LAYER, PREFIX, SourceLink
from blockformat.digest import Digest, digest_of
from blockformat.errors import InvalidArgumentError, InvalidDigestError
from p2p.manifest import Descriptor, Index, Manifest, Platform, Resolved
from p2p.reference import Reference, parse_reference

from ..api.containerd.types import descriptor_pb2
from ..errors import ContainerdError, ImageError
from ..labels import (
    LABEL_UNCOMPRESSED,
    config_gc_labels,
    distribution_source_labels,
    index_gc_labels,
    manifest_gc_labels,
    snapshot_labels,
)
from ..units import binary_size
from .containerd import WRITE_CHUNK, ContainerdClient, Mount

#: A lease left by a killed rpull stops protecting its content after this long (containerd's client
#: uses the same for its pulls, ``Client.WithLease``); long enough for any pull to finish.
LEASE_TTL = datetime.timedelta(hours=24)
#: containerd's unpacker tries a colliding extraction key this many times.
PREPARE_ATTEMPTS = 3

How = Literal["remote", "unpacked", "exists"]


# -- pure parts: names and labels ------------------------------------------------------------------


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of every layer (OCI image-spec, "Layer ChainID"): a committed snapshot's name."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else digest_of(f"{out[-1]} {diff_id}".encode()))
    return out


def is_tar_layer(media_type: str) -> bool:
    """Whether containerd's Diff service can apply the layer (containerd's ``images.IsLayerType``, less
    damselfly's own block layers, which containerd counts as layers but cannot apply)."""
    if media_type in MEDIA_TYPES_LAYER:
        return False
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    base = media_type.split("+", 1)[0]
    return base in (
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    )


def unpack_key(chain_id: str) -> str:
    """An extraction key as containerd's unpacker makes them (``snapshots.UnpackKeyFormat``:
    ``extract-<nanoseconds>-<random> <chainID>``); snapshotters recognise unpacks by the prefix."""
    unique = base64.urlsafe_b64encode(os.urandom(3)).decode()
    return f"extract-{time.time_ns() % 1_000_000_000}-{unique} {chain_id}"


def image_name(ref: Reference) -> str:
    """The image record's name: the reference as containerd writes it (``host/repo:tag[@digest]``)."""
    return str(ref)


def host_platform() -> Platform:
    """This machine's platform, containerd's default (``platforms.DefaultSpec``)."""
    machine = host.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm"}.get(machine, machine)
    variant = {"armv7l": "v7", "armv6l": "v6"}.get(machine)
    return Platform("linux", arch, variant)


def diff_ids_of(config: bytes, where: str, layers: int) -> list[str]:
    """The config's ``rootfs.diff_ids``, one per manifest layer."""
    try:
        doc = json.loads(config)
        diff_ids = doc["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as e:
        raise ImageError(where, f"config has no rootfs.diff_ids ({e})") from None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and d.startswith("sha256:") for d in diff_ids
    ):
        raise ImageError(where, "config rootfs.diff_ids is not a list of sha256 digests")
    if len(diff_ids) != layers:
        raise ImageError(
            where, f"{layers} layer(s) in the manifest but {len(diff_ids)} diff_id(s) in the config"
        )
    return diff_ids


def to_pb(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations)
    )


def _short(digest: str) -> str:
    return digest.partition(":")[2][:12]


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(WRITE_CHUNK):
        yield chunk


# -- the pull --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerResult:
    digest: str
    chain_id: str
    how: How
    fetched: int = 0  # bytes of the layer blob downloaded (unpacked layers not yet in the store)


@dataclass
class PullResult:
    name: str
    target: Descriptor
    image: str = ""  # "created" or "updated"
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    variant: str = ""  # the converted variant pulled instead of the reference's manifest (referrers)
    fallback: str = ""  # why the converted image was given up for its source (empty: it was not)


class ConvertedLayerRefusedError(ImageError):
    """The snapshotter answered Prepare of a converted layer with an active snapshot: it fell back (the
    blob is unreachable or gone, the labels unusable...), and containerd cannot unpack a block layer.
    The pull then takes the image's source instead (`Puller`), or fails with this error."""

    def __init__(self, ref: Reference, layer: Descriptor, snapshotter: str) -> None:
        super().__init__(
            f"{ref} layer {layer.digest}",
            f"snapshotter {snapshotter!r} answered Prepare with an active snapshot, so the layer would "
            f"have to be unpacked, but its media type {layer.media_type!r} is not a tar containerd can "
            "apply",
            "the snapshotter did not take the converted layer (see `damselfly serve`'s log for why it "
            "fell back) or is not damselfly; pull the unconverted image instead",
        )
        self.layer = layer
        self.layer_text = f"layer {_short(layer.digest)}"


def is_converted_image(manifest: Manifest) -> bool:
    """Whether a manifest is a converted (damselfly) image: any of its layers is a block layer."""
    return any(x.media_type in MEDIA_TYPES_LAYER for x in manifest.layers)


def _top(manifest: Manifest, index: Index | None) -> Descriptor:
    """What the image record names: the index a manifest was chosen from, else the manifest."""
    if index is not None:
        return Descriptor(index.media_type, index.digest, len(index.raw))
    return Descriptor(manifest.media_type, manifest.digest, manifest.size)


class Registry(Protocol):
    """What a pull asks of a registry (`p2p.registry.RegistryClient`, or the node's device daemon
    resolving for it: `snapshotter.cli.rpull`)."""

    def resolve(self, ref: Reference, platform: Platform) -> Resolved: ...

    def get_config(self, repository: str, manifest: Manifest) -> bytes: ...

    def download_blob(
        self, repository: str, digest: Digest, out: BinaryIO, size: int | None = None
    ) -> int: ...


class Puller:
    """Pulls images through one containerd connection and one registry client; `report` gets each
    output line (``ctr image pull``-like)."""

    def __init__(
        self,
        containerd: ContainerdClient,
        registry: Registry,
        *,
        snapshotter: str = "damselfly",
        report: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.monotonic,
        documents: Callable[[str, Descriptor], bytes] | None = None,
        variants: Callable[[Reference, Manifest], Manifest | None] | None = None,
        registry_for: Callable[[str], Registry] | None = None,
    ) -> None:
        self.containerd = containerd
        self.registry = registry
        #: The converted variant of a plain manifest, found among its referrers (`convert --referrer`),
        #: or None; None here: variants are not looked for.
        self.variants = variants
        #: A client for another registry (where a converted image's source is); None: only `registry`.
        self.registry_for = registry_for
        self.home = ""  # the registry `registry` talks to (the pulled reference's)
        #: Where the image config comes from when not the registry: (repository, descriptor) -> its
        #: verified bytes (the node's peer network: `DeviceClient.document`).
        self.documents = documents
        self.snapshotter = snapshotter
        self.report = report
        self.clock = clock

    def pull(self, ref: Reference, platform: Platform) -> PullResult:
        start = self.clock()
        self.containerd.create_lease(f"damselfly-rpull-{uuid.uuid4().hex[:16]}", LEASE_TTL)
        try:
            result = self._pull(ref, platform)
        except BaseException as e:
            try:
                self.containerd.delete_lease()
            except ContainerdError as late:
                e.add_note(f"also: {late}")
            raise
        self.containerd.delete_lease()
        result.seconds = self.clock() - start
        self.report(f"done: {result.seconds:.2f}s")
        return result

    def _pull(self, ref: Reference, platform: Platform) -> PullResult:
        self._check_snapshotter()
        self.home = ref.registry
        resolved = self.registry.resolve(ref, platform)
        manifest, index = resolved.manifest, resolved.index
        name = image_name(ref)
        self.report(f"{name}: resolved {_top(manifest, index).digest} ({platform})")
        if is_converted_image(manifest):
            try:
                return self._pull_image(ref, name, manifest, index)
            except ConvertedLayerRefusedError as e:
                source = self._source_of(ref, manifest, platform, e)
                return self._fall_back(e, name, *source)
        variant = None
        if self.variants is not None:
            variant = self.variants(ref, manifest)
            if variant is None:
                self.report(f"{name}: no converted variant of {_short(manifest.digest)} for {platform}")
            else:
                self.report(
                    f"{name}: converted variant {variant.digest} ({platform}), a referrer of "
                    f"{manifest.digest}"
                )
        if variant is None:
            return self._pull_image(ref, name, manifest, index)
        try:
            result = self._pull_image(ref, name, variant, None)
        except ConvertedLayerRefusedError as e:
            return self._fall_back(e, name, ref, manifest, index)
        result.variant = variant.digest
        return result

    def _source_of(
        self, ref: Reference, converted: Manifest, platform: Platform, refused: ConvertedLayerRefusedError
    ) -> tuple[Reference, Manifest, None]:
        """The source image a converted manifest names in its annotations (`SourceLink`), resolved by
        digest; the refusal itself when it names none (an image converted by an older damselfly)."""
        try:
            link = SourceLink.from_dict(converted.annotations)
        except (InvalidArgumentError, InvalidDigestError) as e:
            refused.add_note(f"its source annotation is unusable: {e}")
            raise refused from None
        if link is None:
            refused.add_note(
                "the image names no source to fall back to (converted before damselfly recorded it)"
            )
            raise refused
        where = ref if link.repository is None else parse_reference(link.repository)
        source_ref = Reference(where.registry, where.repository, None, link.digest)
        if source_ref.registry != ref.registry and self.registry_for is None:
            refused.add_note(f"its source {source_ref} is in another registry, which this pull cannot reach")
            raise refused
        resolved = self._registry(source_ref).resolve(source_ref, platform)
        if resolved.manifest.digest != link.digest:  # a digest names one manifest, not an index
            refused.add_note(f"its source {source_ref} is an index, not the platform manifest recorded")
            raise refused
        return source_ref, resolved.manifest, None

    def _fall_back(
        self,
        refused: ConvertedLayerRefusedError,
        name: str,
        where: Reference,
        manifest: Manifest,
        index: Index | None,
    ) -> PullResult:
        """Pull the source image instead of the converted one the snapshotter refused a layer of; the
        image record `name` then names the source (its config has the source's diff_ids, which is the
        chain that is unpacked)."""
        self.report(
            f"fallback: {refused.layer_text}: the snapshotter did not take the converted layer (its "
            f"blob is unreachable or unusable; `damselfly serve`'s log says why, "
            f"damselfly_remote_fallbacks_total counts it); pulling the source "
            f"{where.registry}/{where.repository}@{manifest.digest} instead"
        )
        result = self._pull_image(where, name, manifest, index)
        result.fallback = f"{refused.layer_text}: refused; pulled the source {manifest.digest}"
        return result

    def _registry(self, ref: Reference) -> Registry:
        if self.registry_for is None or ref.registry == self.home:
            return self.registry
        return self.registry_for(ref.registry)

    def _pull_image(self, ref: Reference, name: str, manifest: Manifest, index: Index | None) -> PullResult:
        """Unpack `manifest` (from `ref`'s repository) and name it `name` in containerd."""
        registry = self._registry(ref)
        top = _top(manifest, index)
        if self.documents is not None:
            config = self.documents(ref.repository, manifest.config)
        else:
            config = registry.get_config(ref.repository, manifest)
        diff_ids = diff_ids_of(config, f"{ref} config {manifest.config.digest}", len(manifest.layers))
        chains = chain_ids(diff_ids)
        result = PullResult(name, top)
        source = distribution_source_labels(ref)

        for i, layer in enumerate(manifest.layers):
            t0 = self.clock()
            labels = snapshot_labels(manifest.layers, i, chains[i], name, manifest.digest)
            parent = chains[i - 1] if i else ""
            try:
                res = self._unpack(ref, layer, diff_ids[i], chains[i], parent, labels, source)
            except ConvertedLayerRefusedError as e:
                e.layer_text = f"layer {i + 1}/{len(manifest.layers)} {_short(layer.digest)}"
                raise
            result.layers.append(res)
            extra = f", {binary_size(res.fetched)} fetched" if res.fetched else ""
            self.report(
                f"layer {i + 1}/{len(manifest.layers)} {_short(layer.digest)}: {res.how}"
                f"{extra} ({self.clock() - t0:.2f}s)"
            )

        top_chain = chains[-1] if chains else ""
        config_labels = {**source, **(config_gc_labels(self.snapshotter, top_chain) if top_chain else {})}
        self._put_document("config", manifest.config, config, config_labels)
        manifest_desc = Descriptor(manifest.media_type, manifest.digest, manifest.size)
        self._put_document(
            "manifest", manifest_desc, manifest.raw, {**source, **manifest_gc_labels(manifest)}
        )
        if index is not None:
            self._put_document("index", top, index.raw, {**source, **index_gc_labels(index)})
        result.image = self.containerd.put_image(name, to_pb(top))
        self.report(f"image {name}: {result.image} ({top.digest})")
        return result

    # -- snapshots --

    def _check_snapshotter(self) -> None:
        """Fail early, before any download, when containerd does not know the snapshotter."""
        try:
            self.containerd.snapshot_stat(self.snapshotter, "damselfly-rpull-probe")
        except ContainerdError as e:
            raise self._snapshotter_trouble(e) from None

    def _snapshotter_trouble(self, e: ContainerdError) -> ContainerdError:
        name = self.snapshotter
        if e.code == "INVALID_ARGUMENT" and "snapshotter not loaded" in e.detail:
            remedy = (
                f"containerd has no snapshotter {name!r}: register damselfly as a proxy plugin "
                f'([proxy_plugins.{name}] type = "snapshot", address = "/run/damselfly/snapshotter.sock" '
                "in /etc/containerd/config.toml) and restart containerd; see docs/containerd.md"
            )
        elif e.code == "UNAVAILABLE":
            remedy = (
                f"containerd cannot reach the snapshotter {name!r}: start `damselfly serve` "
                f"(systemctl start damselfly) on the socket [proxy_plugins.{name}] names"
            )
        else:
            return e
        return ContainerdError(e.call, e.code, e.detail, remedy)

    def _unpack(
        self,
        ref: Reference,
        layer: Descriptor,
        diff_id: str,
        chain_id: str,
        parent: str,
        labels: Mapping[str, str],
        source: Mapping[str, str],
    ) -> LayerResult:
        c, sn = self.containerd, self.snapshotter
        remote_kind: How = "remote" if any(k.startswith(PREFIX) for k in labels) else "exists"
        try:
            if c.snapshot_stat(sn, chain_id) is not None:
                c.lease_resource(chain_id, f"snapshots/{sn}")
                return LayerResult(layer.digest, chain_id, "exists")
            for _ in range(PREPARE_ATTEMPTS):
                key = unpack_key(chain_id)
                try:
                    mounts = c.prepare(sn, key, parent, labels)
                    break
                except ContainerdError as e:
                    if e.code != "ALREADY_EXISTS":
                        raise
                    # The snapshotter has the layer (it took it over, or another pull committed it);
                    # containerd then records the committed snapshot under the chain ID.
                    if c.snapshot_stat(sn, chain_id) is not None:
                        return LayerResult(layer.digest, chain_id, remote_kind)
            else:
                raise ContainerdError(
                    f"Snapshots.Prepare {chain_id} (snapshotter {sn})",
                    "ALREADY_EXISTS",
                    f"extraction keys collided {PREPARE_ATTEMPTS} times and no snapshot {chain_id} appeared",
                    "retry the pull",
                )
        except ContainerdError as e:
            raise self._snapshotter_trouble(e) from None

        try:
            fetched = self._apply(ref, layer, diff_id, mounts, source)
            try:
                c.commit(sn, chain_id, key, labels)
            except ContainerdError as e:
                if e.code != "ALREADY_EXISTS":
                    raise
                c.remove(sn, key)  # another pull committed the same chain first
                return LayerResult(layer.digest, chain_id, "exists", fetched)
        except BaseException:
            with contextlib.suppress(ContainerdError):
                c.remove(sn, key)
            raise
        c.update_content_labels(layer.digest, {LABEL_UNCOMPRESSED: diff_id})
        return LayerResult(layer.digest, chain_id, "unpacked", fetched)

    def _apply(
        self,
        ref: Reference,
        layer: Descriptor,
        diff_id: str,
        mounts: Sequence[Mount],
        source: Mapping[str, str],
    ) -> int:
        """Apply a plain layer onto the active snapshot's `mounts` through containerd's Diff service;
        returns the bytes fetched from the registry (0 if the blob was already in the content store)."""
        if layer.media_type in MEDIA_TYPES_LAYER:
            raise ConvertedLayerRefusedError(ref, layer, self.snapshotter)
        if not is_tar_layer(layer.media_type):
            raise ImageError(
                f"{ref} layer {layer.digest}",
                f"snapshotter {self.snapshotter!r} answered Prepare with an active snapshot, so the layer "
                f"would have to be unpacked, but its media type {layer.media_type!r} is not a tar "
                "containerd can apply",
                "convert the image, or pull one with OCI/Docker tar layers",
            )
        fetched = self._ensure_blob(ref, layer, source)
        applied = self.containerd.apply(to_pb(layer), mounts)
        if applied.digest != diff_id:
            raise ImageError(
                f"{ref} layer {layer.digest}",
                f"applied, it is {applied.digest}, but the config's diff_id is {diff_id}",
                "the image is corrupt; rebuild it",
            )
        return fetched

    # -- content --

    def _ensure_blob(self, ref: Reference, desc: Descriptor, labels: Mapping[str, str]) -> int:
        """Put a layer blob into the content store unless it is there; the bytes fetched."""
        c = self.containerd
        if c.content_info(desc.digest) is not None:
            c.lease_resource(desc.digest, "content")
            return 0
        with tempfile.TemporaryFile(prefix="damselfly-rpull-") as spool:
            size = self._registry(ref).download_blob(ref.repository, Digest(desc.digest), spool, desc.size)
            written = c.write_content(self._ingest_ref(desc), desc.digest, size, _chunks(spool), labels)
        if not written:
            c.lease_resource(desc.digest, "content")
        return size

    def _put_document(self, what: str, desc: Descriptor, data: bytes, labels: Mapping[str, str]) -> None:
        """Store a config, manifest or index (already verified in memory) with `labels`."""
        c = self.containerd
        stored = c.content_info(desc.digest) is None and c.write_content(
            self._ingest_ref(desc),
            desc.digest,
            len(data),
            (data[i : i + WRITE_CHUNK] for i in range(0, len(data), WRITE_CHUNK)),
            labels,
        )
        if not stored:
            c.lease_resource(desc.digest, "content")
            c.update_content_labels(desc.digest, labels)
        self.report(f"{what:<8} {_short(desc.digest)}: {'stored' if stored else 'exists'}")

    @staticmethod
    def _ingest_ref(desc: Descriptor) -> str:
        # Unique per pull: two pulls of one blob never wait on each other's ingest lock; one that
        # dies leaves an ingest that its lease's expiry lets containerd remove.
        return f"damselfly-rpull-{desc.digest}-{uuid.uuid4().hex[:8]}"
