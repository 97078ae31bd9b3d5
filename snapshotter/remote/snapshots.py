"""Converted ("remote") layers: snapshots whose files are fetched lazily from a registry.

containerd's unpacker calls ``Prepare(key, parent, labels)`` for every layer with
``containerd.io/snapshot.ref=<chainID>`` and the layer descriptor's annotations under
``containerd.io/snapshot/`` (DESIGN §6). For a damselfly layer (`blockformat.annotations`) we record a
*remote* committed snapshot named by the chain ID and answer AlreadyExists, so containerd never
fetches the layer. Its labels keep what a device needs::

    containerd.io/snapshot/damselfly/*            the converter's annotations (index digest, vsize...)
    containerd.io/snapshot/cri.layer-digest       the blob digest (from CRI or `damselfly rpull`; else
                                                  the converter's .../damselfly/blob-digest annotation;
                                                  for a bottom layer without either, the chain ID, which
                                                  is the blob digest of a converted image's first layer)
    containerd.io/snapshot/damselfly/source       recorded here: "registry/repository" that served it
    containerd.io/snapshot/damselfly/blob-size    recorded here: the blob's size (from a HEAD request)

Where the blob lives: the registry and repository of ``containerd.io/snapshot/cri.image-ref``, else the
converter's ``.../damselfly/repository`` annotation. Before recording, the blob is HEADed (short
timeout; a registry that failed is not asked again for a cooldown), so an unreachable registry is
found at pull time, not when a container starts.

Anything that stops the remote path — labels that do not parse, no source, an unreachable registry, a
parent that is not itself remote — is a *fallback*: a WARNING naming the layer and why, the counter
``damselfly_remote_fallbacks_total{reason}``, and a normal Prepare (containerd then unpacks the layer
itself). Never silent. (A block layer is not a tar: for an image with only converted layers the pull
then stops with the puller's error — `damselfly rpull` names the media type and points at this log —
rather than ever running a container on a half-made snapshot.)

**Chains.** An active snapshot or view whose ancestors include remote layers gets one shared block
device for the chain of remote layers under it (bottom to top, named by `snapshotter.image.spec.device_name`
of their digests), attached through the device daemon, loop-mounted ext4 ``ro,noload`` at
``<root>/remote/<device name>``; that mount is its lowest lowerdir, under the ``fs`` directories of
any plain layers above the chain (a ``ctr snapshots commit`` of a container on a converted image).
Every snapshot on the same chain shares the mount. Plain layers may sit above remote ones, never below.

**Users are counted in the metadata store**, not in memory: a chain mount is needed while some active
or view snapshot has that chain under it. After a Remove (or a Commit, which turns a user into a layer)
the chain of the snapshot is looked up again and released (unmounted, loop device and device
detached, directory removed) when nobody needs it. A per-chain lock orders that check against the
mount of a concurrent Prepare: Prepare records its snapshot *before* it takes the lock to mount, so
either the release sees the new user, or the Prepare mounts again after the release.

**Restarts.** `reconcile` (on `damselfly serve` start, and after the device daemon had to be started
again) mounts every chain the store needs — a mount already in place is kept as it is, so running
containers never notice — and releases the directories under ``<root>/remote/`` nobody needs. The
directory is created before the device is attached, so a crash between the two leaves a directory
that the next reconcile finds and releases.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from blockformat.annotations import KEY_FSTYPE, PREFIX, LayerAnnotations
from blockformat.durable import private_dir
from blockformat.errors import InvalidArgumentError
from blockformat.stack import MAX_LAYERS
from p2p.digest import Digest, parse_digest
from p2p.errors import InvalidReferenceError, P2PError, RegistryUnavailableError
from p2p.reference import parse_reference
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts

from ..device.manager import DeviceSpec, LayerSpec, SourceSpec
from ..device.supervisor import DeviceDaemon
from ..errors import ImageError, SnapshotterError
from ..host.mounts import find_mount, loop_attach, loop_detach, loops_for, mount, mountinfo, umount_loop
from ..image.spec import device_name
from ..metrics import CHAIN_MOUNT_SECONDS, CHAIN_MOUNTS, CHAIN_RELEASES, REMOTE_FALLBACKS, REMOTE_LAYERS
from ..service.metadata import Kind, Layer, MetaStore, Snapshot, Tx
from ..service.overlay import OverlayDriver

log = logging.getLogger(__name__)

LABEL_REF = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_SOURCE = PREFIX + "source"
LABEL_BLOB_SIZE = PREFIX + "blob-size"

#: Mount options of a chain's ext4: read-only, no journal replay (the image has no journal; a read-only
#: device could not take a replay anyway), and ``nosuid,nodev``. The chain mount is a lowerdir, not
#: what a container sees: an exec or an open through the container's overlayfs is checked against the
#: *overlay* mount's flags (as with containerd's overlayfs snapshotter, whose lowerdirs are plain
#: directories), so setuid binaries and device nodes still work in the container, while at the chain's
#: own path (under a 0700 directory anyway) they do not (docs/security.md; tested both ways).
CHAIN_MOUNT_OPTIONS = ("ro", "noload", "nosuid", "nodev")


@dataclass(frozen=True)
class RemoteOptions:
    enabled: bool = True
    plain_http: bool = False  # HTTP for every registry; otherwise HTTP for loopback ones only
    check_timeout: float = 5.0
    unreachable_cooldown: float = 30.0


class FallbackError(SnapshotterError):
    """Why a converted layer cannot take the remote path; `reason` is the metric label. Raised by the
    label and registry checks and caught by `RemoteSnapshots.claim`, which logs and counts it: it never
    reaches a caller of the service."""

    def __init__(self, reason: str, why: str) -> None:
        super().__init__(why)
        self.reason = reason
        self.why = why


# -- what the labels say ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A Prepare that names a converted layer, and where its blob should be."""

    ref: str  # the chain ID containerd will look the snapshot up by
    digest: Digest
    annotations: LayerAnnotations
    registry: str
    repository: str

    @property
    def source(self) -> str:
        return f"{self.registry}/{self.repository}"


