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
from dataclasses import asdict, dataclass, field
from typing import Any

from blockformat.chunkfile import Part
from blockformat.layer import LayerReader
from blockformat.source import FileSource, RangeSource
from blockformat.stack import Stack
from blockformat.upper import WritableUpper
from p2p.background import BackgroundDownload, Status
from p2p.blobsource import RegistryBlobSource
from p2p.cache import DEFAULT_UNIT_SIZE, BlobCache, CachedBlob
from p2p.digest import Digest, parse_digest
from p2p.registry import RegistryClient

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
    digest: str
    size: int
    index_digest: str
    source: SourceSpec


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
                LayerSpec(x["digest"], int(x["size"]), x["index_digest"], SourceSpec(**x["source"]))
                for x in d.get("layers", [])
            ]
            return cls(d["name"], layers, d.get("vsize"), d.get("upper"))
        except (KeyError, TypeError, ValueError) as e:
            raise DeviceError(f"malformed device spec: {e}") from None


@dataclass(frozen=True)
class Settings:
    read_timeout: float = 30.0
    unit_size: int = DEFAULT_UNIT_SIZE
    cache_limit_bytes: int = 0
    background_delay: float = 5.0
    background_rate: float = 0.0  # bytes/s, 0 = unlimited
    background_concurrency: int = 2


class ImageDevice:
    """A stack of layers with an optional writable upper, as the FUSE filesystem sees it."""

    def __init__(
        self, stack: Stack, upper: WritableUpper | None, cached: list[CachedBlob] | None = None
    ) -> None:
        self.stack = stack
        self.upper = upper
        self._cached = cached or []  # the layers that come through the node cache (not local files)

    @property
    def size(self) -> int:
        return self.stack.vsize

    @property
    def writable(self) -> bool:
        return self.upper is not None

    @property
    def local(self) -> bool:
        return all(c.complete for c in self._cached)

    def read(self, offset: int, length: int) -> bytes:
        if self.upper is not None:
            return self.upper.read(offset, length)
        return self.stack.read(offset, length)

    def read_parts(self, offset: int, length: int) -> list[Part]:
        """`read` as read-only pieces that share memory with decoded chunks (for a vectored reply)."""
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
    background: BackgroundDownload | None
    refs: int = 0


class DeviceManager:
    def __init__(self, state_dir: str, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.state_dir = state_dir
        self.cache = BlobCache(
            os.path.join(state_dir, "cache"), self.settings.unit_size, self.settings.cache_limit_bytes
        )
        self.fs = BlockFS(read_timeout=self.settings.read_timeout)
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._devices: dict[str, tuple[DeviceSpec, ImageDevice]] = {}
        self._clients: dict[tuple[str, bool | None], RegistryClient] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, mountpoint: str) -> None:
        self.fs.mount(mountpoint)
        self.fs.serve()

    def stop(self) -> None:
        for name in list(self._devices):
            try:
                self.detach(name)
            except Exception:
                log.exception("detaching %s at shutdown failed", name)
        self.fs.unmount()
        for client in self._clients.values():
            client.close()

    # -- blobs -----------------------------------------------------------------------------------

    def _client(self, registry: str, plain_http: bool | None) -> RegistryClient:
        key = (registry, plain_http)
        if key not in self._clients:
            self._clients[key] = RegistryClient(registry, plain_http=plain_http)
        return self._clients[key]

    def _open_blob(self, spec: LayerSpec) -> _Blob:
        blob = self._blobs.get(spec.digest)
        if blob is None:
            src = spec.source
            cached: CachedBlob | None = None
            background = None
            source: RangeSource
            if src.path is not None:
                source = FileSource(src.path)
            else:
                assert src.registry is not None and src.repository is not None
                upstream = RegistryBlobSource(
                    self._client(src.registry, src.plain_http), src.repository, Digest(spec.digest), spec.size
                )
                cached = self.cache.open(spec.digest, spec.size, upstream, spec.index_digest)
                source = cached
            # A sealed cache blob (complete, whole-blob verified, written only by the cache) needs no
            # per-chunk SHA-256 on every read: `CachedBlob.sealed` says why. A local file is not ours
            # and may change under us, so its chunks are checked on every read.
            layer = LayerReader(source, spec.index_digest, verified=cached.sealed if cached else None)
            if cached is not None and not cached.complete:
                s = self.settings
                background = BackgroundDownload(
                    cached, s.background_delay, s.background_rate, s.background_concurrency
                ).start()
            blob = _Blob(cached, source, layer, background)
            self._blobs[spec.digest] = blob
        blob.refs += 1
        return blob

    def _release_blob(self, digest: str) -> None:
        blob = self._blobs[digest]
        blob.refs -= 1
        if blob.refs > 0:
            return
        del self._blobs[digest]
        if blob.background is not None:
            blob.background.stop()
        if blob.cached is not None:
            self.cache.release(blob.cached)
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
            for layer in spec.layers:
                parse_digest(layer.digest)
            opened: list[str] = []
            try:
                for layer in spec.layers:
                    self._open_blob(layer)
                    opened.append(layer.digest)
                layers = [self._blobs[d].layer for d in opened]
                stack = Stack(layers, spec.vsize if not layers else None)
                upper = None
                if spec.upper is not None:
                    if os.path.exists(os.path.join(spec.upper, "upper.log")):
                        upper = WritableUpper.open(spec.upper, stack)
                    else:
                        upper = WritableUpper.create(spec.upper, stack.vsize, stack)
                cached = [c for c in (self._blobs[d].cached for d in opened) if c is not None]
                device = ImageDevice(stack, upper, cached)
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
        tmp = out_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                info = upper.commit(f, codec, chunk_size, level)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return asdict(info)

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
            st: Status | None = blob.background.status() if blob.background else None
            entry: dict[str, Any] = {"refs": blob.refs, "local": blob.cached is None}
            if blob.cached is not None:
                p = blob.cached.progress()
                entry.update(
                    present_units=p.present_units,
                    total_units=p.total_units,
                    complete=p.complete,
                    upstream_bytes=blob.cached.upstream_bytes,
                )
            if st is not None:
                entry.update(background=st.state.value, failures=st.failures, error=st.error)
            blobs[digest] = entry
        return {
            "devices": devices,
            "blobs": blobs,
            "read_timeouts": self.fs.timeouts,
            "read_errors": self.fs.errors,
            "read_fast_failures": self.fs.fast_failures,
            "read_stores": self.fs.stores,
            "read_stores_skipped": self.fs.stores_skipped,
        }
