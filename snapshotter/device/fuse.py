"""A FUSE filesystem that exposes block devices as files, speaking the kernel protocol on /dev/fuse.

The filesystem is flat: the root directory holds one regular file per attached device, whose bytes are
the device's (a stack of layers, perhaps with a writable upper). A loop device is then attached to such
a file. Structures and opcodes: `fuseabi` (checked against <linux/fuse.h> by a test).

Who may use it: the daemon runs as root and the files are root's, mode 0400 (read-only devices) or
0600 (writable ones), in a root directory of mode 0700. The mount has ``default_permissions``, so the
kernel checks those modes for every process (``allow_other`` only lets root processes other than the
daemon in: loop devices, losetup, the snapshotter), and OPEN refuses any uid but root's and the
daemon's on top of that. So no local user can read an image's bytes or write a writable device, even
through a path to the files that someone else opened up.

Threads: a few *request threads* each read one request from /dev/fuse and answer it. A read whose
bytes are all on this node is answered right there. A read that needs the network goes to the *I/O
pool* and the request thread takes the next request at once, so reads of local data never wait behind
reads of missing data. The pool's worker answers with the data, or the watchdog (`watchdog`) answers
EIO when the read's deadline — its arrival plus `read_timeout` — passes first; the worker passes that
deadline down (`p2p.deadline`), so a worker is free again shortly after it. A kernel request is
therefore answered within `read_timeout` (plus scheduling), however many readers wait. Reads that
fail because their unit or upstream failed a moment ago (the blob cache's cool-down) fail at once.

Why not pyfuse3: it does not expose FUSE_FALLOCATE, which is how a loop device passes discards (trims)
to its backing file, and the writable upper needs them; its `read` must return bytes (no vectored
zero-copy replies); it ties every request to one trio thread.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Histogram

from blockformat.chunkfile import Part
from p2p import deadline, tally
from p2p.errors import CoolingDownError, DeadlineExceededError, UnavailableError, unavailable_cause

from ..host.mountinfo import parse_mountinfo
from ..host.syscalls import MNT_DETACH, MS_NODEV, MS_NOSUID, mount, unmount_path
from . import fuseabi as abi
from .blockdev import BlockDevice, discard, write_bytes
from .pagestore import PageStore
from .watchdog import Pending, Watchdog

log = logging.getLogger(__name__)

MAX_WRITE = 1 << 20  # 1 MiB requests (FUSE_MAX_PAGES = 256)
BUFFER_SIZE = MAX_WRITE + 4096

#: Modes of the root directory and of the device files (owned by the daemon's uid: root).
ROOT_MODE = 0o700
READ_ONLY_MODE = 0o400
WRITABLE_MODE = 0o600

#: Readahead of the device files (KiB): how far ahead the kernel asks when a device file is read
#: sequentially (the loop device reads it so for ext4's readahead). The kernel's default, 128 KiB, made
#: the daemon answer 128 KiB requests that each cut three 64 KiB chunks, one at a time. With 8 MiB the
#: requests are 1 MiB (max_pages) and several are in flight, so the request threads decode in parallel
#: while the loop device copies; 2 MiB was slower for one reader (scripts/bench_device.py).
DEFAULT_READAHEAD_KB = 8192
#: A read that fails this close to its deadline failed for want of time (counted as a timeout).
LATE = 1.0
#: A read answered (or still waiting) this many seconds after it arrived is slow: counted, and shown.
SLOW_READ = 10.0
#: Where a read's bytes came from: the node (no wait), or the source that delivered most of the bytes
#: it waited for (`p2p.tally`).
READ_SOURCES = ("cache", "registry", "peer")
#: Seconds buckets of reads that waited for the network.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class _Entry:
    inode: int
    name: str
    device: BlockDevice
    mtime: float = field(default_factory=time.time)


class FuseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def _unavailable(e: BaseException) -> UnavailableError | None:
    """The "not now" error (a cool-down, a deadline) that `e` is or was caused by; None for breakage."""
    return unavailable_cause(e)


class BlockFS:
    """The device filesystem: `attach`/`detach` devices, `mount` it, `serve` requests, `unmount`."""

    def __init__(
        self,
        read_timeout: float = 30.0,
        threads: int = 4,
        io_threads: int = 32,
        readahead_kb: int = DEFAULT_READAHEAD_KB,
        store: bool = True,
    ) -> None:
        self.read_timeout = read_timeout
        self.threads = threads
        self.readahead_kb = readahead_kb
        # FUSE_NOTIFY_STORE of what small reads decoded beyond what they were asked (`pagestore`).
        self.pages = PageStore(store, threads, lambda: self._fd)
        self._io = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="fuse-io")
        self._watchdog: Watchdog | None = None
        self._lock = threading.Lock()
        self._by_name: dict[str, _Entry] = {}
        self._by_inode: dict[int, _Entry] = {}
        self._next_inode = 2
        self._fd = -1
        self.mountpoint: str | None = None
        self._workers: list[threading.Thread] = []
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._allowed_uids = frozenset({0, self._uid})
        self._started = time.time()
        self._stats_lock = threading.Lock()
        self.timeouts = 0  # reads answered with EIO by the watchdog: their deadline passed
        self.errors = 0  # reads answered with EIO because the device failed
        self.fast_failures = 0  # reads answered with EIO at once: their unit or upstream is cooling down
        self.refused_opens = 0  # OPENs refused because the caller is not root (nor the daemon's uid)
        self.read_bytes = dict.fromkeys(READ_SOURCES, 0)  # bytes of READ replies, by source
        self.reads = dict.fromkeys(READ_SOURCES, 0)  # READ replies with data, by source
        self.slow_reads = 0  # reads answered (data or EIO) more than SLOW_READ seconds after they arrived
        #: Seconds the reads that waited for the network took (unregistered: `device.metrics` yields it).
        self.wait_seconds = Histogram(
            "damselfly_read_wait_seconds",
            "Seconds device reads that needed the network took to answer",
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        self.on_error: Callable[[str, BaseException], None] | None = None

    @property
    def stores(self) -> int:
        """FUSE_NOTIFY_STORE messages the kernel accepted."""
        return self.pages.stores

    @property
    def stores_skipped(self) -> int:
        """Windows not stored: every other request thread was storing."""
        return self.pages.skipped

    def waiting_long(self) -> int:
        """Reads in flight now that arrived more than `SLOW_READ` seconds ago."""
        watchdog = self._watchdog
        if watchdog is None:
            return 0
        return watchdog.waiting(time.monotonic() - SLOW_READ + self.read_timeout)

    def _served(self, source: str, parts: list[Part]) -> None:
        n = sum(len(p) for p in parts)
        with self._stats_lock:
            self.read_bytes[source] += n
            self.reads[source] += 1

    # -- devices ---------------------------------------------------------------------------------

    def attach(self, name: str, device: BlockDevice) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid device name {name!r}")
        with self._lock:
            if name in self._by_name:
                raise FileExistsError(f"device {name!r} is already attached")
            entry = _Entry(self._next_inode, name, device)
            self._next_inode += 1
            self._by_name[name] = entry
            self._by_inode[entry.inode] = entry
        return self.path(name)

    def detach(self, name: str) -> BlockDevice:
        with self._lock:
            entry = self._by_name.pop(name)
            del self._by_inode[entry.inode]
        return entry.device

    def devices(self) -> dict[str, BlockDevice]:
        with self._lock:
            return {n: e.device for n, e in self._by_name.items()}

    def path(self, name: str) -> str:
        if self.mountpoint is None:
            raise RuntimeError("the device filesystem is not mounted")
        return os.path.join(self.mountpoint, name)

    # -- lifecycle -------------------------------------------------------------------------------

    def mount(self, mountpoint: str) -> None:
        os.makedirs(mountpoint, mode=ROOT_MODE, exist_ok=True)
        # Canonical before mounting (resolving it afterwards would ask the not-yet-served filesystem).
        mountpoint = os.path.realpath(mountpoint)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        # default_permissions: the kernel checks the modes of our files (root's, 0400/0600) for every
        # caller; allow_other lets root processes other than this one in (loop devices, losetup).
        opts = f"fd={fd},rootmode=40000,user_id={self._uid},group_id={self._gid}"
        opts += f",default_permissions,allow_other,max_read={MAX_WRITE}"
        try:
            mount("damselfly", mountpoint, "fuse.damselfly", MS_NOSUID | MS_NODEV, opts)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.mountpoint = mountpoint
        self._set_readahead()

    def _set_readahead(self) -> None:
        """Raise the FUSE mount's readahead to `readahead_kb` (its bdi's ``read_ahead_kb``).

        A file takes the readahead of its filesystem when it is opened, so this must happen before a
        loop device opens a device file: right after mounting. The kernel lowers the value to the
        INIT reply's max_readahead when that arrives, so `_init` answers with at least this much."""
        if not self.readahead_kb or self.mountpoint is None:
            return
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                mounts = [m for m in parse_mountinfo(f.read()) if m.mount_point == self.mountpoint]
            if not mounts:
                raise OSError(errno.ENOENT, "not in /proc/self/mountinfo")
            m = mounts[-1]
            with open(f"/sys/class/bdi/{m.major}:{m.minor}/read_ahead_kb", "w") as f:
                f.write(str(self.readahead_kb))
        except Exception as e:  # a slower device, not a broken one
            log.warning(
                "cannot set the readahead of %s to %d KiB (%s); device files are read with the kernel's "
                "default (slower sequential reads)",
                self.mountpoint,
                self.readahead_kb,
                e,
            )

    def serve(self) -> None:
        """Start the request threads (returns at once; `unmount` stops them)."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self._expired)
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"fuse-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def unmount(self) -> None:
        """Unmount (lazily, so open loop devices keep working until detached) and stop the threads.

        Workers still waiting on the network are not joined: they hold nothing but their own read,
        and each gives up at that read's deadline."""
        if self.mountpoint is not None:
            unmount_path(self.mountpoint, MNT_DETACH)
        for t in self._workers:
            t.join(10)
        self._workers.clear()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- request loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        buf = bytearray(BUFFER_SIZE)
        mv = memoryview(buf)
        while True:
            try:
                n = os.readv(self._fd, [buf])
            except OSError as e:
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue  # interrupted, or a request the kernel withdrew
                if e.errno in (errno.ENODEV, errno.EBADF):
                    return  # unmounted
                log.error("reading /dev/fuse failed: %s", e)
                return
            if n < abi.IN_HEADER.size:
                continue
            _len, opcode, unique, nodeid, uid, _gid, _pid, _ext, _pad = abi.IN_HEADER.unpack_from(buf)
            body = mv[abi.IN_HEADER.size : n]
            try:
                reply = self._dispatch(opcode, unique, nodeid, uid, body)
            except FuseError as e:
                self._reply(unique, -e.errno)
                continue
            except Exception:
                log.exception("FUSE opcode %d failed", opcode)
                self._reply(unique, -errno.EIO)
                continue
            if reply is None:
                continue  # FORGET, INTERRUPT, or a READ the I/O pool answers
            self._reply(unique, 0, reply)
            if opcode == abi.DESTROY:
                return
            self.pages.store_pending()

    def _reply(self, unique: int, error: int, payload: bytes | list[Part] = b"") -> None:
        parts = payload if isinstance(payload, list) else [payload]
        size = abi.OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self._fd, [abi.OUT_HEADER.pack(size, error, unique), *parts])
        except OSError as e:
            # ENOENT: the request was interrupted and withdrawn; anything else is logged.
            if e.errno != errno.ENOENT:
                log.warning("FUSE reply to %d failed: %s", unique, e)

    def _count(self, counter: str) -> None:
        with self._stats_lock:
            setattr(self, counter, getattr(self, counter) + 1)

    # -- handlers --------------------------------------------------------------------------------

    def _entry(self, nodeid: int) -> _Entry:
        with self._lock:
            entry = self._by_inode.get(nodeid)
        if entry is None:
            raise FuseError(errno.ENOENT)
        return entry

    def _attr(self, nodeid: int) -> bytes:
        uid, gid = self._uid, self._gid
        if nodeid == abi.ROOT_INODE:
            t = int(self._started)
            mode = stat.S_IFDIR | ROOT_MODE
            return abi.ATTR.pack(abi.ROOT_INODE, 0, 0, t, t, t, 0, 0, 0, mode, 2, uid, gid, 0, 4096, 0)
        e = self._entry(nodeid)
        size = e.device.size
        mode = stat.S_IFREG | (WRITABLE_MODE if e.device.writable else READ_ONLY_MODE)
        t = int(e.mtime)
        return abi.ATTR.pack(
            e.inode, size, (size + 511) // 512, t, t, t, 0, 0, 0, mode, 1, uid, gid, 0, 4096, 0
        )

    def _dispatch(
        self, opcode: int, unique: int, nodeid: int, uid: int, body: memoryview
    ) -> bytes | list[Part] | None:
        if opcode == abi.READ:
            _fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
            return self._read(unique, nodeid, offset, size)
        if opcode == abi.WRITE:
            _fh, offset, size, *_ = abi.WRITE_IN.unpack_from(body)
            data = bytes(body[abi.WRITE_IN.size : abi.WRITE_IN.size + size])
            self._write(nodeid, offset, data)
            return abi.WRITE_OUT.pack(size, 0)
        if opcode == abi.LOOKUP:
            name = bytes(body).rstrip(b"\0").decode("utf-8", "surrogateescape")
            with self._lock:
                entry = self._by_name.get(name) if nodeid == abi.ROOT_INODE else None
            if entry is None:
                raise FuseError(errno.ENOENT)
            return abi.ENTRY_OUT_HEAD.pack(entry.inode, 0, 0, 0, 0, 0) + self._attr(entry.inode)
        if opcode == abi.GETATTR:
            return abi.ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(nodeid)
        if opcode == abi.SETATTR:
            valid, _p, _fh, size, *_ = abi.SETATTR_IN.unpack_from(body)
            if (
                valid & abi.FATTR_SIZE
                and nodeid != abi.ROOT_INODE
                and size != self._entry(nodeid).device.size
            ):
                raise FuseError(errno.EPERM)  # devices have a fixed size
            if valid & ~abi.FATTR_SIZE:
                raise FuseError(errno.EPERM)  # modes, owners and times are ours to say
            return abi.ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(nodeid)
        if opcode == abi.OPEN:
            entry = self._entry(nodeid)
            flags, _open_flags = abi.OPEN_IN.unpack_from(body)
            if uid not in self._allowed_uids:
                # default_permissions has the kernel check our modes first; this holds even if it did
                # not (an older kernel, a mount made by other means).
                self._count("refused_opens")
                raise FuseError(errno.EACCES)
            if flags & os.O_ACCMODE != os.O_RDONLY and not entry.device.writable:
                raise FuseError(errno.EROFS)
            return abi.OPEN_OUT.pack(nodeid, abi.FOPEN_KEEP_CACHE, 0)
        if opcode in (abi.FLUSH, abi.FSYNC):
            if nodeid != abi.ROOT_INODE:
                entry = self._entry(nodeid)
                if entry.device.writable:
                    entry.device.flush()
            return b""
        if opcode == abi.FALLOCATE:
            _fh, offset, length, mode, _p = abi.FALLOCATE_IN.unpack_from(body)
            self._fallocate(nodeid, offset, length, mode)
            return b""
        if opcode == abi.INIT:
            return self._init(body)
        if opcode in (abi.RELEASE, abi.RELEASEDIR, abi.FSYNCDIR, abi.ACCESS):
            return b""
        if opcode == abi.OPENDIR:
            if nodeid != abi.ROOT_INODE:
                raise FuseError(errno.ENOTDIR)
            if uid not in self._allowed_uids:
                self._count("refused_opens")
                raise FuseError(errno.EACCES)
            return abi.OPEN_OUT.pack(0, 0, 0)
        if opcode == abi.READDIR:
            _fh, offset, size, *_ = abi.READ_IN.unpack_from(body)
            return self._readdir(offset, size)
        if opcode == abi.STATFS:
            return abi.KSTATFS.pack(0, 0, 0, len(self._by_name), 0, 4096, 255, 4096, 0)
        if opcode == abi.LSEEK:
            _fh, offset, whence, _p = abi.LSEEK_IN.unpack_from(body)
            if whence in (os.SEEK_DATA, os.SEEK_HOLE):  # the whole device counts as data
                size = self._entry(nodeid).device.size
                if offset >= size:
                    raise FuseError(errno.ENXIO)
                return abi.LSEEK_OUT.pack(offset if whence == os.SEEK_DATA else size)
            raise FuseError(errno.EINVAL)
        if opcode in (abi.FORGET, abi.BATCH_FORGET, abi.INTERRUPT):
            return None
        if opcode == abi.DESTROY:
            return b""
        raise FuseError(errno.ENOSYS)

    def _init(self, body: memoryview) -> bytes:
        major, minor, max_readahead, flags = abi.INIT_IN.unpack_from(body)
        if major != abi.KERNEL_MAJOR:
            raise FuseError(errno.EPROTO)
        # The kernel keeps the smaller of its readahead and ours: answer with at least ours.
        return abi.init_reply(minor, max(max_readahead, self.readahead_kb * 1024), flags, MAX_WRITE)

    def _readdir(self, offset: int, size: int) -> bytes:
        with self._lock:
            files = [(e.inode, e.name) for e in sorted(self._by_name.values(), key=lambda e: e.inode)]
        return abi.dirents(files, offset, size)

    # -- reads -----------------------------------------------------------------------------------

    def _read(self, unique: int, nodeid: int, offset: int, size: int) -> list[Part] | None:
        """Answer a READ here when its bytes are local; else hand it to the I/O pool (returns None)."""
        device = self._entry(nodeid).device
        end = offset + size
        arrived = time.monotonic()
        if not device.is_local(offset, size):
            p = Pending(unique, nodeid, offset, size, arrived + self.read_timeout)
            assert self._watchdog is not None, "serve() starts the watchdog"
            self._watchdog.watch(p)
            try:
                self._io.submit(self._read_remote, p, device)
            except RuntimeError:  # the pool is shut down: we are unmounting
                if p.claim():
                    raise FuseError(errno.EIO) from None
            return None
        lo, hi = self.pages.window(device, offset, end, device.writable)
        try:
            # Local bytes need no network, but a bound costs nothing and covers a blob that lost its
            # bytes between the check and the read (a corrupt chunk found, refetched).
            with deadline.scope(arrived + self.read_timeout):
                parts = device.read_parts(lo, hi - lo)
        except (ValueError, OverflowError):
            raise FuseError(errno.EINVAL) from None
        except Exception as e:
            self._failed(offset, size, e, arrived + self.read_timeout)
            raise FuseError(errno.EIO) from None
        reply = self.pages.hand_out(nodeid, lo, offset, end, parts)
        self._served("cache", reply)
        return reply

    def _read_remote(self, p: Pending, device: BlockDevice) -> None:
        """On the I/O pool: read, and answer unless the watchdog did already."""
        if p.answered:
            return  # waited in the queue past its deadline
        try:
            with deadline.scope(p.deadline), tally.watch() as fetched:
                parts = device.read_parts(p.offset, p.size)
        except (ValueError, OverflowError):
            if p.claim():
                self._reply(p.unique, -errno.EINVAL)
            return
        except Exception as e:
            if p.claim():
                self._waited(p)
                self._failed(p.offset, p.size, e, p.deadline)
                self._reply(p.unique, -errno.EIO)
            return
        if p.claim():
            self._reply(p.unique, 0, parts)
            self._waited(p)
            self._served(tally.dominant(fetched) or "cache", parts)

    def _waited(self, p: Pending) -> None:
        """A read that went to the I/O pool was answered: how long it took."""
        seconds = time.monotonic() - (p.deadline - self.read_timeout)
        self.wait_seconds.observe(seconds)
        if seconds > SLOW_READ:
            self._count("slow_reads")

    def _failed(self, offset: int, size: int, e: BaseException, deadline_at: float) -> None:
        why = _unavailable(e)
        if isinstance(why, CoolingDownError):  # failed at once: the unit or upstream failed just now
            self._count("fast_failures")
            log.info("read of %d bytes at %d: EIO at once (%s)", size, offset, why)
            return
        # Out of time: the deadline passed, or the fetch gave up just before it (it ends a little early
        # to say why: `p2p.session.DEADLINE_MARGIN`).
        late = isinstance(why, DeadlineExceededError) or time.monotonic() >= deadline_at - LATE
        self._count("timeouts" if late else "errors")
        log.error("read of %d bytes at %d failed: %s", size, offset, e)
        if self.on_error is not None:
            self.on_error("timeout" if late else "error", e)

    def _expired(self, p: Pending) -> None:
        """The watchdog's answer to a read still unanswered at its deadline."""
        self._count("timeouts")
        self._waited(p)
        log.error("read of %d bytes at %d timed out after %.1fs: EIO", p.size, p.offset, self.read_timeout)
        if self.on_error is not None:
            self.on_error("timeout", TimeoutError(f"read at {p.offset} outlasted {self.read_timeout}s"))
        self._reply(p.unique, -errno.EIO)

    # -- writes ----------------------------------------------------------------------------------

    def _write(self, nodeid: int, offset: int, data: bytes) -> None:
        device = self._entry(nodeid).device
        if not device.writable:
            raise FuseError(errno.EROFS)
        if offset + len(data) > device.size:
            raise FuseError(errno.ENOSPC)
        try:
            write_bytes(device, offset, data)
        except OSError as e:
            raise FuseError(e.errno or errno.EIO) from None

    def _fallocate(self, nodeid: int, offset: int, length: int, mode: int) -> None:
        device = self._entry(nodeid).device
        if mode & ~(abi.FALLOC_FL_KEEP_SIZE | abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_ZERO_RANGE):
            raise FuseError(errno.EOPNOTSUPP)
        if not mode & (abi.FALLOC_FL_PUNCH_HOLE | abi.FALLOC_FL_ZERO_RANGE):
            return  # preallocation: every byte of a device already exists
        if not device.writable:
            raise FuseError(errno.EROFS)
        try:
            discard(device, offset, length)
        except OSError as e:
            raise FuseError(e.errno or errno.EIO) from None
