"""Devices behind the FUSE files: what an attached device is made of, and who owns its parts.

A device is described by a `DeviceSpec` — its layers, bottom to top (each a blob with its digest,
size, index digest, and where to fetch it), and optionally a writable upper directory. The
`DeviceManager` turns a spec into an `ImageDevice` (a `Stack` of `LayerReader`s, each reading through
the node blob cache, plus the upper), starts a background full download for every registry blob, and
exposes the device through the `BlockFS`. Blobs shared by several devices are opened once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from blockformat.chunkfile import Part, join_parts
from blockformat.digest import Digest, parse_digest
from blockformat.durable import atomic_write
from blockformat.errors import CorruptBlobError
from blockformat.layer import LayerReader
from blockformat.source import FileSource, RangeSource
from blockformat.stack import Stack
from blockformat.upper import WritableUpper
from p2p import deadline
from p2p.background import BackgroundDownload, Status
from p2p.cache import CachedBlob
from p2p.manifest import MAX_DOCUMENT_SIZE
from p2p.node import BlobNode, BlobRef, CacheSettings
from p2p.settings import P2PSettings

from ..config import DeviceSection
from ..errors import DeviceError
from .fuse import BlockFS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceSpec:
    """Where a blob's bytes come from: a local file, or a registry repository."""

    path: str | None = None
    registry: str | None = None
    repository: str | None = None
    plain_http: bool | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.registry is None or self.repository is None):
            raise DeviceError("a layer source is either a local path or a registry and repository")


@dataclass(frozen=True)
class LayerSpec:
    digest: Digest
    size: int
    index_digest: str
    source: SourceSpec
    #: What the image's annotations say of the layer; checked against the layer itself at attach.
    vsize: int | None = None
    fstype: str | None = None


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    layers: list[LayerSpec] = field(default_factory=list)
    vsize: int | None = None  # required when there are no layers
    upper: str | None = None  # directory of a writable upper (created if it does not hold one)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeviceSpec:
        try:
            layers = [
                LayerSpec(
                    parse_digest(x["digest"]),
                    int(x["size"]),
                    x["index_digest"],
                    SourceSpec(**x["source"]),
                    None if x.get("vsize") is None else int(x["vsize"]),
                    None if x.get("fstype") is None else str(x["fstype"]),
                )
                for x in d.get("layers", [])
            ]
            return cls(d["name"], layers, d.get("vsize"), d.get("upper"))
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"malformed device spec: {e}") from None


