"""One converted layer: a source layer's tar applied to ext4 in a local image file, sealed into a blob.

DESIGN §4, `docs/convert.md` ("How it is fast"). For source layer i, on the image of layers 0..i-1::

    i == 0: a sparse image file of vsize, mkfs.ext4 on it (fixed UUID, hash seed and time),
            a loop device (rw) attached to it for this layer and the next ones
    else:   the same file and loop device (in place), or a copy (`imagefile.sparse_copy`)
    mount ext4 (noatime, nodelalloc, noinit_itable, nombcache, nobarrier, mb_optimize_scan=0)
        apply the layer tar (`applytar.apply_layer`), from one pinned CPU
    umount
    canonical times, generations and superblock fields, in the file (`ext4meta`; "Reproducible bytes")
    snapshot: all but the regular files' data copied aside (`imagefile.Snapshot`)
    the blocks that differ from the image below ── layer blob (`imagefile.write_diff_in_place`)

The kernel's writes go through the page cache into a plain file: nothing in user space is on the write
path. Only blocks whose bytes changed reach the blob (a block ext4 rewrote with the same bytes does not:
it reads the same through the lower layers). ``nobarrier``: the image is scratch, read back through the
page cache; a cache flush to the disk at every unmount would only cost time.

Reproducible bytes. The same input must give byte-identical blobs, but ext4 stamps the wall clock and
randomness into what it writes. What we pin, and how:

- mkfs: UUID and directory-hash seed derived from the bottom layer's identity, ``E2FSPROGS_FAKE_TIME``;
  no journal (transaction IDs and commit times would differ run to run); no ``metadata_csum``, whose
  per-inode checksums are seeded by the random generation we rewrite (chunks carry SHA-256 anyway).
- Block and inode allocation: every block group's allocator state is loaded before the layer is
  applied (mballoc would otherwise skip groups whose bitmaps an asynchronous prefetch has not loaded
  yet); ``nodelalloc`` allocates at ``write(2)`` time, in the order the tar is
  applied, instead of whenever writeback runs; without delayed allocation ext4 starts each search at a
  "colour" taken from the writing thread's id, so the tar is applied from a thread whose id gives the
  same colour every time, pinned to one CPU because ext4's small-file preallocation ("locality
  groups") is per CPU; ``mb_optimize_scan=0``, because by default the allocator scans groups one
  way on a rotational device and another on a non-rotational one, and a loop device takes that flag
  from the disk under its image file (the same image gave other blobs with the cache on tmpfs or an
  SSD than on a virtio disk); and no inode is freed while the layer is applied (each removed one is held
  open until the end), since a journal-less ext4 skips inodes deleted 1 to 30 seconds ago — a clock
  test that would make reuse depend on how fast the tar goes; ``nombcache`` stops xattr blocks from being
  shared through a cache whose content depends on memory pressure; ``noinit_itable`` keeps the
  lazy-init thread from zeroing inode tables at random times.
- Inode fields no tar controls: ``ctime`` and ``crtime`` (set to the inode's mtime), ``i_generation``
  (random per new inode; set to 0) and the change counter ``i_version`` (0) of every inode the layer
  touched — found as the inodes whose ctime differs from their mtime, which after this step holds only
  for inodes changed since. A freed inode keeps its deletion and change times: it is zeroed. Both are
  found from the inode bitmaps and tables of the unmounted image (`ext4meta.canonicalize`).
- Superblock: mount/write times, mount count, bytes written, last mount path (the converted
  filesystem has no superblock checksum).

What a tar does control — owners, modes, xattrs, mtimes and atimes with nanoseconds — `apply_layer`
sets itself; the mount is ``noatime`` so reading never changes an atime.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from blockformat.chunkfile import BlobInfo
from blockformat.layer import LayerReader
from blockformat.source import FileSource
from blockformat.stack import Stack

from ..config import DeviceSection
from ..device import client
from ..device.client import DeviceClient
from ..errors import ConvertError, LayerError, MountError
from ..host.loop import loop_attach, loop_detach, loop_devices
from ..host.mkfs import mkfs_ext4
from ..host.mountinfo import mountinfo
from ..host.mounts import mount_loop, umount, umount_loop
from . import ext4meta, imagefile
from .applytar import ApplyStats, apply_layer
from .ext4meta import FAKE_TIME
from .layerstream import Readable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The layer being built is mounted where only root can reach it (a 0700 work directory), and still
#: ``nosuid,nodev``: its setuid binaries and device nodes are the image's, not this host's.
MOUNT_OPTIONS = (
    "rw",
    "nosuid",
    "nodev",
    "noatime",
    "nodelalloc",
    "nobarrier",
    "noinit_itable",
    "nombcache",
    "no_prefetch_block_bitmaps",
    "mb_optimize_scan=0",
)
#: Layers are applied to one image file in place (`Ext4LayerBuilder`); False: each to a copy of the
#: whole image (the same blobs, slower; the tests convert both ways and compare).
IN_PLACE = True
#: The conversion's daemon reads local files only: a long bound spares a slow disk a spurious EIO.
CONVERT_READ_TIMEOUT = 600.0


@dataclass(frozen=True)
class LowerBlob:
    """A layer already converted: its blob on local disk."""

    path: str
    digest: str
    size: int
    index_digest: str


@dataclass(frozen=True)
class FsIdentity:
    """What makes the filesystem's bytes reproducible: fixed at mkfs, derived from the bottom layer."""

    uuid: str
    hash_seed: str

    @classmethod
    def derive(cls, seed: str) -> FsIdentity:
        ns = uuid.UUID("5f0c6a1e-3c8e-4f43-9a70-6d616d73656c")  # damselfly's namespace for uuid5
        return cls(str(uuid.uuid5(ns, "fs-uuid:" + seed)), str(uuid.uuid5(ns, "hash-seed:" + seed)))


