"""`damselfly convert`: an OCI image in, the same image with block layers out (DESIGN §4).

    source (registry / layout / archive) ── top document ── platform manifests (chosen platforms)
        for each platform (up to --jobs side by side, `fanout`), each layer bottom to top:
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
`ext4layer` for the filesystem side, `plan` for the documents). What is read and checked before any
layer converts, and what the result's config and manifest say: `plan`. Layer reuse: `layercache`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blockformat.annotations import IMAGE_ARTIFACT_TYPE
from blockformat.chunkfile import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT
from blockformat.digest import Digest
from blockformat.layer import LAYER_MAJOR
from blockformat.trace import TRACE_MEDIA_TYPE, Trace
from p2p.hosts import RegistrySettings, Resolver
from p2p.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, Index, Manifest, build_index, parse_manifest

from ..errors import ConvertError, LayerError
from . import fanout
from .ext4layer import (
    Ext4LayerBuilder,
    FsIdentity,
    LowerBlob,
    check_interrupted,
    private_daemon,
    raise_fd_limit,
    release_mounts,
)
from .layercache import DEFAULT_LIMIT, CachedLayer, LayerCache
from .layerstream import ReadAhead, check_diff_id, open_layer_stream
from .plan import PlatformPlan, converted_documents, plan
from .referrer import check_referrer, list_variants, source_link, subject_of
from .sinks import RegistrySink, Sink, open_sink
from .sources import ImageSource, open_source

log = logging.getLogger(__name__)

GiB = 1 << 30
CODECS = ("lz4", "zstd", "snappy")
DEFAULT_VSIZE = 64 * GiB
DEFAULT_CACHE_DIR = "/var/cache/damselfly/convert"
DEFAULT_CACHE_LIMIT = DEFAULT_LIMIT
#: Bumped when the converter's output for the same input changes (the layer cache key includes it).
CONVERTER_VERSION = 4

NEEDS_ROOT = (
    "damselfly convert needs root: it builds every layer by mounting ext4 on a loop device over a local "
    "image file (mount and losetup need CAP_SYS_ADMIN) and recreates the image's owners, "
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
    #: Bytes the cache directory's layers may take (0: no limit; `layercache`).
    cache_limit: int = DEFAULT_CACHE_LIMIT
    quiet: bool = True
    oci_layout: bool = False
    #: Paths and globs in the image whose blocks nodes fetch first (`prefetchfiles`).
    prefetch_files: tuple[str, ...] = ()
    #: Push each converted manifest as an OCI 1.1 referrer of its source manifest (`referrer`).
    referrer: bool = False
    #: How registries are reached (hosts.toml mirrors, TLS, proxies); not part of the output's key.
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    #: Platforms converted side by side (None: `default_jobs`; 1: one after another). Not part of the
    #: output's key: the output is the same whatever it is (`fanout`).
    jobs: int | None = None

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
    trace: Trace | None = None  # --prefetch-files, resolved
    trace_digest: str = ""  # the referrer that carries it
    source_digest: str = ""  # the source manifest it was converted from (its annotations say so)
    listed: str = ""  # --referrer: how the registry lists it among the source's referrers ("api", "tag")


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


def _one_at_a_time(progress: Progress) -> Progress:
    """`progress`, called by one thread at a time: every platform converting and each one's read-ahead
    thread report, and a callback (a dict of bars, a console) need not be thread-safe itself."""
    lock = threading.Lock()

    def serialized(event: str, label: str, value: Any) -> None:
        with lock:
            progress(event, label, value)

    return serialized


def default_jobs(platforms: int) -> int:
    """Platforms converted side by side when --jobs is not given: one per two CPUs this process may run
    on, at most one per platform, at least one.

    One platform's conversion keeps about two CPUs busy: its applier, pinned to one, and beside it the
    read-ahead (digest, inflate, tar hash) and the seal's compression pool (`docs/convert.md`, "How it
    is fast"); more platforms than half the CPUs would only queue behind each other, while each holds
    its own images in the page cache."""
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(platforms, cpus // 2))


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
    if options.cache_limit < 0:
        raise ConvertError(
            f"cache limit {options.cache_limit} is negative", "give a size like 10G, or 0 for none"
        )
    if options.jobs is not None and options.jobs < 1:
        raise ConvertError(
            f"jobs {options.jobs} is under 1", "give how many platforms to convert at once (1: one by one)"
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise ConvertError(NEEDS_ROOT, "run it as root, or in a privileged CI job with loop devices")


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
        self.progress = _one_at_a_time(progress or _no_progress)
        self.cache = LayerCache(options.cache_dir or DEFAULT_CACHE_DIR, options.cache_limit)

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
        with self.cache.in_use(), self._work_dir() as work:
            resolver = Resolver(opts.registry)
            source = open_source(src, plain_http=opts.plain_http, spool_dir=work, resolver=resolver)
            try:
                sink = open_sink(
                    dst, plain_http=opts.plain_http, oci_layout=opts.oci_layout, resolver=resolver
                )
                try:
                    return self._run(source, sink, work)
                finally:
                    sink.close()
            finally:
                source.close()

    def _run(self, source: ImageSource, sink: Sink, work: str) -> ConvertResult:
        top = source.top()
        plans = plan(source, top.doc, self.options.platforms, top.where)
        if self.options.prefetch_files and not isinstance(sink, RegistrySink):
            raise ConvertError(
                f"--prefetch-files stores its list as an OCI referrer of the image; {sink.name} is not "
                "a registry",
                "convert to a registry reference, or leave --prefetch-files out",
            )
        referrer = check_referrer(source, sink) if self.options.referrer else None
        jobs = self.options.jobs or default_jobs(len(plans))
        converted = fanout.run([self._platform_task(source, p, n, work) for n, p in enumerate(plans)], jobs)
        built: list[tuple[Descriptor | None, PlatformResult, bytes, bytes]] = []
        for p, layers in zip(plans, converted, strict=True):
            new_config, new_manifest = converted_documents(
                p.manifest,
                p.config,
                [(x.blob_digest, x.blob_size, x.index_digest, x.data_size) for x in layers],
                self.options.vsize or DEFAULT_VSIZE,
                sink.repository,
                source_link(source, p.manifest),
                subject_of(p.manifest) if referrer is not None else None,
            )
            result = PlatformResult(p.label, "", layers, source_digest=p.manifest.digest)
            built.append((p.desc, result, new_config, new_manifest))
        if self.options.prefetch_files:
            # The chain is mounted read-only through a device daemon of its own: FIEMAP of its files.
            from . import prefetchfiles  # noqa: PLC0415  # its device imports cost 0.3 s: only when asked

            with private_daemon(os.path.join(work, "devd")) as daemon:
                for n, (_, result, _, _) in enumerate(built):
                    lowers = [
                        LowerBlob(self.cache_path(x.blob_digest), x.blob_digest, x.blob_size, x.index_digest)
                        for x in result.layers
                    ]
                    result.trace = prefetchfiles.resolve(
                        daemon, work, f"prefetch-{os.getpid()}-{n}", lowers, self.options.prefetch_files
                    )

        check_interrupted()
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
            if referrer is None:
                raw = build_index(children, OCI_INDEX)
            else:
                raw = build_index(children, OCI_INDEX, subject_of(top.doc), IMAGE_ARTIFACT_TYPE)
            digest = sink.publish(raw, OCI_INDEX)
            self._list_variants(referrer, built, plans, (Descriptor(OCI_INDEX, digest, len(raw)), top.doc))
            self._push_traces(sink, built)
            return ConvertResult(digest, OCI_INDEX, [b[1] for b in built], sink.name)
        _, result, _, new_manifest = built[0]
        result.manifest_digest = sink.publish(new_manifest, OCI_MANIFEST)
        self._list_variants(referrer, built, plans, None)
        self._push_traces(sink, built)
        return ConvertResult(result.manifest_digest, OCI_MANIFEST, [result], sink.name)

    @staticmethod
    def _list_variants(
        referrer: RegistrySink | None,
        built: list[tuple[Descriptor | None, PlatformResult, bytes, bytes]],
        plans: list[PlatformPlan],
        index: tuple[Descriptor, Manifest | Index] | None,
    ) -> None:
        """--referrer: each converted manifest (and index) listed among its source's referrers."""
        if referrer is None:
            return
        pairs = [
            (
                Descriptor(
                    OCI_MANIFEST,
                    Digest(result.manifest_digest),
                    len(raw),
                    parse_manifest(raw, OCI_MANIFEST, result.platform).annotations,
                ),
                subject_of(p.manifest),
            )
            for (_, result, _, raw), p in zip(built, plans, strict=True)
        ]
        if index is not None:
            pairs.append((index[0], subject_of(index[1])))
        for (_, result, _, _), how in zip(built, list_variants(referrer, pairs), strict=False):
            result.listed = how

    @staticmethod
    def _push_traces(sink: Sink, built: list[tuple[Descriptor | None, PlatformResult, bytes, bytes]]) -> None:
        """Each platform's --prefetch-files trace, as a referrer of its manifest (after the image)."""
        for _, result, _, new_manifest in built:
            if result.trace is None:
                continue
            from p2p.referrers import push_referrer  # noqa: PLC0415  # httpx: only when there is a trace

            assert isinstance(sink, RegistrySink)
            subject = Descriptor(OCI_MANIFEST, Digest(result.manifest_digest), len(new_manifest))
            result.trace_digest = push_referrer(
                sink.client, sink.ref.repository, subject, TRACE_MEDIA_TYPE, result.trace.to_json()
            )

    def _platform_task(
        self, source: ImageSource, p: PlatformPlan, n: int, work: str
    ) -> Callable[[fanout.Lane], list[LayerResult]]:
        """Platform `n`'s layers, converted by a builder of its own in ``work/platform-<n>``, its applier
        pinned to the CPU of its lane's slot: platforms converted side by side share no work directory,
        loop device, mount or CPU of an applier."""

        def task(lane: fanout.Lane) -> list[LayerResult]:
            platform_work = os.path.join(work, f"platform-{n}")
            os.mkdir(platform_work, 0o700)
            cpus = sorted(os.sched_getaffinity(0))
            builder = Ext4LayerBuilder(
                platform_work,
                self.options.vsize or DEFAULT_VSIZE,
                self.options.codec,
                self.options.chunk_size,
                self.options.level,
                cpu=cpus[lane.slot % len(cpus)],
                stop=lane.stop,
            )
            try:
                return self._convert_layers(source, builder, p)
            finally:
                builder.close()

        return task

    def cache_path(self, digest: str) -> str:
        return os.path.join(self.cache.blobs, digest.partition(":")[2])

    def _convert_layers(
        self,
        source: ImageSource,
        builder: Ext4LayerBuilder,
        p: PlatformPlan,
    ) -> list[LayerResult]:
        """Every layer of one platform, bottom to top. A built layer's blob is sealed while the next
        layer is applied (`Ext4LayerBuilder`); its result is collected when it is needed, or at the end."""
        manifest, diff_ids, label = p.manifest, p.diff_ids, p.label
        results: list[Callable[[], LayerResult]] = []
        below: list[str] = []
        layers: list[Callable[[], tuple[CachedLayer, float]]] = []
        identity = FsIdentity.derive(
            json.dumps({"bottom": diff_ids[:1], **self.options.key()}, sort_keys=True)
        )
        n = len(manifest.layers)

        def lowers(upto: int) -> Callable[[], list[LowerBlob]]:
            def blobs() -> list[LowerBlob]:
                return [
                    LowerBlob(c.path, c.digest, c.size, c.index_digest)
                    for c, _ in (get() for get in layers[:upto])
                ]

            return blobs

        for i, desc in enumerate(manifest.layers):
            check_interrupted()
            # Stopped (`fanout`: an earlier platform failed, or an interrupt): never the error reported.
            if builder.stop.is_set():
                raise LayerError(f"{i} ({desc.digest})", None, "the conversion was stopped", "run it again")
            started = time.monotonic()
            key = LayerCache.key(diff_ids[: i + 1], self.options.key())
            name = f"{label} layer {i + 1}/{n} {desc.digest[:19]}"
            hit = self.cache.get(key)
            if hit is None:
                self.progress("start", name, desc.size)
                get = self._build(
                    source, builder, desc, diff_ids[i], i, key, below, lowers(i), identity, name
                )
            else:
                get = _constant((hit, time.monotonic()))
            layers.append(get)
            results.append(self._result(desc, get, hit is not None, started, name))
            below = [*below, key]
        done = [r() for r in results]
        check_interrupted()
        return done

    def _result(
        self,
        desc: Descriptor,
        get: Callable[[], tuple[CachedLayer, float]],
        reused: bool,
        started: float,
        name: str,
    ) -> Callable[[], LayerResult]:
        def result() -> LayerResult:
            c, finished = get()
            r = LayerResult(
                desc.digest,
                desc.size,
                c.uncompressed_size,
                c.digest,
                c.size,
                c.index_digest,
                c.data_size,
                reused,
                finished - started,  # to the end of its seal, not to when the result was collected
            )
            self.progress("done", name, r)
            return r

        return functools.cache(result)

    def _build(
        self,
        source: ImageSource,
        builder: Ext4LayerBuilder,
        desc: Descriptor,
        diff_id: str,
        i: int,
        key: str,
        below: list[str],
        lowers: Callable[[], list[LowerBlob]],
        identity: FsIdentity,
        name: str,
    ) -> Callable[[], tuple[CachedLayer, float]]:
        """Apply layer `i` now; the returned function waits for its blob, puts it in the cache and says
        when the seal ended."""
        layer = f"{i} ({desc.digest})"
        out = os.path.join(builder.work_dir, f"layer-{i}.blob")
        with source.open_layer(desc, layer, builder.stop) as blob:
            counted_in = _Counting(blob, lambda k: self.progress("advance", name, k))
            tar = _Counting(open_layer_stream(counted_in, desc.media_type, layer=layer))
            # Reading, checking, inflating and hashing run beside the applier (which is pinned to one CPU).
            with ReadAhead(tar) as ahead:
                build = builder.build(i, key, below, lowers, ahead, layer, out, identity)
            blob.drain()
            if not blob.verified:
                raise LayerError(layer, None, "the blob was not read to its end", "report this as a bug")
        got = "sha256:" + tar.hash.hexdigest()
        check_diff_id(layer, got, diff_id, "the image config does not describe this layer; rebuild the image")
        tar_bytes = tar.count
        log.info(
            "layer %s: %d entries, %d bytes of tar applied (%d inodes changed, %d freed)",
            layer,
            build.stats.entries,
            tar_bytes,
            build.changed_inodes,
            build.freed_inodes,
        )

        finished: list[float] = []
        build.blob.add_done_callback(lambda _: finished.append(time.monotonic()))

        def sealed() -> tuple[CachedLayer, float]:
            info = build.blob.result()
            log.info("layer %s: sealed into a %d byte blob %s", layer, info.blob_size, info.blob_digest)
            # (the callback runs just after result() can return: then this is within microseconds of it)
            end = finished[0] if finished else time.monotonic()
            return self.cache.put(key, out, info, tar_bytes), end

        return functools.cache(sealed)


def _constant(c: tuple[CachedLayer, float]) -> Callable[[], tuple[CachedLayer, float]]:
    return lambda: c


def convert(src: str, dst: str, options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert image `src` into `dst`; see the module docstring."""
    return Converter(options, progress).run(src, dst)
