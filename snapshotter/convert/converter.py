"""`damselfly convert`: an OCI image in, the same image with block layers out (DESIGN §4).

    source (registry / layout / archive) ── top document ── platform manifests (chosen platforms)
        for each platform, each layer bottom to top:
            layer cache hit (same source chain, same options)?  reuse the blob
            else: stream the layer tar (digest-checked, gzip/zstd decoded) into `Ext4LayerBuilder`
                  check its uncompressed digest against the config's diff_id; cache the blob
        config: the source config with ``rootfs.diff_ids`` = the new blobs' digests (a block layer is
                not a tar, it is its own uncompressed diff); history and runtime config kept
        manifest: OCI, layers typed `MEDIA_TYPE_LAYER` with the ``containerd.io/snapshot/damselfly/``
                  annotations
    destination: blobs, configs, platform manifests, then the tag (or index.json entry) — only after
                 every layer of every platform converted, so a failure publishes nothing

Deterministic: the same source and options give the same blobs and manifest digest (see
`ext4layer` for the filesystem side; JSON here is written with sorted keys and no spaces).

Layer reuse: a converted layer is determined by the chain of source layers under and including it
(their diff_ids, as containerd's chain IDs are) and the options that shape the bytes; the cache maps
that key to the blob, so a second image on the same base converts only its new layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from blockformat.annotations import MEDIA_TYPE_LAYER, LayerAnnotations
from blockformat.chunkfile import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT, BlobInfo
from blockformat.durable import private_dir
from blockformat.layer import LAYER_MAJOR
from p2p.digest import Digest
from p2p.manifest import (
    DEFAULT_PLATFORM,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    build_index,
    build_manifest,
)

from ..errors import ConvertError, ImageError, LayerError
from ..image.ocilayout import write_atomic
from .applytar import LAYER_MEDIA_TYPES, open_layer_stream
from .ext4layer import (
    Ext4LayerBuilder,
    FsIdentity,
    LowerBlob,
    private_daemon,
    raise_fd_limit,
    release_mounts,
)
from .sinks import Sink, open_sink
from .sources import ImageSource, open_source

log = logging.getLogger(__name__)

GiB = 1 << 30
CODECS = ("lz4", "zstd", "snappy")
DEFAULT_VSIZE = 64 * GiB
DEFAULT_CACHE_DIR = "/var/cache/damselfly/convert"
#: Bumped when the converter's output for the same input changes (the layer cache key includes it).
CONVERTER_VERSION = 2

NEEDS_ROOT = (
    "damselfly convert needs root: it builds every layer by mounting ext4 on a loop device over a FUSE "
    "block device (mount, losetup and /dev/fuse need CAP_SYS_ADMIN) and recreates the image's owners, "
    "device nodes and trusted.* xattrs exactly"
)


@dataclass(frozen=True)
class ConvertOptions:
    codec: str = "lz4"
    level: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    vsize: int | None = None
    platforms: tuple[str, ...] = ()  # empty: linux/amd64; ("all",): every platform of an index
    plain_http: bool | None = None
    cache_dir: str | None = None
    quiet: bool = True
    oci_layout: bool = False

    def key(self) -> dict[str, Any]:
        """What shapes a converted layer's bytes."""
        return {
            "converter": CONVERTER_VERSION,
            "format": LAYER_MAJOR,
            "codec": self.codec,
            "level": self.level,
            "chunk_size": self.chunk_size,
            "vsize": self.vsize or DEFAULT_VSIZE,
        }


@dataclass
class LayerResult:
    source_digest: str
    source_size: int
    uncompressed_size: int
    blob_digest: str
    blob_size: int
    index_digest: str
    data_size: int
    reused: bool
    seconds: float


@dataclass
class PlatformResult:
    platform: str
    manifest_digest: str
    layers: list[LayerResult] = field(default_factory=list)


@dataclass
class ConvertResult:
    manifest_digest: str  # the top document: the manifest, or the index for an index source
    media_type: str
    platforms: list[PlatformResult]
    destination: str

    @property
    def layers(self) -> list[LayerResult]:
        return [layer for p in self.platforms for layer in p.layers]


