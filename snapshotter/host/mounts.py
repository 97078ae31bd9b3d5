"""Loop devices, ext4 and mounts: idempotent wrappers over util-linux and e2fsprogs.

Every helper runs one command (``losetup``, ``mkfs.ext4``, ``mount``, ``umount``) with an argv list, a
timeout and ``LC_ALL=C``, and maps any failure to `MountError` with the command, its exit status and its
stderr. State is read back from the kernel, never remembered: loop devices from
``/sys/block/loop*/loop/`` and mounts from ``/proc/self/mountinfo``, so a restarted process (or a test
teardown) can see and undo exactly what an earlier one left behind.

Idempotence, so that a retry after a crash converges instead of failing:

==================  ======================================================================================
call                when the work is already done
==================  ======================================================================================
``loop_attach``     attaches a new device (``reuse=True``: returns a device already bound to the file)
``loop_detach``     a device that is not attached (or no longer exists) is fine
``mount``           the same source and type already mounted at the target is fine; anything else there
                    is a `MountError`
``umount``          a target that is not a mount point is fine
``mount_loop``      the target already mounted from a loop device over the same file is fine
``umount_loop``     not mounted is fine; the loop device is detached unless another mount still uses it
==================  ======================================================================================

Why these ext4 options (``mkfs_ext4``): a damselfly device is a sparse file or a FUSE file over layers,
so whatever mkfs writes becomes layer data. ``^has_journal`` (images are mounted ``ro,noload``; a
writable upper records its own crash-safe log), ``nodiscard`` (a discard of the whole device would only
become one huge trim record), ``lazy_itable_init=1`` plus, on e2fsprogs >= 1.47 and a freshly created
file, ``assume_storage_prezeroed=1`` (inode tables are not written, and are marked as zeroed so the
kernel's lazy-init thread never writes them either — a sparse file reads as zeros), ``-m 0`` (no blocks
reserved for root in an image), ``-b 4096`` (the layer alignment). A fixed UUID, hash seed and
``E2FSPROGS_FAKE_TIME`` make the bytes reproducible.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import subprocess
import time
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import MountError

log = logging.getLogger(__name__)

LOSETUP = "losetup"
MKFS_EXT4 = "mkfs.ext4"
MOUNT = "mount"
UMOUNT = "umount"

#: Where each command comes from, for the "install it" remedy.
_PACKAGES = {LOSETUP: "util-linux (mount)", MOUNT: "util-linux (mount)", UMOUNT: "util-linux (mount)"}
_PACKAGES[MKFS_EXT4] = "e2fsprogs"

DEFAULT_TIMEOUT = 60.0
#: mkfs -d copies a whole tree; give it time in proportion to big images.
MKFS_TIMEOUT = 1800.0
#: After a timeout the child is killed; a process stuck in the kernel (D state, e.g. on a dead FUSE
#: device) cannot die, so we wait this long for it and then abandon it rather than hang ourselves.
_KILL_GRACE = 5.0
#: How long `loop_detach` waits for the kernel to finish releasing a device it was told to detach.
_DETACH_SETTLE = 2.0

BLOCK_SIZE = 4096
SYS_BLOCK = "/sys/block"
_LOOP_RE = re.compile(r"^/dev/loop([0-9]+)$")
_OCTAL_RE = re.compile(rb"\\([0-7]{3})")


# -- running commands ----------------------------------------------------------------------------


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    remedy: str = "check the path and the kernel log (dmesg)",
) -> str:
    """Run `argv` (no shell) and return its stdout; raise `MountError` on any failure.

    `what` completes "cannot ..." in the message. The child gets ``LC_ALL=C`` (messages we log and
    show are the same on every host) plus `env`.
    """
    argv = list(argv)
    full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            encoding="utf-8",
            errors="replace",
        )
    except FileNotFoundError:
        pkg = _PACKAGES.get(argv[0], "the package that provides it")
        raise MountError(
            what, argv, None, f"{argv[0]}: command not found", f"install {pkg} and check PATH"
        ) from None
    except OSError as e:
        raise MountError(what, argv, None, f"{argv[0]}: {e.strerror or e}", remedy) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except (KeyboardInterrupt, SystemExit):
        # Interrupted (Ctrl-C, SIGTERM): let the command finish — they are short — so that what it did
        # (a loop device attached, a mount made) exists by the time the caller's cleanup looks for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=timeout)
        raise
    except subprocess.TimeoutExpired:
        proc.kill()
        err = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, err = proc.communicate(timeout=_KILL_GRACE)
        stuck = "" if proc.returncode is not None else " and could not be killed (stuck in the kernel)"
        raise MountError(
            what,
            argv,
            None,
            f"timed out after {timeout:g} s{stuck}" + (f"; it said: {err.strip()}" if err.strip() else ""),
            "a hung FUSE device or a dead network can block I/O; check `damselfly` device logs and dmesg",
        ) from None
    if proc.returncode != 0:
        raise MountError(what, argv, proc.returncode, err, remedy)
    return out


# -- loop devices --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device, as ``/sys/block/loopN/`` reports it."""

    device: str  # /dev/loopN
    backing_file: str  # the path the kernel recorded at attach time
    deleted: bool  # the backing file has been unlinked since (the kernel shows " (deleted)")
    read_only: bool
    direct_io: bool
    offset: int
    sizelimit: int