def private_daemon(state_dir: str) -> contextlib.AbstractContextManager[DeviceClient]:
    """The conversion's own device daemon in `state_dir`, stopped (by pid) when the block ends."""
    settings = DeviceSection(state_dir=state_dir, read_timeout=CONVERT_READ_TIMEOUT)
    return client.private_daemon(state_dir, settings)


@dataclass
class LayerBuild:
    blob: Future[BlobInfo]  # the layer blob, sealed by the builder's sealing thread
    stats: ApplyStats
    changed_inodes: int
    freed_inodes: int


#: ext4 (without delayed allocation) starts each block search at a "colour" of the group chosen by the
#: writing thread's id modulo 16 (``ext4_inode_to_goal_block``); we write from a thread whose id has
#: this remainder.
_COLOUR = 0
_COLOURS = 16
_MAX_THREADS = 4096


_libc = ctypes.CDLL(None, use_errno=True)

#: ``MOUNT_OPTIONS`` as mount(2) takes them: the generic ones as flags, ext4's as its data string.
_MS_NOSUID, _MS_NODEV, _MS_NOATIME = 0x2, 0x4, 0x400
_MOUNT_FLAGS = _MS_NOSUID | _MS_NODEV | _MS_NOATIME
_MOUNT_DATA = ",".join(o for o in MOUNT_OPTIONS if o not in ("rw", "nosuid", "nodev", "noatime"))
_BLKFLSBUF = 0x1261


def _mount_layer(loop: str, mnt: str) -> None:
    """Mount the layer's ext4 from its loop device, by the system call: mount(8) and losetup(8) cost a
    process each, per layer (the loop device stays attached to the image from layer to layer).

    The device's page cache is dropped first: between two mounts the image file was rewritten around
    the device (`ext4meta`), and any opener in between (udev's blkid) may have cached old blocks."""
    fd = os.open(loop, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _BLKFLSBUF)
    finally:
        os.close(fd)
    if _libc.mount(loop.encode(), mnt.encode(), b"ext4", _MOUNT_FLAGS, _MOUNT_DATA.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"mount {loop} at {mnt}",
            [],
            None,
            os.strerror(err),
            "see dmesg for the kernel's reason",
        )