#: Called as the conversion goes: ("start", layer label, total bytes) / ("advance", label, bytes) /
#: ("done", label, LayerResult).
Progress = Callable[[str, str, Any], None]


def _no_progress(event: str, label: str, value: Any) -> None:
    pass


# -- the layer cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedLayer:
    path: str
    digest: str
    size: int
    index_digest: str
    uncompressed_size: int  # bytes of the source layer's tar
    data_size: int  # bytes of layer data in the blob (the annotation's size)


class LayerCache:
    """Converted layer blobs by (source chain, options). Files: ``blobs/<hex>``, ``layers/<key>.json``."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.blobs = os.path.join(root, "blobs")
        self.layers = os.path.join(root, "layers")
        # Root's alone: converted layers are images' files, and the work directories under it hold
        # the layer being built, mounted.
        for d in (root, self.blobs, self.layers):
            private_dir(d)

    @staticmethod
    def key(chain: list[str], options: ConvertOptions) -> str:
        doc = json.dumps({"chain": chain, **options.key()}, sort_keys=True).encode()
        return hashlib.sha256(doc).hexdigest()

    def get(self, key: str) -> CachedLayer | None:
        try:
            with open(os.path.join(self.layers, key + ".json"), "rb") as f:
                entry = CachedLayer(**json.loads(f.read()))
        except (OSError, ValueError, TypeError):
            return None
        try:
            if os.path.getsize(entry.path) != entry.size:
                return None
        except OSError:
            return None
        return entry

    def put(self, key: str, blob: str, info: BlobInfo, tar_size: int) -> CachedLayer:
        assert info.blob_digest is not None
        path = os.path.join(self.blobs, info.blob_digest.partition(":")[2])
        if not (os.path.exists(path) and os.path.getsize(path) == info.blob_size):
            os.replace(blob, path)
        entry = CachedLayer(
            path, info.blob_digest, info.blob_size, info.index_digest, tar_size, info.uncompressed_size
        )
        write_atomic(os.path.join(self.layers, key + ".json"), json.dumps(asdict(entry)).encode())
        return entry


# -- checks -----------------------------------------------------------------------------------------


def check_options(options: ConvertOptions) -> None:
    if options.codec not in CODECS:
        raise ConvertError(f"codec {options.codec!r} is not one of lz4, zstd, snappy", "pick one of those")
    cs = options.chunk_size
    if cs & (cs - 1) or not 1 << MIN_CHUNK_SHIFT <= cs <= 1 << MAX_CHUNK_SHIFT:
        raise ConvertError(
            f"chunk size {cs} is not a power of two from {1 << MIN_CHUNK_SHIFT} to {1 << MAX_CHUNK_SHIFT}",
            "pick one (default 65536)",
        )
    if options.vsize is not None and (options.vsize < 64 << 20 or options.vsize % 4096):
        raise ConvertError(
            f"vsize {options.vsize} is under 64 MiB or not 4 KiB aligned", "pick a larger size"
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise ConvertError(
            NEEDS_ROOT, "run it as root, or in a privileged CI job with /dev/fuse and loop devices"
        )


def _platform_of(desc: Descriptor) -> str:
    p = desc.platform
    if p is None:
        return "unknown"
    return f"{p.os}/{p.architecture}" + (f"/{p.variant}" if p.variant else "")


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


def _check_layers(manifest: Manifest, config: dict[str, Any], where: str) -> list[str]:
    """The config's diff_ids, after checking every layer can be converted (before converting any)."""
    for i, desc in enumerate(manifest.layers):
        if desc.media_type == MEDIA_TYPE_LAYER:
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


class _Counting:
    """Counts bytes read (progress) and hashes them (the tar's digest, to check against diff_id)."""

    def __init__(self, raw: Any, on_read: Callable[[int], None] | None = None) -> None:
        self._raw = raw
        self._on_read = on_read
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self.count += len(data)
        self.hash.update(data)
        if self._on_read is not None and data:
            self._on_read(len(data))
        return data