class ImageDevice:
    """A stack of layers with an optional writable upper, as the FUSE filesystem sees it.

    `cached` holds, per layer of the stack (bottom to top), the node-cache blob it reads through, or
    None for a layer read from a local file."""

    def __init__(
        self, stack: Stack, upper: WritableUpper | None, cached: list[CachedBlob | None] | None = None
    ) -> None:
        self.stack = stack
        self.upper = upper
        self._cached = cached if cached is not None else [None] * len(stack.layers)
        if len(self._cached) != len(stack.layers):
            raise DeviceError(f"{len(self._cached)} cache entries for {len(stack.layers)} layers")
        self._remote = [c for c in self._cached if c is not None]

    @property
    def size(self) -> int:
        return self.stack.vsize

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def is_local(self, offset: int, length: int) -> bool:
        """Whether reading the range cannot wait on the network: every stored chunk it needs is present
        in the node cache (or its layer is a local file). A writable device answers for the whole
        device (its upper decides per read which layer bytes it needs)."""
        if all(c.complete for c in self._remote):
            return True
        if self.upper is not None:
            return False
        layers = self.stack.layers
        for i, doff, n in self.stack.layer_ranges(offset, length):
            cached = self._cached[i]
            if cached is None or cached.complete:
                continue
            chunks = cast(LayerReader, layers[i]).chunks
            shift = chunks.chunk_shift
            start, stored = chunks.stored_range(doff >> shift, (doff + n - 1) >> shift)
            if not cached.units_present(start, stored):
                return False
        return True

    def read(self, offset: int, length: int) -> bytes:
        return join_parts(self.read_parts(offset, length))

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """`read` as read-only pieces that share memory with decoded chunks (for a vectored reply).

        A chunk that fails its check when it comes from the node cache was damaged on disk: the cache
        forgets it (`CachedBlob.repair`) and the read is tried once more, which fetches it again."""
        try:
            return self._read_parts(offset, length)
        except CorruptBlobError as e:
            cached = next((c for c in self._remote if c.name == e.blob), None)
            if cached is None:
                raise
            cached.repair(e.offset)
        return self._read_parts(offset, length)

    def _read_parts(self, offset: int, length: int) -> list[Part]:
        if self.upper is not None:
            return [self.upper.read(offset, length)]
        return self.stack.read_parts(offset, length)

    def chunk_window(self, offset: int, end: int) -> tuple[int, int]:
        """The range around [offset, end) decoded along with it (`Stack.chunk_window`)."""
        if self.upper is not None:
            return offset, end
        return self.stack.chunk_window(offset, end)

    def write(self, offset: int, data: bytes) -> None:
        if self.upper is None:
            raise DeviceError("device is read-only")
        self.upper.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        if self.upper is None:
            raise DeviceError("device is read-only")
        self.upper.trim(offset, length)

    def flush(self) -> None:
        if self.upper is not None:
            self.upper.flush()


@dataclass
class _Blob:
    cached: CachedBlob | None
    source: RangeSource
    layer: LayerReader
    refs: int = 0