def is_converted(labels: Mapping[str, str]) -> bool:
    """Whether a Prepare carries any damselfly layer annotation (then it is a remote candidate)."""
    return any(k.startswith(PREFIX) for k in labels)


def candidate(parent: str, labels: Mapping[str, str]) -> Candidate | None:
    """The converted layer a Prepare names; None for a plain layer; `FallbackError` when it cannot be used."""
    ref = labels.get(LABEL_REF, "")
    if not ref or not is_converted(labels):
        return None
    try:
        ann = LayerAnnotations.from_dict(labels)
    except InvalidArgumentError as e:
        raise FallbackError("labels", f"its damselfly labels do not parse: {e}") from None
    if ann is None:
        raise FallbackError("labels", f"it has damselfly labels but no {PREFIX}index-digest")
    if ann.fstype != "ext4":
        raise FallbackError("labels", f"{KEY_FSTYPE} is {ann.fstype!r}; only ext4 chains can be mounted")
    # The converter records each blob's digest in its own annotations (nerdctl's generic path passes
    # only those); CRI and rpull also pass it as cri.layer-digest.
    digest_text = labels.get(LABEL_LAYER_DIGEST) or ann.blob_digest
    if digest_text is None and not parent:
        # A converted image's diff_ids are its layer digests, so the bottom chain ID is the blob digest.
        digest_text = ref
    if digest_text is None:
        raise FallbackError(
            "labels",
            f"no {LABEL_LAYER_DIGEST} label, so the blob is unknown; pull with `damselfly rpull` (or CRI "
            "with disable_snapshot_annotations = false), which passes it",
        )
    try:
        digest = parse_digest(digest_text)
    except InvalidReferenceError as e:
        raise FallbackError("labels", f"layer digest {digest_text!r}: {e}") from None
    registry = repository = ""
    image_ref = labels.get(LABEL_IMAGE_REF, "")
    if image_ref:
        try:
            r = parse_reference(image_ref)
            registry, repository = r.registry, r.repository
        except InvalidReferenceError as e:
            log.info("layer %s: ignoring %s: %s", ref, LABEL_IMAGE_REF, e)
    if not registry and ann.repository:
        try:
            r = parse_reference(ann.repository)
            registry, repository = r.registry, r.repository
        except InvalidReferenceError as e:
            raise FallbackError("source", f"its repository annotation {ann.repository!r}: {e}") from None
    if not registry:
        raise FallbackError(
            "source",
            f"no source for the blob: neither {LABEL_IMAGE_REF} nor a {PREFIX}repository annotation",
        )
    return Candidate(ref, digest, ann, registry, repository)