def _umount_layer(mnt: str) -> None:
    """Unmount the layer's filesystem (the loop device stays)."""
    if _libc.umount2(mnt.encode(), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.EINVAL and not any(m.mount_point == os.path.realpath(mnt) for m in mountinfo()):
            return  # not mounted
        raise MountError(
            f"unmount {mnt}", [], None, os.strerror(err), f"find what keeps it busy (`fuser -vm {mnt}`)"
        )


class _Flusher:
    """Writes the filesystem's dirty pages out (``syncfs``) every `INTERVAL` from a thread of its own
    while the layer is applied, so that the unmount has little left to write and the loop device's
    copying overlaps the applier instead of following it. Where ext4 puts blocks is decided at
    ``write(2)`` (``nodelalloc``), never at writeback, so this changes no byte of the result."""

    INTERVAL = 0.2

    def __init__(self, mnt: str) -> None:
        self._mnt = mnt
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="damselfly-flush", daemon=True)

    def _run(self) -> None:
        fd = os.open(self._mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while not self._stop.wait(self.INTERVAL):
                _libc.syncfs(fd)  # an error here is the unmount's to report
        finally:
            os.close(fd)

    def __enter__(self) -> _Flusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


#: How long a thread whose ``start`` was interrupted may take to begin before it is taken as never made.
_START_GRACE = 5.0


def _wait_out(event: threading.Event, timeout: float | None = None) -> bool:
    """Wait for `event` through further interrupts: the applier was told to stop and does at its next
    read, and the caller must not unmount the filesystem under it (SIGKILL remains)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return event.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            continue


def run_like_every_time(
    fn: Callable[[], T], cancel: threading.Event | None = None, cpu: int | None = None
) -> T:
    """Run `fn` so that ext4 allocates exactly as it did the last time: from a thread whose id ext4 maps
    to the same block colour, pinned to one CPU (ext4's small-file preallocation is per CPU).

    `cpu`: the one to pin to (default: the lowest this process may use). Which CPU does not change a
    byte: the preallocation groups are per CPU *and per filesystem* (``sbi->s_locality_groups``), and
    every layer is applied on a freshly mounted one, so any single CPU starts from the same empty
    state. What matters is that the applier never moves; two appliers of two filesystems (platforms
    converted side by side) get two CPUs only so that they do not queue behind each other.

    If the waiting thread is interrupted (Ctrl-C, SIGTERM), `cancel` is set and the worker is waited
    for — `fn` must notice `cancel` soon — so that nothing writes to the filesystem while the caller
    unmounts it.
    """
    if cpu is None:
        cpu = min(os.sched_getaffinity(0))
    outcome: list[Any] = []

    def body(began: threading.Event, ended: threading.Event) -> None:
        began.set()
        try:
            if threading.get_native_id() % _COLOURS != _COLOUR:
                return
            os.sched_setaffinity(0, {cpu})  # this thread only
            try:
                outcome.append(("ok", fn()))
            except BaseException as e:
                outcome.append(("error", e))
        finally:
            ended.set()

    # The thread's end is waited for on an event, not with ``Thread.join``: a join interrupted by
    # KeyboardInterrupt marks the still running thread as stopped (CPython's bpo-45274 handling in
    # ``_wait_for_tstate_lock``), so a second join would return at once, while it still writes. An
    # interrupt inside ``start`` may come before the thread exists or after (while ``start`` waits for
    # it to run); one that exists begins within moments.
    for _ in range(_MAX_THREADS):
        began, ended = threading.Event(), threading.Event()
        t = threading.Thread(target=body, args=(began, ended), name="damselfly-apply")
        try:
            t.start()
            ended.wait()
        except BaseException:
            if cancel is not None:
                cancel.set()
            if _wait_out(began, _START_GRACE):
                _wait_out(ended)
            raise
        t.join()  # (it has ended: at once)
        if outcome:
            kind, value = outcome[0]
            if kind == "error":
                raise value
            return cast(T, value)
    raise ConvertError(
        f"no thread id with remainder {_COLOUR} mod {_COLOURS} in {_MAX_THREADS} tries",
        "report this as a bug",
    )


#: Set by `interrupt` (the CLI's SIGINT/SIGTERM handler). The KeyboardInterrupt that handler raises can
#: land where Python swallows it (a weakref callback, a ``__del__``: "Exception ignored in ..."), so the
#: converter also looks at this at every tar read and between layers (`check_interrupted`).
INTERRUPTED = threading.Event()


def interrupt(signum: int, frame: object) -> None:
    """A signal handler: unwind like Ctrl-C, and make sure the conversion notices."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def check_interrupted() -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


class _Cancellable:
    """A tar stream that stops with a `LayerError` once any of `cancel` (or `INTERRUPTED`) is set."""

    def __init__(self, raw: Readable, cancel: tuple[threading.Event, ...], layer: str) -> None:
        self._raw = raw
        self._cancel = cancel
        self._layer = layer

    def read(self, n: int, /) -> bytes | None:
        if INTERRUPTED.is_set() or any(c.is_set() for c in self._cancel):
            raise LayerError(self._layer, None, "the conversion was interrupted", "run it again")
        return self._raw.read(n)


def _remove_lost_found(root: str) -> int | None:
    """mkfs's ``lost+found`` is no part of the image: containers would see a directory the image lacks.

    e2fsck recreates it if it ever needs one. The root keeps its times (mkfs's fixed ones). Returns a
    descriptor that keeps the inode from being freed until the layer is applied (see the docstring).
    """
    st = os.lstat(root)
    path = os.path.join(root, "lost+found")
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    os.rmdir(path)
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns))
    return fd