# -- the conversion ---------------------------------------------------------------------------------


class Converter:
    def __init__(self, options: ConvertOptions, progress: Progress | None = None) -> None:
        require_root()
        check_options(options)
        raise_fd_limit()
        self.options = options
        self.progress = progress or _no_progress
        self.cache = LayerCache(options.cache_dir or DEFAULT_CACHE_DIR)

    @contextlib.contextmanager
    def _work_dir(self) -> Iterator[str]:
        work = tempfile.mkdtemp(prefix="work-", dir=self.cache.root)
        try:
            yield work
        finally:
            release_mounts(work)
            shutil.rmtree(work, ignore_errors=True)

    def run(self, src: str, dst: str) -> ConvertResult:
        opts = self.options
        with self._work_dir() as work:
            source = open_source(src, plain_http=opts.plain_http, spool_dir=work)
            try:
                sink = open_sink(dst, plain_http=opts.plain_http, oci_layout=opts.oci_layout)
                try:
                    return self._run(source, sink, work)
                finally:
                    sink.close()
            finally:
                source.close()

    def _run(self, source: ImageSource, sink: Sink, work: str) -> ConvertResult:
        top = source.top()
        images: list[tuple[Descriptor | None, Manifest]]
        if isinstance(top.doc, Index):
            entries = choose_platforms(top.doc, self.options.platforms, top.where)
            images = [(d, source.manifest(d)) for d in entries]
        else:
            images = [(None, top.doc)]
        plans = []
        for desc, manifest in images:
            where = f"{source.name}@{manifest.digest}"
            try:
                config = json.loads(source.read_small(manifest.config, "config"))
            except ValueError as e:
                raise ImageError(where, f"the config is not JSON ({e})", "fix the image config") from None
            if not isinstance(config, dict):
                raise ImageError(where, "the config is not a JSON object", "fix the image config")
            plans.append((desc, manifest, config, _check_layers(manifest, config, where)))

        built: list[tuple[Descriptor | None, PlatformResult, bytes, bytes]] = []
        with private_daemon(os.path.join(work, "devd")) as daemon:
            builder = Ext4LayerBuilder(
                daemon,
                work,
                self.options.vsize or DEFAULT_VSIZE,
                self.options.codec,
                self.options.chunk_size,
                self.options.level,
            )
            for desc, manifest, config, diff_ids in plans:
                label = (
                    _platform_of(desc)
                    if desc is not None
                    else str(config.get("os", "?")) + "/" + str(config.get("architecture", "?"))
                )
                layers = self._convert_layers(source, builder, manifest, diff_ids, label)
                new_config, new_manifest = self._documents(manifest, config, layers, sink.repository)
                result = PlatformResult(label, "", layers)
                built.append((desc, result, new_config, new_manifest))

        # Publish: only now does the destination see anything.
        for _, result, new_config, _ in built:
            for layer in result.layers:
                sink.put_file(self.cache_path(layer.blob_digest), layer.blob_digest, layer.blob_size)
            sink.put_bytes(new_config)
        if isinstance(top.doc, Index):
            children = []
            for desc, result, _, new_manifest in built:
                assert desc is not None
                result.manifest_digest = sink.put_manifest(new_manifest, OCI_MANIFEST)
                children.append(
                    Descriptor(
                        OCI_MANIFEST, Digest(result.manifest_digest), len(new_manifest), {}, desc.platform
                    )
                )
            raw = build_index(children, OCI_INDEX)
            digest = sink.publish(raw, OCI_INDEX)
            return ConvertResult(digest, OCI_INDEX, [b[1] for b in built], sink.name)
        _, result, _, new_manifest = built[0]
        result.manifest_digest = sink.publish(new_manifest, OCI_MANIFEST)
        return ConvertResult(result.manifest_digest, OCI_MANIFEST, [result], sink.name)

    def cache_path(self, digest: str) -> str:
        return os.path.join(self.cache.blobs, digest.partition(":")[2])

    def _convert_layers(
        self,
        source: ImageSource,
        builder: Ext4LayerBuilder,
        manifest: Manifest,
        diff_ids: list[str],
        label: str,
    ) -> list[LayerResult]:
        results: list[LayerResult] = []
        lowers: list[LowerBlob] = []
        identity = FsIdentity.derive(
            json.dumps({"bottom": diff_ids[:1], **self.options.key()}, sort_keys=True)
        )
        n = len(manifest.layers)
        for i, desc in enumerate(manifest.layers):
            started = time.monotonic()
            key = LayerCache.key(diff_ids[: i + 1], self.options)
            name = f"{label} layer {i + 1}/{n} {desc.digest[:19]}"
            cached = self.cache.get(key)
            reused = cached is not None
            if cached is None:
                self.progress("start", name, desc.size)
                cached = self._build(source, builder, desc, diff_ids[i], i, lowers, identity, key, name)
            results.append(
                LayerResult(
                    desc.digest,
                    desc.size,
                    cached.uncompressed_size,
                    cached.digest,
                    cached.size,
                    cached.index_digest,
                    cached.data_size,
                    reused,
                    time.monotonic() - started,
                )
            )
            self.progress("done", name, results[-1])
            lowers.append(LowerBlob(cached.path, cached.digest, cached.size, cached.index_digest))
        return results

    def _build(
        self,
        source: ImageSource,
        builder: Ext4LayerBuilder,
        desc: Descriptor,
        diff_id: str,
        i: int,
        lowers: list[LowerBlob],
        identity: FsIdentity,
        key: str,
        name: str,
    ) -> CachedLayer:
        layer = f"{i} ({desc.digest})"
        out = os.path.join(builder.work_dir, f"layer-{i}.blob")
        with source.open_layer(desc, layer) as blob:
            counted_in = _Counting(blob, lambda k: self.progress("advance", name, k))
            tar = _Counting(open_layer_stream(counted_in, desc.media_type, layer=layer))
            build = builder.build(i, lowers, tar, layer, out, identity)
            blob.drain()
            if not blob.verified:
                raise LayerError(layer, None, "the blob was not read to its end", "report this as a bug")
        got = "sha256:" + tar.hash.hexdigest()
        if got != diff_id:
            raise LayerError(
                layer,
                None,
                f"its uncompressed digest is {got}, the config's diff_id says {diff_id}",
                "the image config does not describe this layer; rebuild the image",
            )
        info = build.info
        log.info(
            "layer %s: %d entries, %d bytes of tar -> %d byte blob (%d inodes changed, %d freed)",
            layer,
            build.stats.entries,
            tar.count,
            info.blob_size,
            build.changed_inodes,
            build.freed_inodes,
        )
        return self.cache.put(key, out, info, tar.count)

    def _documents(
        self, manifest: Manifest, config: dict[str, Any], layers: list[LayerResult], repository: str | None
    ) -> tuple[bytes, bytes]:
        new_config = dict(config)
        new_config["rootfs"] = {"type": "layers", "diff_ids": [x.blob_digest for x in layers]}
        raw_config = json.dumps(new_config, sort_keys=True, separators=(",", ":")).encode()
        config_desc = Descriptor(
            OCI_CONFIG, Digest("sha256:" + hashlib.sha256(raw_config).hexdigest()), len(raw_config)
        )
        vsize = self.options.vsize or DEFAULT_VSIZE
        descs = [
            Descriptor(
                MEDIA_TYPE_LAYER,
                Digest(x.blob_digest),
                x.blob_size,
                LayerAnnotations(
                    x.index_digest, x.data_size, vsize, repository=repository, blob_digest=x.blob_digest
                ).to_dict(),
            )
            for x in layers
        ]
        raw_manifest = build_manifest(config_desc, descs, OCI_MANIFEST, manifest.annotations or None)
        return raw_config, raw_manifest


def convert(src: str, dst: str, options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert image `src` into `dst`; see the module docstring."""
    return Converter(options, progress).run(src, dst)
