"""Chain mounts: one shared, read-only ext4 mount per chain of converted layers.

An active snapshot or view whose ancestors include remote layers gets one shared block device for the
chain of remote layers under it (bottom to top, named by `snapshotter.image.spec.device_name` of their
digests), attached through the device daemon and loop-mounted ext4 ``ro,noload,nosuid,nodev`` at
``<root>/remote/<device name>``; that mount is its lowest lowerdir (`snapshotter.remote.snapshots`).
Every snapshot on the same chain shares the mount.

**Users are counted in the metadata store**, not in memory: a chain mount is needed while some active
or view snapshot has that chain under it (`needed`). After a Remove (or a Commit, which turns a user
into a layer) the chain of the snapshot is looked up again and released (unmounted, loop device and
device detached, directory removed) when nobody needs it. A per-chain lock orders that check against
the mount of a concurrent Prepare: Prepare records its snapshot *before* it takes the lock to mount,
so either the release sees the new user, or the Prepare mounts again after the release.

**Attached at pull.** When an image's top converted layer is recorded (the end of its pull), the
chain's device is attached at once, in the background, with its prefetch request (`warm`): the layers'
indexes are learned and the image's trace is replayed while the pull finishes and the container is
created, and the mount then finds the device ready. No directory is made and nothing is mounted; if no
container mounts the chain within `WARM_SECONDS`, or the service stops first, the device is detached.

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
from pathlib import Path

from blockformat.durable import private_dir

from ..device.manager import DeviceSpec
from ..device.prefetch import PrefetchRequest
from ..device.supervisor import DeviceDaemon
from ..errors import ImageError, SnapshotterError
from ..host.loop import loop_attach, loop_detach, loops_for
from ..host.mountinfo import find_mount, mountinfo
from ..host.mounts import mount, umount_loop
from ..metrics import CHAIN_MOUNT_SECONDS, CHAIN_MOUNTS, CHAIN_RELEASES
from ..service.metadata import MetaStore
from ..service.records import Snapshot
from .layers import Chain, chain_of

log = logging.getLogger(__name__)

#: Mount options of a chain's ext4: read-only, no journal replay (the image has no journal; a read-only
#: device could not take a replay anyway), and ``nosuid,nodev``. The chain mount is a lowerdir, not
#: what a container sees: an exec or an open through the container's overlayfs is checked against the
#: *overlay* mount's flags (as with containerd's overlayfs snapshotter, whose lowerdirs are plain
#: directories), so setuid binaries and device nodes still work in the container, while at the chain's
#: own path (under a 0700 directory anyway) they do not (docs/security.md; tested both ways).
CHAIN_MOUNT_OPTIONS = ("ro", "noload", "nosuid", "nodev")
#: Seconds a device attached at its image's pull (`ChainMounts.warm`) waits for a container.
WARM_SECONDS = 120.0


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


class ChainMounts:
    """The chain mounts under `mounts_dir`, counted from `store`, devices from `daemon`."""

    def __init__(
        self,
        store: MetaStore,
        mounts_dir: Path,
        daemon: DeviceDaemon,
        plain_http: bool,
        prefetch: bool = True,
    ) -> None:
        self.store = store
        self.prefetch = prefetch
        self.mounts_dir = mounts_dir
        self.daemon = daemon
        self.plain_http = plain_http
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._warm: dict[str, threading.Timer] = {}  # devices attached at pull, not mounted yet
        self._closed = False
        private_dir(self.mounts_dir)

    def close(self) -> None:
        """Stop the warm-up timers, and detach the devices attached at a pull that no container mounted
        (nothing else would: they have no directory for a reconcile to find)."""
        with self._locks_lock:
            self._closed = True
            names = list(self._warm)
        for name in names:
            timer = self._warm.get(name)
            if timer is not None:
                timer.cancel()
            self._cool(name)

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def spec(self, chain: Chain) -> DeviceSpec:
        return DeviceSpec(chain.name, [x.spec(self.plain_http) for x in chain.remote])

    def prefetch_request(self, chain: Chain) -> PrefetchRequest | None:
        """Where the chain's trace is looked for: the referrers of the manifest its top layer was pulled
        with (`snapshotter.device.prefetch`); None when prefetching is off or the manifest is unknown."""
        top = chain.remote[-1] if chain.remote else None
        if not self.prefetch or top is None or top.manifest is None:
            return None
        return PrefetchRequest(top.manifest, top.registry, top.repository, self.plain_http or None)

    def mount_point(self, name: str) -> Path:
        return self.mounts_dir / name

    def ensure(self, chain: Chain) -> str:
        """The chain's ext4 mount, attached and mounted first if it is not there (idempotent)."""
        spec = self.spec(chain)
        target = self.mount_point(spec.name)
        with self._lock(spec.name):
            current = find_mount(target)
            if current is not None and current.fstype == "ext4":
                return str(target)
            t0 = time.monotonic()
            warm = self._forget_warm(spec.name)  # attached at its pull, perhaps: mounted now
            if warm is not None:
                warm.cancel()
            target.mkdir(mode=0o755, exist_ok=True)  # first: a crash after the attach leaves it for reconcile
            path = self.daemon.attach(spec, self.prefetch_request(chain))
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

    # -- attached at pull --------------------------------------------------------------------------

    def warm(self, chain: Chain) -> None:
        """Attach the chain's device now, in the background, with its prefetch request: the pull of its
        image is ending and a container will likely mount it next; its indexes and its trace's ranges are
        fetched meanwhile. Not mounted (no directory, no loop device): if no container mounts the chain
        within `WARM_SECONDS`, the device is detached again."""
        with self._locks_lock:
            if self._closed or chain.name in self._warm:
                return
            timer = threading.Timer(WARM_SECONDS, self._cool, (chain.name,))
            timer.daemon = True
            self._warm[chain.name] = timer
        threading.Thread(
            target=self._attach_warm, args=(chain, timer), name="chain-warm", daemon=True
        ).start()

    def _attach_warm(self, chain: Chain, timer: threading.Timer) -> None:
        spec = self.spec(chain)
        with self._lock(spec.name):
            if find_mount(self.mount_point(spec.name)) is not None:
                self._forget_warm(spec.name)
                return
            try:
                self.daemon.attach(spec, self.prefetch_request(chain))
            except (SnapshotterError, OSError) as e:  # the chain's mount will try again, and say why
                log.info("chain %s: no early attach: %s", spec.name, e)
                self._forget_warm(spec.name)
                return
        log.info("attached chain %s at its pull (%d converted layers)", spec.name, len(spec.layers))
        timer.start()

    def _forget_warm(self, name: str) -> threading.Timer | None:
        with self._locks_lock:
            return self._warm.pop(name, None)

    def _cool(self, name: str) -> None:
        """`WARM_SECONDS` after an attach at pull: detach the device if no container mounted it."""
        if self._forget_warm(name) is None:
            return
        with self._lock(name):
            if find_mount(self.mount_point(name)) is not None or name in self.needed():
                return
            try:
                self._detach_unused(name)
                log.info("detached chain %s: attached at its pull, no container mounted it", name)
            except SnapshotterError as e:
                log.warning("cannot detach chain %s attached at its pull: %s", name, e)

    def _detach_unused(self, name: str) -> None:
        users = loops_for(self.daemon.device_path(name))
        if users:
            log.warning("device %s is still used by %s; left attached", name, ", ".join(users))
            return
        self.daemon.detach(name)

    # -- releasing -------------------------------------------------------------------------------

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
                self.ensure(chain)
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