def _load_every_group(loop: str) -> None:
    """Load the allocator's state of every block group now, synchronously.

    mballoc skips groups whose bitmaps are not loaded yet in its cheap passes and loads them by
    asynchronous prefetch — so where blocks go would depend on I/O timing. Reading ext4's
    ``mb_groups`` report loads every group first (and ``no_prefetch_block_bitmaps`` keeps the
    background thread out of it).
    """
    path = f"/proc/fs/ext4/{os.path.basename(loop)}/mb_groups"
    with open(path, "rb") as f:
        while f.read(1 << 16):
            pass


def release_mounts(root: str) -> None:
    """Unmount everything mounted below `root` (deepest first) and detach loop devices over files below
    it, by exact path: the safety net for a conversion interrupted anywhere."""
    prefix = os.path.realpath(root) + os.sep
    for m in sorted(
        (m for m in mountinfo() if m.mount_point.startswith(prefix)), key=lambda m: -len(m.mount_point)
    ):
        if m.fstype == "fuse" or m.fstype.startswith("fuse."):
            continue  # the device daemon's own mount: DaemonProcess.stop removes it
        try:
            umount(m.mount_point)
        except MountError:
            umount(m.mount_point, lazy=True)
    for d in loop_devices():
        if d.backing_file.startswith(prefix):
            loop_detach(d.device, backing_file=d.backing_file)


#: Pauses before retrying the unmount of a builder's own mount that ``umount`` found busy (seconds).
_BUSY_RETRIES = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


def _umount_private(mnt: str, in_place: bool) -> None:
    """Unmount a layer's filesystem (`_umount_layer`; not in place, its loop device detached too),
    retrying while it is busy.

    Nothing but the builder uses the mount (a 0700 work directory), and it closed every descriptor in
    it; yet a process started by another thread at that moment (the other platforms' losetup or mkfs,
    `fanout`) holds a copy of every descriptor of this one from its fork until it closes them before
    exec — and a mount with a descriptor open is busy (EBUSY; umount(8): "target is busy"). That lasts
    microseconds, or a few milliseconds for a child descheduled on a busy machine, so the unmount is
    tried again a few times before its error stands."""
    unmount = _umount_layer if in_place else umount_loop
    for pause in _BUSY_RETRIES:
        try:
            unmount(mnt)
            return
        except MountError as e:
            if "busy" not in e.stderr:
                raise
            log.info("%s is busy, unmounting it again in %.2f s", mnt, pause)
        time.sleep(pause)
    unmount(mnt)