def _read_sys(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read().rstrip("\n")


def _loop_info(name: str) -> LoopDevice | None:
    """The state of ``/dev/<name>``, or None when it is not attached.

    The kernel creates ``/sys/block/loopN/loop/`` when a file is bound and removes it when the device
    is cleared, so a missing ``backing_file`` means "free".
    """
    base = os.path.join(SYS_BLOCK, name)
    try:
        backing = _read_sys(os.path.join(base, "loop", "backing_file"))
        read_only = _read_sys(os.path.join(base, "ro")) == "1"
        dio = _read_sys(os.path.join(base, "loop", "dio")) == "1"
        offset = int(_read_sys(os.path.join(base, "loop", "offset")))
        sizelimit = int(_read_sys(os.path.join(base, "loop", "sizelimit")))
    except ValueError:
        return None
    except OSError as e:
        # Missing: never attached. ENODEV/ENXIO: being detached while we read (seen under load).
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return None
        raise
    deleted = backing.endswith(" (deleted)")
    if deleted:
        backing = backing[: -len(" (deleted)")]
    return LoopDevice(f"/dev/{name}", backing, deleted, read_only, dio, offset, sizelimit)


def _loop_name(dev: str) -> str:
    m = _LOOP_RE.match(dev)
    if m is None:
        raise MountError(
            f"use {dev!r} as a loop device", [], None, "it is not a loop device", "pass a /dev/loopN path"
        )
    return f"loop{m.group(1)}"


def loop_devices() -> list[LoopDevice]:
    """Every attached loop device, in device-number order."""
    try:
        names = [n for n in os.listdir(SYS_BLOCK) if n.startswith("loop") and n[4:].isdigit()]
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names, key=lambda n: int(n[4:])):
        info = _loop_info(name)
        if info is not None:
            out.append(info)
    return out


def loop_info(dev: str) -> LoopDevice | None:
    """The state of loop device `dev` (``/dev/loopN``), or None when it is not attached."""
    return _loop_info(_loop_name(dev))


def loops_for(backing_path: str | os.PathLike[str]) -> list[str]:
    """The loop devices bound to the file now at `backing_path` (not to an unlinked earlier one)."""
    target = os.path.realpath(backing_path)
    return [d.device for d in loop_devices() if d.backing_file == target and not d.deleted]


