"""Loop devices (util-linux ``losetup``), their state read from ``/sys/block/loopN/``.

The kernel creates ``/sys/block/loopN/loop/`` when a file is bound and removes it when the device is
cleared, so what is attached — and to which file, read-only or not, with direct I/O or not — is read
back from sysfs, never remembered: a restarted process finds its devices again (`loop_attach` with
``reuse=True``) and a retry after a crash converges:

==================  ======================================================================================
call                when the work is already done
==================  ======================================================================================
``loop_attach``     attaches a new device (``reuse=True``: returns a device already bound to the file)
``loop_detach``     a device that is not attached (or no longer exists) is fine; one bound to another
                    file than `backing_file` (its number was reused) is left alone
==================  ======================================================================================
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass

from ..errors import MountError
from .mountinfo import mountinfo
from .tools import DEFAULT_TIMEOUT, run_tool

log = logging.getLogger(__name__)

LOSETUP = "losetup"
SYS_BLOCK = "/sys/block"
#: How long `loop_detach` waits for the kernel to finish releasing a device it was told to detach.
_DETACH_SETTLE = 2.0
_LOOP_RE = re.compile(r"^/dev/loop([0-9]+)$")


def is_loop_device(path: str) -> bool:
    """Whether `path` names a loop device (``/dev/loopN``)."""
    return _LOOP_RE.match(path) is not None


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