def raise_fd_limit() -> None:
    """Holding removed inodes open takes a descriptor each: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Ext4LayerBuilder:
    """Builds converted layers one after another in `work_dir`, on one local image file (`imagefile`).

    It keeps the image of the last layer it built (or expanded) and which layers that image holds (by
    the keys the caller gives them), so the next layer is applied to that same file — in place: before
    it, what the layer may rewrite (everything but the regular files' data) is copied aside
    (`imagefile.Snapshot`, a few MB), and the layer's diff is taken between two snapshots
    (`imagefile.write_diff_in_place`), with the blob exactly what comparing two whole copies gives.
    Any other stack of lowers is expanded from their blobs. With ``in_place=False`` each layer starts
    from a kernel copy of the whole image instead (`imagefile.sparse_copy`; the tests compare the two).

    `cpu` is the CPU its applier is pinned to (`run_like_every_time`); `stop`, once set (by another
    thread: the platform it builds for was stopped, `fanout`), stops the layer being applied at its next
    read of the tar. Builders share nothing but the process: one per platform converted at once, each in
    a `work_dir` of its own, with its own image, loop device and mount (a failed `build` releases every
    mount and loop device below its `work_dir`, and nothing else).

    Sealing — the block diff against the image below, compressed into the layer blob — runs on a thread
    of its own (`build` returns a future of the blob), so it overlaps the next layer's snapshot, mount
    and apply. A seal reads the files its layer made from the image itself; a later layer may remove
    them and the one after it reuse their blocks, so a layer waits for the seal two before it. The
    thread also removes files no longer needed, in order: after every seal that reads them.
    """

    def __init__(
        self,
        work_dir: str,
        vsize: int,
        codec: str,
        chunk_size: int,
        level: int | None = None,
        in_place: bool | None = None,
        *,
        cpu: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.work_dir = work_dir
        self.vsize = vsize
        self.codec = codec
        self.chunk_size = chunk_size
        self.level = level
        self.in_place = IN_PLACE if in_place is None else in_place
        self.cpu = cpu
        self.stop = stop if stop is not None else threading.Event()
        self._image: str | None = None  # the current image file
        self._holds: list[str] = []  # the keys of the layers it holds, bottom first
        self._snap: imagefile.Snapshot | None = None  # in place: the current image's snapshot
        self._files: ext4meta.FileExtents | None = None  # in place: its regular files' extents
        self._loop: str | None = None  # in place: the loop device attached to the current image
        self._made = 0  # image and snapshot files made: each gets a name of its own
        self._tail = ThreadPoolExecutor(1, "damselfly-seal")
        self._seals: collections.deque[Future[BlobInfo]] = collections.deque()

    def _new_file(self, kind: str = "image") -> str:
        self._made += 1
        return os.path.join(self.work_dir, f"{kind}-{self._made}")

    def _drop(self, path: str) -> None:
        """Unlink `path` once every seal queued so far is done (freeing a big file's extents takes ext4
        a while: off the path too)."""
        self._tail.submit(_unlink, path)

    def _forget(self) -> None:
        """Let go of the current image (and its snapshot), after the seals that read them."""
        if self._loop is not None and self._image is not None:
            loop_detach(self._loop, backing_file=self._image)
        self._loop = None
        if self._image is not None:
            self._drop(self._image)
        if self._snap is not None:
            self._drop(self._snap.path)
        self._image, self._holds, self._snap, self._files = None, [], None, None

    def close(self) -> None:
        """Remove the current image, and wait for every seal and removal."""
        self._forget()
        self._tail.shutdown(wait=True)

    def _base(self, below: list[str], lowers: Callable[[], list[LowerBlob]]) -> str | None:
        """The image of the layers `below` (None for none): the current one, or one expanded from their
        blobs (`lowers`)."""
        if not below:
            self._forget()
            return None
        if self._image is not None and self._holds == below:
            return self._image
        self._forget()
        path = self._new_file()
        blobs = lowers()
        sources = [FileSource(b.path) for b in blobs]
        try:
            readers = [LayerReader(src, b.index_digest) for src, b in zip(sources, blobs, strict=True)]
            imagefile.expand(Stack(readers), path)
        finally:
            for src in sources:
                src.close()
        self._image, self._holds = path, list(below)
        return path

    def _seal(self, base: str | None, image: str, out_path: str) -> BlobInfo:
        try:
            with open(out_path, "wb") as out:
                info, _ = imagefile.write_diff(
                    base, image, out, self.vsize, self.codec, self.chunk_size, self.level
                )
                out.flush()
                os.fsync(out.fileno())  # here, beside the next layer, not when the cache takes it
        finally:
            if base is not None:
                _unlink(base)  # the new image replaced it; this was the last reader
        return info

    def _seal_in_place(
        self, base: imagefile.Snapshot | None, cur: imagefile.Snapshot, image: str, out_path: str
    ) -> BlobInfo:
        try:
            with open(out_path, "wb") as out:
                info, _ = imagefile.write_diff_in_place(
                    base, cur, image, out, self.vsize, self.codec, self.chunk_size, self.level
                )
                out.flush()
                os.fsync(out.fileno())  # here, beside the next layer, not when the cache takes it
        finally:
            if base is not None:
                _unlink(base.path)  # this was its last reader
        return info

    def build(
        self,
        index: int,
        key: str,
        below: list[str],
        lowers: Callable[[], list[LowerBlob]],
        stream: Readable,
        layer: str,
        out_path: str,
        identity: FsIdentity,
    ) -> LayerBuild:
        """Apply the tar `stream` (layer `layer`, known to the caller as `key`) on the layers `below`
        (their keys; `lowers` gives their blobs if the image must be rebuilt from them); the new layer
        blob is written to `out_path` by the sealing thread (`LayerBuild.blob`)."""
        mnt = os.path.join(self.work_dir, f"mnt-{index}")
        os.makedirs(mnt, exist_ok=True)
        phases: dict[str, float] = {}
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = now - mark
            mark = now

        image: str | None = None
        done = False
        try:
            base = self._base(below, lowers)
            if base is not None and self.in_place:
                image = base
                if self._snap is None or self._files is None:  # expanded from blobs: look at it first
                    self._files = ext4meta.regular_files(image)
                    self._snap = imagefile.Snapshot.take(
                        image, self._new_file("snap"), imagefile.merged(self._files.extents())
                    )
                    phase("snapshot")
                # The seal two layers back reads files this layer may remove (their blocks are free
                # for the next one to reuse): it must be done before anything writes to the image.
                while len(self._seals) > 1:
                    self._seals.popleft().result()
            else:
                image = self._new_file()
                if base is None:
                    mkfs_ext4(
                        image,
                        self.vsize,
                        uuid=identity.uuid,
                        hash_seed=identity.hash_seed,
                        fake_time=FAKE_TIME,
                        prezeroed=True,
                        metadata_csum=False,
                    )
                    phase("mkfs")
                else:
                    imagefile.sparse_copy(base, image)
                    phase("copy")
            before = ext4meta.used_inodes(image)
            if self.in_place:
                if self._loop is None or base is None:
                    self._loop = loop_attach(image, read_only=False)
                loop = self._loop
                _mount_layer(loop, mnt)
            else:
                loop = mount_loop(image, mnt, "ext4", MOUNT_OPTIONS)
            try:
                _load_every_group(loop)
                held = _remove_lost_found(mnt) if not below else None
                phase("mount")
                try:
                    cancel = threading.Event()
                    cancellable = _Cancellable(stream, (cancel, self.stop), layer)
                    with _Flusher(mnt):
                        stats = run_like_every_time(
                            lambda: apply_layer(cancellable, mnt, layer=layer, hold_removed=True),
                            cancel,
                            self.cpu,
                        )
                finally:
                    if held is not None:
                        os.close(held)
                phase("apply")
            finally:
                _umount_private(mnt, self.in_place)
            phase("umount")
            if self.in_place:
                files = self._files if base is not None and self._files is not None else None
                files = files if files is not None else ext4meta.FileExtents()
                changed, freed = ext4meta.canonicalize(image, before, files)
                phase("canonical")
                snap = imagefile.Snapshot.take(
                    image, self._new_file("snap"), imagefile.merged(files.extents())
                )
                phase("snapshot")
                below_snap = self._snap if base is not None else None
                blob = self._tail.submit(self._seal_in_place, below_snap, snap, image, out_path)
                self._seals.append(blob)
                self._image, self._holds, self._snap, self._files = image, [*below, key], snap, files
            else:
                changed, freed = ext4meta.canonicalize(image, before)
                phase("canonical")
                blob = self._tail.submit(self._seal, base, image, out_path)
                if self._image is not None and self._image != base:
                    self._drop(self._image)  # (the seal removes the base itself, after reading it)
                self._image, self._holds = image, [*below, key]
            done = True
        finally:
            if not done:
                # Wherever an interrupt landed (even inside mount_loop, before the inner finally): the
                # filesystem and its loop device go before the image does.
                release_mounts(self.work_dir)
                self._loop = None
                if image is not None:
                    if image == self._image:
                        self._forget()  # half applied: no later layer may start from it
                    else:
                        self._drop(image)
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
        log.info("layer %s: %s", layer, ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
        return LayerBuild(blob, stats, changed, freed)