class DeviceManager:
    """The devices of a node over its blobs. Where a blob's bytes come from — the cache, peers, the
    registry — and its background download are the node's business (`p2p.node.BlobNode`)."""

    def __init__(
        self,
        state_dir: str,
        settings: DeviceSection | None = None,
        p2p: P2PSettings | None = None,
        plain_http: bool = False,
    ) -> None:
        self.settings = settings or DeviceSection(state_dir=state_dir)
        self.state_dir = state_dir
        s = self.settings
        cache = CacheSettings(
            s.unit_size, s.cache_limit, s.fail_cooldown, s.background_delay, float(s.background_rate)
        )
        self.node = BlobNode(os.path.join(state_dir, "cache"), cache, p2p, plain_http)
        self.cache = self.node.cache
        self.fs = BlockFS(read_timeout=s.read_timeout)
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._devices: dict[str, tuple[DeviceSpec, ImageDevice]] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, mountpoint: str) -> None:
        self.node.start()
        self.fs.mount(mountpoint)
        self.fs.serve()

    def stop(self) -> None:
        for name in list(self._devices):
            try:
                self.detach(name)
            except Exception:
                log.exception("detaching %s at shutdown failed", name)
        self.fs.unmount()
        self.node.close()

    # -- blobs -----------------------------------------------------------------------------------

    def _open_blob(self, spec: LayerSpec) -> _Blob:
        blob = self._blobs.get(spec.digest)
        if blob is None:
            src = spec.source
            cached: CachedBlob | None = None
            source: RangeSource
            if src.path is not None:
                source = FileSource(src.path)
            else:
                ref = BlobRef(spec.digest, spec.size, spec.index_digest, src.registry, src.repository)
                cached = self.node.open(ref, src.plain_http)
                source = cached
            try:
                layer = self._open_layer(source, cached, spec.index_digest)
            except BaseException:
                if cached is not None:
                    self.node.release(cached)
                elif isinstance(source, FileSource):
                    source.close()
                raise
            if cached is not None:  # also a complete one: it is re-verified, and repaired if need be
                self.node.start_background(cached)
            blob = _Blob(cached, source, layer)
            self._blobs[spec.digest] = blob
        blob.refs += 1
        return blob

    @staticmethod
    def _open_layer(source: RangeSource, cached: CachedBlob | None, index_digest: str) -> LayerReader:
        # A sealed cache blob (complete, whole-blob verified in this process, written only by the
        # cache) needs no per-chunk SHA-256 on every read: `CachedBlob.sealed` says why. A local file
        # is not ours and may change under us, so its chunks are checked on every read.
        verified = cached.sealed if cached is not None else None
        try:
            index = None if cached is None else cached.index()  # the cache's, parsed once per blob
            return LayerReader(source, index_digest, index=index, verified=verified)
        except CorruptBlobError as e:
            if cached is None or e.blob != cached.name:
                raise
            cached.repair(e.offset)  # its index or trailer was damaged on disk: fetch them again
            return LayerReader(source, index_digest, index=cached.index(), verified=verified)

    def _release_blob(self, digest: str) -> None:
        blob = self._blobs[digest]
        blob.refs -= 1
        if blob.refs > 0:
            return
        del self._blobs[digest]
        if blob.cached is not None:
            self.node.release(blob.cached)
        elif isinstance(blob.source, FileSource):
            blob.source.close()

    # -- devices ---------------------------------------------------------------------------------

    def attach(self, spec: DeviceSpec) -> str:
        """Expose the device; returns the path of its file. Attaching the same spec again is a no-op."""
        with self._lock:
            existing = self._devices.get(spec.name)
            if existing is not None:
                if existing[0] != spec:
                    raise DeviceError(f"device {spec.name!r} is attached with a different spec")
                return self.fs.path(spec.name)
            opened: list[str] = []
            try:
                for layer in spec.layers:
                    # Learning a layer's index may wait on the network: as long as one read may.
                    with deadline.scope(time.monotonic() + self.settings.read_timeout):
                        self._open_blob(layer)
                    opened.append(layer.digest)
                layers = [self._blobs[d].layer for d in opened]
                _check_annotations(spec, layers)
                stack = Stack(layers, spec.vsize if not layers else None)
                upper = None
                if spec.upper is not None:
                    if os.path.exists(os.path.join(spec.upper, "upper.log")):
                        upper = WritableUpper.open(spec.upper, stack)
                    else:
                        upper = WritableUpper.create(spec.upper, stack.vsize, stack)
                cached = [self._blobs[d].cached for d in opened]
                device = ImageDevice(stack, upper, cached)
                if upper is None and any(x.fstype is not None for x in spec.layers):
                    with deadline.scope(time.monotonic() + self.settings.read_timeout):
                        _check_filesystem(spec, device)
                path = self.fs.attach(spec.name, device)
            except BaseException:
                for d in opened:
                    self._release_blob(d)
                raise
            self._devices[spec.name] = (spec, device)
            log.info("attached %s (%d layers%s)", spec.name, len(layers), ", writable" if upper else "")
            return path

    def detach(self, name: str) -> None:
        with self._lock:
            entry = self._devices.pop(name, None)
            if entry is None:
                return  # idempotent
            spec, device = entry
            self.fs.detach(name)
            if device.upper is not None:
                device.upper.close()
            for layer in spec.layers:
                self._release_blob(layer.digest)
            log.info("detached %s", name)

    def commit(
        self, name: str, out_path: str, codec: str = "lz4", chunk_size: int = 65536, level: int | None = None
    ) -> dict[str, Any]:
        """Seal a writable device's upper into a layer blob at `out_path` (atomically)."""
        with self._lock:
            entry = self._devices.get(name)
        if entry is None:
            raise DeviceError(f"no device {name!r} is attached")
        upper = entry[1].upper
        if upper is None:
            raise DeviceError(f"device {name!r} has no writable upper to commit")
        with atomic_write(out_path) as f:  # whole or not at all, durable with its directory entry
            info = upper.commit(f, codec, chunk_size, level)
        return asdict(info)

    def document(self, request: dict[str, Any]) -> str:
        """Fetch a small whole blob (an image config, for `damselfly rpull`) through the node — its
        document store, its tree, the registry — verified; the path of the node's copy."""
        try:
            ref = BlobRef(
                parse_digest(str(request["digest"])),
                int(request["size"]),
                None,
                str(request["registry"]),
                str(request["repository"]),
                document=True,
            )
            plain_http = None if request.get("plain_http") is None else bool(request["plain_http"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"malformed document request: {e}") from None
        if not 0 < ref.size <= MAX_DOCUMENT_SIZE:
            raise DeviceError(f"a document has 1..{MAX_DOCUMENT_SIZE} bytes, not {ref.size}")
        with deadline.scope(time.monotonic() + self.settings.read_timeout):
            self.node.document(ref, plain_http)
        return self.node.documents.path(ref.digest)

    def status(self) -> dict[str, Any]:
        devices = {}
        for name, (spec, device) in list(self._devices.items()):
            devices[name] = {
                "path": self.fs.path(name),
                "size": device.size,
                "writable": device.writable,
                "layers": [x.digest for x in spec.layers],
            }
        blobs = {}
        for digest, blob in list(self._blobs.items()):
            background: BackgroundDownload | None = self.node.background(digest)
            st: Status | None = background.status() if background else None
            entry: dict[str, Any] = {"refs": blob.refs, "local": blob.cached is None}
            if blob.cached is not None:
                p = blob.cached.progress()
                entry.update(
                    present_units=p.present_units,
                    total_units=p.total_units,
                    complete=p.complete,
                    upstream_bytes=blob.cached.upstream_bytes,
                    verified=blob.cached.verified,
                    repairs=blob.cached.repairs,
                    **self.node.blob_status(blob.cached),
                )
            if st is not None:
                entry.update(background=st.state.value, failures=st.failures, error=st.error)
            blobs[digest] = entry
        return {
            "devices": devices,
            "blobs": blobs,
            "p2p": self.node.status(),
            "read_timeouts": self.fs.timeouts,
            "read_errors": self.fs.errors,
            "read_fast_failures": self.fs.fast_failures,
            "refused_opens": self.fs.refused_opens,
            "read_stores": self.fs.stores,
            "read_stores_skipped": self.fs.stores_skipped,
        }


#: ext4's superblock magic (struct ext4_super_block.s_magic): 0xEF53 at byte 1024 + 56 of the device.
EXT4_MAGIC_AT = 1024 + 56
EXT4_MAGIC = b"\x53\xef"


def _check_annotations(spec: DeviceSpec, layers: list[LayerReader]) -> None:
    """The annotations' virtual size must be the layer's own (the layer blob is what the index digest
    vouches for; the annotation is what the chain checks at Prepare trusted)."""
    for i, (want, layer) in enumerate(zip(spec.layers, layers, strict=True)):
        if want.vsize is not None and want.vsize != layer.vsize:
            raise DeviceError(
                f"device {spec.name}: layer {i} ({want.digest}) is annotated with a virtual size of "
                f"{want.vsize} bytes, but the layer itself is {layer.vsize} bytes; the image's "
                "annotations are wrong: convert it again"
            )
        if want.fstype is not None and want.fstype != "ext4":
            raise DeviceError(
                f"device {spec.name}: layer {i} ({want.digest}) is annotated as a {want.fstype!r} "
                "filesystem; damselfly mounts ext4 only"
            )


def _check_filesystem(spec: DeviceSpec, device: ImageDevice) -> None:
    """A read-only device whose layers say ext4 must hold an ext4 superblock."""
    magic = device.read(EXT4_MAGIC_AT, len(EXT4_MAGIC))
    if magic != EXT4_MAGIC:
        raise DeviceError(
            f"device {spec.name}: the layers are annotated as ext4 but hold no ext4 superblock "
            f"(bytes {magic.hex()} at offset {EXT4_MAGIC_AT}, not {EXT4_MAGIC.hex()}); the image is "
            "not what its annotations say"
        )