def loop_attach(
    path: str | os.PathLike[str],
    read_only: bool = True,
    direct_io: bool = False,
    sector_size: int | None = None,
    *,
    reuse: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Bind a free loop device to the file at `path`; return ``/dev/loopN``.

    ``direct_io`` asks the loop driver to bypass the page cache of the backing file (no double caching
    of a FUSE device's bytes); the kernel falls back to buffered I/O where the file does not support
    it, which is logged. ``reuse=True`` returns a device already bound to the same file with the same
    read-only mode, offset 0 and no size limit, if there is one (how a restarted process finds its
    device again).
    """
    real = os.path.realpath(path)
    if reuse:
        for d in loop_devices():
            if (d.backing_file, d.deleted, d.read_only, d.offset, d.sizelimit) == (
                real,
                False,
                read_only,
                0,
                0,
            ):
                return d.device
    argv = [LOSETUP, "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    if direct_io:
        argv.append("--direct-io=on")
    if sector_size is not None:
        if sector_size not in (512, 1024, 2048, 4096):
            raise MountError(
                f"attach a loop device to {real}",
                [],
                None,
                f"sector size {sector_size} is not one of 512, 1024, 2048, 4096",
                "pass a supported logical sector size",
            )
        argv += ["--sector-size", str(sector_size)]
    argv += ["--", real]
    out = run_tool(
        argv,
        what=f"attach a loop device to {real}",
        timeout=timeout,
        remedy="check that the file exists and that /dev/loop-control is usable (root, CAP_SYS_ADMIN)",
    )
    dev = out.strip()
    if _LOOP_RE.match(dev) is None:
        raise MountError(
            f"attach a loop device to {real}", argv, 0, f"unexpected output {out!r}", "report this bug"
        )
    if direct_io:
        info = loop_info(dev)
        if info is not None and not info.direct_io:
            log.warning("%s: direct I/O not supported by %s's filesystem; using buffered I/O", dev, real)
    return dev


def loop_detach(
    dev: str, *, backing_file: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Detach loop device `dev`; a device that is not attached is fine.

    Device numbers are reused as soon as they are free, so a retry could meet someone else's device
    under the same name: pass `backing_file` and a device bound to another file is left alone.

    If the device is still in use (mounted, open), the kernel only marks it for automatic clearing
    and detaches it when its last user goes; this returns without waiting for that.
    """
    name = _loop_name(dev)
    info = _loop_info(name)
    if info is None:
        return
    if backing_file is not None and info.backing_file != os.path.realpath(backing_file):
        return
    try:
        run_tool(
            [LOSETUP, "--detach", dev],
            what=f"detach loop device {dev}",
            timeout=timeout,
            remedy=f"see who holds it: `lsblk {dev}`, `grep {dev} /proc/self/mountinfo`",
        )
    except MountError:
        if _loop_info(name) is None:  # someone else detached it meanwhile: the goal is reached
            return
        raise
    # The kernel clears the device on the last close, which is usually losetup's own; a short-lived
    # opener (udev's blkid) can delay it a little. A mounted device stays until it is unmounted.
    if any(m.source == dev for m in mountinfo()):
        return
    deadline = time.monotonic() + _DETACH_SETTLE
    while _loop_info(name) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


# -- ext4 ----------------------------------------------------------------------------------------


@functools.cache
def _e2fsprogs_version() -> tuple[int, ...]:
    try:
        proc = subprocess.run(
            [MKFS_EXT4, "-V"], capture_output=True, text=True, timeout=DEFAULT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", proc.stdout + proc.stderr)
    return tuple(int(g) for g in m.groups(default="0")) if m else ()


def mkfs_ext4(
    target: str | os.PathLike[str],
    size_bytes: int | None = None,
    *,
    uuid: str | None = None,
    hash_seed: str | None = None,
    root_dir: str | os.PathLike[str] | None = None,
    label: str | None = None,
    fake_time: int | None = None,
    inodes: int | None = None,
    prezeroed: bool | None = None,
    metadata_csum: bool = True,
    timeout: float = MKFS_TIMEOUT,
) -> None:
    """Make a journal-less ext4 on `target` (a file or block device); see the module docstring.

    With `size_bytes`, `target` is (re)created as a sparse file of that size first — and removed again
    if mkfs fails. `root_dir` fills the filesystem from a directory (``mkfs.ext4 -d``: contents, modes,
    owners, times, hard links, symlinks, special files and xattrs; the root directory itself gets mode
    0755 and owner 0:0). `inodes` sets the inode count (``-N``). `prezeroed` says every byte of `target`
    reads as zero (default: true exactly when we created the file here). ``metadata_csum=False`` uses
    the older group-descriptor checksums (``uninit_bg``) instead: what the converter needs to rewrite
    inode generations, which seed every metadata checksum of an inode.
    """
    path = os.fspath(target)
    what = f"create an ext4 filesystem on {path}"

    def refuse(why: str, remedy: str) -> MountError:
        return MountError(what, [], None, why, remedy)

    ext_opts = ["nodiscard", "lazy_itable_init=1", "root_owner=0:0"]
    features = "^has_journal" if metadata_csum else "^has_journal,^metadata_csum,uninit_bg"
    argv = [MKFS_EXT4, "-F", "-q", "-b", str(BLOCK_SIZE), "-m", "0", "-O", features]
    if uuid is not None:
        argv += ["-U", _check_uuid(uuid, what)]
    if hash_seed is not None:
        ext_opts.append(f"hash_seed={_check_uuid(hash_seed, what)}")
    if label is not None:
        if len(label.encode()) > 16:
            raise refuse(f"label {label!r} is longer than 16 bytes", "use a shorter label")
        argv += ["-L", label]
    if inodes is not None:
        argv += ["-N", str(inodes)]
    if root_dir is not None:
        argv += ["-d", os.fspath(root_dir)]
    if size_bytes is not None and (size_bytes <= 0 or size_bytes % BLOCK_SIZE):
        raise refuse(f"size {size_bytes} is not a positive multiple of {BLOCK_SIZE}", "round the size")
    if prezeroed is None:
        prezeroed = size_bytes is not None
    if prezeroed and _e2fsprogs_version() >= (1, 47):
        ext_opts.append("assume_storage_prezeroed=1")
    argv += ["-E", ",".join(ext_opts), "--", path]
    env = {"E2FSPROGS_FAKE_TIME": str(int(fake_time))} if fake_time is not None else None

    created = False
    if size_bytes is not None:
        # Truncate to 0 first: bytes left over from an older file would contradict "prezeroed".
        with open(path, "wb") as f:
            created = True
            f.truncate(size_bytes)
    try:
        run_tool(
            argv,
            what=what,
            timeout=timeout,
            env=env,
            remedy="check the size (it must hold the source tree), the source directory and free disk space",
        )
    except BaseException:
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise


def _check_uuid(text: str, what: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise MountError(
            what,
            [],
            None,
            f"{text!r} is not a UUID",
            "pass one like 01234567-89ab-4def-8123-456789abcdef",
        ) from None


# -- mounts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/<pid>/mountinfo`` (proc(5)), with escapes decoded."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str  # the path inside the filesystem that is mounted here
    mount_point: str
    options: tuple[str, ...]  # per-mount options (ro, nosuid, relatime, ...)
    optional: tuple[str, ...]  # shared:N, master:N, ...
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per-superblock options (ro, norecovery, lowerdir=..., ...)

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo (fs/proc_namespace.c, mangle()).
    return os.fsdecode(_OCTAL_RE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def parse_mountinfo(data: bytes, where: str = "mountinfo") -> list[MountInfo]:
    """Parse the text of a mountinfo file."""
    out = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            major, minor = fields[2].split(b":")
            out.append(
                MountInfo(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major),
                    minor=int(minor),
                    root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    options=tuple(_unescape(fields[5]).split(",")),
                    optional=tuple(_unescape(f) for f in fields[6:sep]),
                    fstype=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    super_options=tuple(_unescape(fields[sep + 3]).split(","))
                    if sep + 3 < len(fields)
                    else (),
                )
            )
        except (ValueError, IndexError):
            raise MountError(
                f"parse {where} line {lineno}",
                [],
                None,
                f"unexpected line {line!r}",
                "report this bug with the line",
            ) from None
    return out


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mount table of process `pid` (default: ours), in the kernel's order (parents first)."""
    path = f"/proc/{pid}/mountinfo"
    with open(path, "rb") as f:
        return parse_mountinfo(f.read(), path)


def _canonical(target: str | os.PathLike[str]) -> str:
    """The absolute path the kernel shows for a mount at `target`.

    Only the parent is resolved: resolving the mount point itself would stat the mounted root, which
    hangs on a FUSE filesystem whose server is stuck — exactly when we want to unmount it.
    """
    path = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def find_mount(target: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at `target` (the last one mounted there), or None."""
    where = _canonical(target)
    found = None
    for m in mountinfo():
        if m.mount_point == where:
            found = m
    return found


def is_mounted(target: str | os.PathLike[str]) -> bool:
    return find_mount(target) is not None


def mount(
    source: str,
    target: str | os.PathLike[str],
    fstype: str,
    options: Sequence[str] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Mount `source` (a device, or a name like ``overlay``) of type `fstype` at `target`.

    `options` are single options (``"ro"``, ``"noload"``, ``"lowerdir=/a:/b"``); none may contain a
    comma, since mount(8) would split it. Mounting the same source and type again is a no-op.
    """
    where = _canonical(target)
    argv = [MOUNT, "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += ["--", source, where]
    what = f"mount {fstype} {source} at {where}"
    bad = [o for o in options if not o or "," in o]
    if bad:
        raise MountError(what, [], None, f"options {bad!r} are empty or contain a comma", "split them")
    current = find_mount(where)
    if current is not None:
        want_ro = "ro" in options
        if (current.source, current.fstype, current.read_only) == (source, fstype, want_ro):
            return
        raise MountError(
            what,
            [],
            None,
            f"{where} already has {current.fstype} {current.source} mounted "
            f"({'ro' if current.read_only else 'rw'})",
            f"unmount it first (`umount {where}`)",
        )
    run_tool(argv, what=what, timeout=timeout, remedy="see dmesg for the kernel's reason")


def umount(target: str | os.PathLike[str], lazy: bool = False, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Unmount the topmost mount at `target`; a target that is not a mount point is fine.

    ``lazy`` detaches the mount now and lets the kernel finish when it is no longer busy (MNT_DETACH).
    """
    where = _canonical(target)
    if not is_mounted(where):
        return
    argv = [UMOUNT, *(["--lazy"] if lazy else []), "--", where]
    try:
        run_tool(
            argv,
            what=f"unmount {where}",
            timeout=timeout,
            remedy=f"find what keeps it busy (`fuser -vm {where}`), or unmount lazily",
        )
    except MountError:
        if not is_mounted(where):
            return
        raise


def mount_loop(
    image: str | os.PathLike[str],
    target: str | os.PathLike[str],
    fstype: str = "ext4",
    options: Sequence[str] = ("ro", "noload"),
    *,
    direct_io: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Attach `image` to a loop device and mount it at `target`; return the device.

    The device is read-only when ``"ro"`` is among `options`. If the mount fails the device is
    detached again, so a failure leaves nothing behind. Already mounted from `image`: returns that
    device.
    """
    real = os.path.realpath(image)
    current = find_mount(target)
    if current is not None:
        info = loop_info(current.source) if _LOOP_RE.match(current.source) else None
        if info is not None and info.backing_file == real and not info.deleted:
            mount(current.source, target, fstype, options, timeout=timeout)  # checks type and ro
            return current.source
        where = _canonical(target)
        raise MountError(
            f"mount {real} at {where}",
            [],
            None,
            f"{where} already has {current.fstype} {current.source} mounted",
            f"unmount it first (`umount {where}`)",
        )
    dev = loop_attach(real, read_only="ro" in options, direct_io=direct_io, timeout=timeout)
    try:
        mount(dev, target, fstype, options, timeout=timeout)
    except BaseException as e:
        try:
            loop_detach(dev, backing_file=real, timeout=timeout)
        except MountError as cleanup:
            e.add_note(f"and the loop device could not be detached: {cleanup}")
        raise
    return dev


def umount_loop(
    target: str | os.PathLike[str], lazy: bool = False, *, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Unmount `target` and detach its loop device unless another mount still uses that device."""
    current = find_mount(target)
    if current is None:
        return
    info = loop_info(current.source) if _LOOP_RE.match(current.source) else None
    umount(target, lazy, timeout=timeout)
    if info is None:
        return
    if any((m.major, m.minor) == (current.major, current.minor) for m in mountinfo()):
        return
    loop_detach(current.source, backing_file=info.backing_file, timeout=timeout)
