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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from blockformat.annotations import IMAGE_ARTIFACT_TYPE
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
from p2p.cache import CachedBlob, Progress
from p2p.errors import CredentialsError
from p2p.hosts import RegistrySettings
from p2p.keychain import entry_from_json
from p2p.manifest import MAX_DOCUMENT_SIZE, Platform, variant_problem
from p2p.node import BlobNode, BlobRef, CacheSettings
from p2p.reference import parse_reference
from p2p.referrers import find_variant
from p2p.settings import P2PSettings

from ..config import DeviceSection
from ..errors import DeviceError
from .fuse import BlockFS
from .prefetch import PrefetchRequest, Recorder, Replay

log = logging.getLogger(__name__)

#: Blobs of one device whose indexes are learned at once.
OPEN_PARALLEL = 8


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
        #: Armed by `damselfly record-trace`: every read is added to it.
        self.recorder: Recorder | None = None
        #: The trace replay of this device, which also counts the reads it served.
        self.replay: Replay | None = None

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
        for i, first, last in self.blob_units(offset, length):
            cached = self._cached[i]
            if (
                cached is not None
                and not cached.complete
                and not all(cached.is_present(u) for u in range(first, last + 1))
            ):
                return False
        return True

    def cached(self, i: int) -> CachedBlob | None:
        """The node-cache blob layer `i` reads through; None for a local file."""
        return self._cached[i]

    def blob_units(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(layer, first unit, last unit) of the node-cache units that hold the stored chunks reading
        [offset, offset+length) of the stack needs, for the layers read through the cache."""
        layers = self.stack.layers
        for i, doff, n in self.stack.layer_ranges(offset, length):
            cached = self._cached[i]
            if cached is None:
                continue
            chunks = cast(LayerReader, layers[i]).chunks
            shift = chunks.chunk_shift
            start, stored = chunks.stored_range(doff >> shift, (doff + n - 1) >> shift)
            if stored > 0:
                u = cached.unit_size
                yield i, start // u, (start + stored - 1) // u

    def read(self, offset: int, length: int) -> bytes:
        return join_parts(self.read_parts(offset, length))

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """`read` as read-only pieces that share memory with decoded chunks (for a vectored reply).

        A chunk that fails its check when it comes from the node cache was damaged on disk: the cache
        forgets it (`CachedBlob.repair`) and the read is tried once more, which fetches it again.

        A recorder armed on the device sees the read; a replay counts the units it needs and, when the
        read waits on the network, gives way to it (`prefetch`)."""
        if self.recorder is not None:
            self.recorder.add(offset, length)
        replay = self.replay
        if replay is None or not replay.watching or not replay.note_read(offset, length):
            return self._read_checked(offset, length)
        replay.foreground(+1)
        try:
            return self._read_checked(offset, length)
        finally:
            replay.foreground(-1)

    def _read_checked(self, offset: int, length: int) -> list[Part]:
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


@dataclass(frozen=True)
class BlobState:
    """What `DeviceManager.blob_states` says of one blob (`snapshotter.device.metrics`)."""

    digest: str
    size: int
    progress: Progress | None  # None: a local file, not read through the node cache
    background: Status | None  # None: no background download (a local file)


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
        registry: RegistrySettings | None = None,
    ) -> None:
        self.settings = settings or DeviceSection(state_dir=state_dir)
        self.state_dir = state_dir
        s = self.settings
        cache = CacheSettings(
            s.unit_size, s.cache_limit, s.fail_cooldown, s.background_delay, float(s.background_rate)
        )
        self.node = BlobNode(os.path.join(state_dir, "cache"), cache, p2p, plain_http, registry)
        self.cache = self.node.cache
        self.fs = BlockFS(read_timeout=s.read_timeout)
        self.fs.on_error = self._read_failed
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._devices: dict[str, tuple[DeviceSpec, ImageDevice]] = {}
        self._recorders: dict[str, Recorder] = {}

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

    def _read_failed(self, kind: str, e: BaseException) -> None:
        """A device read failed (``timeout``: its deadline passed; ``error``): among the last errors."""
        self.node.metrics.errors.add("read-timeout" if kind == "timeout" else "read", "", str(e))

    # -- blobs -----------------------------------------------------------------------------------

    def _open_blobs(self, layers: list[LayerSpec]) -> None:
        """Open every blob of `layers` not open yet, in parallel (learning a layer's index is a round
        trip or two: one after another they would add up on a cold start), and count a reference for
        each layer. All or nothing: on a failure, what was opened here is released. The caller holds
        `_lock`."""
        new: dict[str, LayerSpec] = {x.digest: x for x in layers if x.digest not in self._blobs}
        loaded: dict[str, _Blob] = {}
        errors: list[BaseException] = []
        if len(new) == 1:
            spec = next(iter(new.values()))
            loaded[spec.digest] = self._load_blob(spec)
        elif new:
            with ThreadPoolExecutor(min(len(new), OPEN_PARALLEL), thread_name_prefix="open-blob") as pool:
                futures = {d: pool.submit(self._load_blob, x) for d, x in new.items()}
                for d, f in futures.items():
                    try:
                        loaded[d] = f.result()
                    except BaseException as e:
                        errors.append(e)
            if errors:
                for failed in loaded.values():
                    self._close_blob(failed)
                raise errors[0]
        for d, blob in loaded.items():
            if blob.cached is not None:  # also a complete one: it is re-verified, and repaired if need be
                self.node.start_background(blob.cached)
            self._blobs[d] = blob
        for x in layers:
            self._blobs[x.digest].refs += 1

    def _load_blob(self, spec: LayerSpec) -> _Blob:
        """A blob's source and layer reader (its index learned, perhaps over the network), within a
        read's deadline."""
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
            with deadline.scope(time.monotonic() + self.settings.read_timeout):
                layer = self._open_layer(source, cached, spec.index_digest)
        except BaseException:
            if cached is not None:
                self.node.release(cached)
            elif isinstance(source, FileSource):
                source.close()
            raise
        return _Blob(cached, source, layer)

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
        self._close_blob(blob)

    def _close_blob(self, blob: _Blob) -> None:
        if blob.cached is not None:
            self.node.release(blob.cached)
        elif isinstance(blob.source, FileSource):
            blob.source.close()

    # -- devices ---------------------------------------------------------------------------------

    def attach(self, spec: DeviceSpec, prefetch: PrefetchRequest | None = None) -> str:
        """Expose the device; returns the path of its file. Attaching the same spec again is a no-op.

        With `prefetch`, a read-only device replays its image's trace, if it has one (`prefetch`)."""
        with self._lock:
            existing = self._devices.get(spec.name)
            if existing is not None:
                if existing[0] != spec:
                    raise DeviceError(f"device {spec.name!r} is attached with a different spec")
                return self.fs.path(spec.name)
            self._open_blobs(spec.layers)
            opened = [x.digest for x in spec.layers]
            try:
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
                recorder = self._recorders.get(spec.name)
                if recorder is not None:
                    recorder.layers, recorder.vsize = tuple(opened), device.size
                    device.recorder = recorder
                path = self.fs.attach(spec.name, device)
            except BaseException:
                for d in opened:
                    self._release_blob(d)
                raise
            self._devices[spec.name] = (spec, device)
            log.info("attached %s (%d layers%s)", spec.name, len(layers), ", writable" if upper else "")
            if prefetch is not None and upper is None and device.recorder is None and layers:
                timeout = self.settings.read_timeout
                device.replay = Replay(spec.name, device, opened, self.node, prefetch, timeout).start()
            return path

    def detach(self, name: str) -> None:
        with self._lock:
            entry = self._devices.pop(name, None)
            if entry is None:
                return  # idempotent
            spec, device = entry
            if device.replay is not None:
                device.replay.stop()
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

    def record(self, name: str, seconds: float) -> None:
        """Arm a recorder for device `name` (attached now or later) for `seconds`."""
        recorder = Recorder(name, seconds)
        with self._lock:
            self._recorders[name] = recorder
            entry = self._devices.get(name)
            if entry is not None:
                spec, device = entry
                if device.writable:
                    del self._recorders[name]
                    raise DeviceError(f"device {name!r} is writable: traces are recorded on image chains")
                recorder.layers, recorder.vsize = tuple(x.digest for x in spec.layers), device.size
                device.recorder = recorder
        log.info("recording the reads of device %s for %.0fs", name, seconds)

    def record_stop(self, name: str) -> dict[str, Any]:
        """End the recording of device `name`; the trace (`blockformat.trace.Trace` as JSON) and its
        count of reads."""
        with self._lock:
            recorder = self._recorders.pop(name, None)
            entry = self._devices.get(name)
            if entry is not None and entry[1].recorder is recorder:
                entry[1].recorder = None
        if recorder is None:
            raise DeviceError(f"no recording of device {name!r} is going on")
        trace = recorder.trace()
        log.info(
            "recorded %d reads of device %s: %d ranges, %d bytes",
            recorder.reads,
            name,
            len(trace.ranges),
            trace.total,
        )
        return {"trace": trace.to_json().decode(), "reads": recorder.reads}

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

    def resolve(self, request: dict[str, Any]) -> dict[str, Any]:
        """Resolve an image reference at its registry with the node's client (its connections, its
        credentials): the manifest for a platform and the index it came from (`damselfly rpull`, which
        then need not start an HTTP client of its own). `Resolved.to_json`."""
        try:
            ref = parse_reference(str(request["reference"]))
            platform = Platform.parse(str(request["platform"]))
            plain_http = None if request.get("plain_http") is None else bool(request["plain_http"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"malformed resolve request: {e}") from None
        client, _ = self.node.registry_client(ref.registry, plain_http)
        with deadline.scope(time.monotonic() + self.settings.read_timeout):
            return client.resolve(ref, platform).to_json()

    def variant(self, request: dict[str, Any]) -> dict[str, str] | None:
        """The converted variant (``convert --referrer``) of an image manifest, found among its
        referrers with the node's client (`p2p.referrers.find_variant`): ``{"manifest": text,
        "media_type": ...}``, or None when it has none (`damselfly rpull`)."""
        try:
            ref = parse_reference(str(request["reference"]))
            subject = parse_digest(str(request["subject"]))
            plain_http = None if request.get("plain_http") is None else bool(request["plain_http"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"malformed variant request: {e}") from None
        client, _ = self.node.registry_client(ref.registry, plain_http)
        with deadline.scope(time.monotonic() + self.settings.read_timeout):
            found = find_variant(client, ref.repository, subject, IMAGE_ARTIFACT_TYPE, variant_problem)
        if found is None:
            return None
        return {"manifest": found.raw.decode(), "media_type": found.media_type}

    def credentials(self, request: dict[str, Any]) -> int:
        """Keep the credentials of the request's entries (`p2p.keychain.entry_to_json`) in the node's
        keychain, in memory only: its registry clients ask them first for those repositories (a CRI
        pull's, handed over by `damselfly serve`). Returns how many entries changed. Logs no secret."""
        entries = request.get("entries")
        if not isinstance(entries, list) or len(entries) > self.node.keychain.max_entries:
            raise DeviceError("malformed credentials request: entries must be a list of at most 4096")
        changed = 0
        for entry in entries:
            if not isinstance(entry, dict):
                raise DeviceError("malformed credentials request: an entry is not an object")
            try:
                registry, repository, creds = entry_from_json(entry)
            except CredentialsError as e:
                raise DeviceError(f"malformed credentials request: {e}") from None
            if self.node.keychain.put(registry, repository, creds):
                changed += 1
                log.info("credentials for %s/%s (%s) kept in memory", registry, repository, creds.kind)
        return changed

    def blob_states(self) -> list[BlobState]:
        """Every blob the attached devices read, with its cache progress and background download."""
        out = []
        for digest, blob in list(self._blobs.items()):
            background = self.node.background(digest)
            out.append(
                BlobState(
                    digest,
                    blob.source.size(),
                    None if blob.cached is None else blob.cached.progress(),
                    None if background is None else background.status(),
                )
            )
        return out

    def status(self) -> dict[str, Any]:
        devices = {}
        for name, (spec, device) in list(self._devices.items()):
            devices[name] = {
                "path": self.fs.path(name),
                "size": device.size,
                "writable": device.writable,
                "layers": [x.digest for x in spec.layers],
                "prefetch": None if device.replay is None else device.replay.status(),
                "recording": device.recorder is not None,
            }
        blobs = {}
        for digest, blob in list(self._blobs.items()):
            background: BackgroundDownload | None = self.node.background(digest)
            st: Status | None = background.status() if background else None
            entry: dict[str, Any] = {
                "refs": blob.refs,
                "local": blob.cached is None,
                "size": blob.source.size(),
            }
            if blob.cached is not None:
                p = blob.cached.progress()
                entry.update(
                    present_units=p.present_units,
                    total_units=p.total_units,
                    present_bytes=p.present_bytes,
                    complete=p.complete,
                    upstream_bytes=blob.cached.upstream_bytes,
                    verified=blob.cached.verified,
                    repairs=blob.cached.repairs,
                    limit_partial=self.cache.is_held(blob.cached),
                    **self.node.blob_status(blob.cached),
                )
            if st is not None:
                entry.update(background=st.state.value, failures=st.failures, error=st.error)
            blobs[digest] = entry
        return {
            "devices": devices,
            "blobs": blobs,
            "cache": self.cache.stats(),
            "p2p": self.node.status(),
            "read_timeouts": self.fs.timeouts,
            "read_errors": self.fs.errors,
            "read_fast_failures": self.fs.fast_failures,
            "refused_opens": self.fs.refused_opens,
            "read_stores": self.fs.stores,
            "read_stores_skipped": self.fs.stores_skipped,
            "read_bytes": dict(self.fs.read_bytes),
            "reads": dict(self.fs.reads),
            "slow_reads": self.fs.slow_reads,
            "reads_waiting_long": self.fs.waiting_long(),
            "errors": self.node.metrics.errors.list(),
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