@dataclass(frozen=True)
class RemoteLayer:
    """A remote committed snapshot, as its recorded labels describe it."""

    name: str
    digest: str
    size: int
    annotations: LayerAnnotations
    registry: str
    repository: str

    @classmethod
    def of(cls, layer: Layer) -> RemoteLayer | None:
        """The remote layer `layer` stands for; None for a plain one. Broken labels: `ImageError`."""
        labels = layer.labels
        source = labels.get(LABEL_SOURCE)
        if source is None:
            return None
        where = f"remote snapshot {layer.name!r}"
        registry, _, repository = source.partition("/")
        try:
            ann = LayerAnnotations.from_dict(labels)
            size = int(labels[LABEL_BLOB_SIZE])
            digest = parse_digest(labels[LABEL_LAYER_DIGEST])
        except (InvalidArgumentError, InvalidReferenceError, KeyError, ValueError) as e:
            ann, why = None, str(e)
        else:
            why = "no index digest"
        if ann is None or not repository:
            raise ImageError(
                where,
                f"its labels no longer describe a converted layer ({why})",
                "remove the image and pull it again (were its labels replaced by an Update?)",
            )
        return cls(layer.name, digest, size, ann, registry, repository)

    def spec(self, plain_http: bool) -> LayerSpec:
        source = SourceSpec(registry=self.registry, repository=self.repository, plain_http=plain_http or None)
        ann = self.annotations
        return LayerSpec(self.digest, self.size, ann.index_digest, source, ann.vsize, ann.fstype)


@dataclass(frozen=True)
class Chain:
    """What a snapshot stands on: plain layers (nearest first) above a chain of remote ones."""

    plain: tuple[Layer, ...]
    remote: tuple[RemoteLayer, ...]  # bottom to top

    @property
    def name(self) -> str:
        return device_name([x.digest for x in self.remote])


def chain_of(parents: Sequence[Layer]) -> Chain | None:
    """Split a snapshot's ancestors (nearest first); None when none is remote."""
    for i, layer in enumerate(parents):
        first = RemoteLayer.of(layer)
        if first is None:
            continue
        remote = [first]
        for below in parents[i + 1 :]:
            r = RemoteLayer.of(below)
            if r is None:
                raise ImageError(
                    f"snapshot chain {first.name!r}",
                    f"plain layer {below.name!r} lies below the converted layer",
                    "remove the image and pull it again",
                )
            remote.append(r)
        return Chain(tuple(parents[:i]), tuple(reversed(remote)))
    return None


def _mount_chain(device: str, target: Path) -> None:
    """Loop-mount the chain's device file read-only at `target`. A loop device already bound to the file
    (a crash between ``losetup`` and ``mount``) is reused, found through sysfs; a failed mount leaves no
    loop device that no mount uses."""
    loop = loop_attach(device, read_only=True, reuse=True)
    try:
        mount(loop, target, "ext4", CHAIN_MOUNT_OPTIONS)
    except BaseException:
        if not any(m.source == loop for m in mountinfo()):
            try:
                loop_detach(loop, backing_file=device)
            except SnapshotterError as e:
                log.warning("cannot detach %s after a failed mount: %s", loop, e)
        raise


# -- is the blob there? ----------------------------------------------------------------------------


class BlobCheck:
    """HEAD a layer blob (its size) with a short timeout; a registry that failed is skipped for a while.

    A positive answer is kept (a digest names immutable bytes); a failure marks the registry down for
    `cooldown` seconds, so a pull of a many-layer image from a dead registry costs one timeout, not
    one per layer.
    """

    def __init__(self, options: RemoteOptions) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._down: dict[str, tuple[float, str]] = {}  # registry -> (until, why)

    def _client(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                t = self.options.check_timeout
                client = RegistryClient(
                    registry,
                    plain_http=True if self.options.plain_http else None,
                    retry=RetryPolicy(attempts=2, budget=t, base_delay=0.1, max_delay=0.5),
                    timeouts=Timeouts(connect=t, read=t, write=t, pool=t, total=t),
                )
                self._clients[registry] = client
            return client

    def size(self, registry: str, repository: str, digest: str) -> int:
        key = (registry, repository, digest)
        now = time.monotonic()
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
            down = self._down.get(registry)
            if down is not None and down[0] > now:
                raise FallbackError(
                    "unreachable",
                    f"registry {registry} failed a moment ago ({down[1]}); it is not asked again for "
                    f"{down[0] - now:.0f}s ([remote] unreachable_cooldown)",
                )
        try:
            size = self._client(registry).blob_size(repository, Digest(digest))
        except RegistryUnavailableError as e:
            with self._lock:
                self._down[registry] = (time.monotonic() + self.options.unreachable_cooldown, str(e))
            raise FallbackError("unreachable", f"registry {registry} is unreachable: {e}") from None
        except P2PError as e:
            raise FallbackError("source", f"blob {digest} in {registry}/{repository}: {e}") from None
        except Exception as e:  # a bug or an unmapped error must not fail the pull: fall back, loudly
            log.exception("checking blob %s in %s/%s failed unexpectedly", digest, registry, repository)
            raise FallbackError("unreachable", f"checking the blob failed unexpectedly: {e!r}") from None
        with self._lock:
            self._sizes[key] = size
            self._down.pop(registry, None)
        return size

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()


# -- the hook --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    key: str
    parent: str
    labels: Mapping[str, str]
    candidate: Candidate | None
    size: int | None
    fallback: FallbackError | None


class RemoteSnapshots:
    """`snapshotter.service.snapshots.RemoteLayers` for converted images (see the module docstring)."""

    def __init__(
        self,
        store: MetaStore,
        root: Path,
        daemon: DeviceDaemon,
        options: RemoteOptions | None = None,
        check: BlobCheck | None = None,
    ) -> None:
        self.store = store
        self.mounts_dir = root / "remote"
        self.daemon = daemon
        self.options = options or RemoteOptions()
        self.blobs = check or BlobCheck(self.options)
        self._checked = threading.local()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        private_dir(self.mounts_dir)

    def close(self) -> None:
        self.blobs.close()

    # -- Prepare: recording remote layers ----------------------------------------------------------

    def check(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        """Before Prepare's transaction: the slow part (a HEAD of the blob), kept for `claim`."""
        self._checked.value = self._inspect(key, parent, labels)

    def _inspect(self, key: str, parent: str, labels: Mapping[str, str]) -> _Checked:
        cand: Candidate | None = None
        size: int | None = None
        fallback: FallbackError | None = None
        try:
            if not self.options.enabled:
                if is_converted(labels) and LABEL_REF in labels:
                    raise FallbackError("disabled", "remote layers are disabled ([remote] enabled = false)")
            else:
                cand = candidate(parent, labels)
                if cand is not None:
                    size = self.blobs.size(cand.registry, cand.repository, cand.digest)
        except FallbackError as f:
            fallback = f
        return _Checked(key, parent, labels, cand, size, fallback)

    def claim(self, tx: Tx, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        checked: _Checked | None = getattr(self._checked, "value", None)
        self._checked.value = None
        if checked is None or (checked.key, checked.parent, checked.labels) != (key, parent, labels):
            checked = self._inspect(key, parent, labels)  # no `check` before: do it now
        cand = checked.candidate
        try:
            if checked.fallback is not None:
                raise checked.fallback
            if cand is None or checked.size is None:
                return None
            return self._record(tx, cand, checked.size, parent, labels)
        except FallbackError as f:
            layer = cand.ref if cand is not None else labels.get(LABEL_REF, key)
            digest = f" (blob {cand.digest})" if cand is not None else ""
            log.warning(
                "converted layer %s%s of prepare %s/%s falls back to a normal pull: %s",
                layer,
                digest,
                tx.namespace,
                key,
                f.why,
            )
            REMOTE_FALLBACKS.labels(reason=f.reason).inc()
            return None

    def _record(
        self, tx: Tx, cand: Candidate, size: int, parent: str, labels: Mapping[str, str]
    ) -> str | None:
        if parent:
            below = tx.find(parent)
            if below is None:
                return None  # the plain path reports the missing parent (NotFound)
            layers = [Layer(below.id, below.info.name, below.info.labels), *below.parents]
            try:
                chain = chain_of(layers) if below.info.kind is Kind.COMMITTED else None
            except ImageError as e:
                raise FallbackError("parent", str(e)) from None
            if chain is None or chain.plain:
                raise FallbackError(
                    "parent",
                    f"its parent {parent!r} is not a converted layer; a converted layer can only stack on "
                    "converted layers",
                )
            vsizes = {x.annotations.vsize for x in chain.remote}
            if vsizes != {cand.annotations.vsize}:
                raise FallbackError(
                    "parent", f"its device size {cand.annotations.vsize} differs from its parents' {vsizes}"
                )
            if len(chain.remote) + 1 > MAX_LAYERS:
                raise FallbackError("parent", f"a chain holds at most {MAX_LAYERS} converted layers")
        existing = tx.find(cand.ref)
        if existing is not None:
            mine = existing.info.kind is Kind.COMMITTED and LABEL_SOURCE in existing.info.labels
            if mine and existing.info.parent == parent:
                return cand.ref  # recorded by an earlier Prepare of the same layer
            what = "converted layer" if mine else f"{existing.info.kind.label} snapshot"
            raise FallbackError(
                "name-taken",
                f"snapshot {cand.ref!r} already exists as a {what} with parent {existing.info.parent!r}, "
                f"not {parent!r}",
            )
        recorded = {
            **labels,
            LABEL_LAYER_DIGEST: cand.digest,
            LABEL_SOURCE: cand.source,
            LABEL_BLOB_SIZE: str(size),
        }
        tx.create(Kind.COMMITTED, cand.ref, parent, recorded)
        REMOTE_LAYERS.inc()
        log.info(
            "converted layer %s (blob %s, %d bytes) recorded from %s",
            cand.ref,
            cand.digest,
            size,
            cand.source,
        )
        return cand.ref

    # -- mounts ------------------------------------------------------------------------------------

    def lowerdirs(self, snapshot: Snapshot, driver: OverlayDriver) -> list[str] | None:
        chain = chain_of(snapshot.parents)
        if chain is None:
            return None
        lower = self._ensure(chain)
        return [str(driver.fs_path(p.id)) for p in chain.plain] + [lower]

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def spec(self, chain: Chain) -> DeviceSpec:
        return DeviceSpec(chain.name, [x.spec(self.options.plain_http) for x in chain.remote])

    def mount_point(self, name: str) -> Path:
        return self.mounts_dir / name

    def _ensure(self, chain: Chain) -> str:
        """The chain's ext4 mount, attached and mounted first if it is not there (idempotent)."""
        spec = self.spec(chain)
        target = self.mount_point(spec.name)
        with self._lock(spec.name):
            current = find_mount(target)
            if current is not None and current.fstype == "ext4":
                return str(target)
            t0 = time.monotonic()
            target.mkdir(mode=0o755, exist_ok=True)  # first: a crash after the attach leaves it for reconcile
            path = self.daemon.attach(spec)
            try:
                _mount_chain(path, target)
            except BaseException as e:
                try:
                    self._detach_unused(spec.name)
                except SnapshotterError as cleanup:
                    e.add_note(f"and its device could not be detached: {cleanup}")
                raise
            elapsed = time.monotonic() - t0
            CHAIN_MOUNT_SECONDS.observe(elapsed)
            CHAIN_MOUNTS.inc()
            log.info(
                "mounted chain %s (%d converted layers) at %s in %.2fs",
                spec.name,
                len(spec.layers),
                target,
                elapsed,
            )
            return str(target)

    def _detach_unused(self, name: str) -> None:
        users = loops_for(self.daemon.device_path(name))
        if users:
            log.warning("device %s is still used by %s; left attached", name, ", ".join(users))
            return
        self.daemon.detach(name)

    # -- releasing ---------------------------------------------------------------------------------

    def needed(self) -> dict[str, Chain]:
        """Every chain some active or view snapshot stands on, by device name (from the store)."""
        with self.store.read(None) as tx:
            users = tx.mountable()
        out: dict[str, Chain] = {}
        for snap in users:
            try:
                chain = chain_of(snap.parents)
            except ImageError as e:
                log.error("snapshot %s/%s: %s", snap.namespace, snap.info.name, e)
                continue
            if chain is not None:
                out.setdefault(chain.name, chain)
        return out

    def _release(self, name: str) -> bool:
        """Unmount and detach chain `name` unless a snapshot needs it (checked under its lock, after any
        Prepare that could mount it recorded its snapshot: see the module docstring)."""
        target = self.mount_point(name)
        with self._lock(name):
            if name in self.needed():
                return False
            try:
                was_mounted = find_mount(target) is not None
                umount_loop(target)
                if was_mounted:
                    CHAIN_MOUNTS.dec()
                self._detach_unused(name)
                with contextlib.suppress(FileNotFoundError):
                    target.rmdir()
            except (SnapshotterError, OSError) as e:
                CHAIN_RELEASES.labels(result="failed").inc()
                log.warning("cannot release chain %s at %s: %s; Cleanup will retry", name, target, e)
                return False
            CHAIN_RELEASES.labels(result="ok").inc()
            log.info("released chain %s (no snapshot uses it)", name)
            return True

    def removed(self, snapshot: Snapshot) -> None:
        try:
            chain = chain_of(snapshot.parents)
        except ImageError as e:
            log.warning("removed %s/%s: %s", snapshot.namespace, snapshot.info.name, e)
            return
        if chain is not None and self.mount_point(chain.name).exists():
            self._release(chain.name)

    def cleanup(self, live_ids: set[int]) -> None:
        self.sweep()

    def sweep(self) -> list[str]:
        """Release every chain directory nobody needs; return the names released."""
        needed = self.needed()
        return [n for n in sorted(os.listdir(self.mounts_dir)) if n not in needed and self._release(n)]

    def mounted_chains(self) -> list[str]:
        """Names of the chains mounted now (read from the kernel)."""
        return [n for n in sorted(os.listdir(self.mounts_dir)) if find_mount(self.mount_point(n))]

    def _drop_stale(self) -> None:
        """Lazily unmount chain mounts whose device the daemon does not serve (it died and was started
        again): their reads can only fail. Containers that had them keep seeing errors; new ones get a
        fresh mount. Starts the daemon when some chain is mounted."""
        mounted = self.mounted_chains()
        if not mounted:
            return
        attached = self.daemon.attached()
        for name in mounted:
            if name in attached:
                continue
            log.error(
                "chain %s is mounted but the device daemon no longer serves its device (it was restarted); "
                "containers still using it see I/O errors; unmounting it lazily: new ones get a fresh mount",
                name,
            )
            with self._lock(name):
                try:
                    umount_loop(self.mount_point(name), lazy=True)
                    CHAIN_MOUNTS.dec()
                except SnapshotterError as e:
                    log.error("cannot unmount stale chain %s: %s", name, e)

    def reconcile(self) -> None:
        """Make mounts match the store: drop mounts whose device is gone, mount what is needed (keeping
        healthy mounts in place: running containers never notice), release the rest."""
        self._drop_stale()
        needed = self.needed()
        mounted = 0
        for name, chain in needed.items():
            try:
                self._ensure(chain)
                mounted += 1
            except (SnapshotterError, OSError) as e:
                log.error("cannot mount chain %s for its snapshots: %s", name, e)
        released = self.sweep()
        CHAIN_MOUNTS.set(len(self.mounted_chains()))
        log.info(
            "reconciled converted chains: %d needed, %d mounted, %d released",
            len(needed),
            mounted,
            len(released),
        )
