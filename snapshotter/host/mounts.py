"""Mounts: idempotent wrappers over util-linux ``mount`` and ``umount``, and loop mounts of images.

Every call runs one command (`snapshotter.host.tools.run_tool`: argv list, timeout, ``LC_ALL=C``,
`MountError` with the command, its status and its stderr). State is read back from the kernel
(`snapshotter.host.mountinfo`, `snapshotter.host.loop`), never remembered, so a retry after a crash
converges instead of failing:

==================  ======================================================================================
call                when the work is already done
==================  ======================================================================================
``mount``           the same source and type already mounted at the target is fine; anything else there
                    is a `MountError`
``umount``          a target that is not a mount point is fine
``mount_loop``      the target already mounted from a loop device over the same file is fine
``umount_loop``     not mounted is fine; the loop device is detached unless another mount still uses it
==================  ======================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import MountError
from .loop import is_loop_device, loop_attach, loop_detach, loop_info
from .mountinfo import canonical, find_mount, is_mounted, mountinfo
from .tools import DEFAULT_TIMEOUT, run_tool

MOUNT = "mount"
UMOUNT = "umount"


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
    where = canonical(target)
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
    where = canonical(target)
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
        info = loop_info(current.source) if is_loop_device(current.source) else None
        if info is not None and info.backing_file == real and not info.deleted:
            mount(current.source, target, fstype, options, timeout=timeout)  # checks type and ro
            return current.source
        where = canonical(target)
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
    info = loop_info(current.source) if is_loop_device(current.source) else None
    umount(target, lazy, timeout=timeout)
    if info is None:
        return
    if any((m.major, m.minor) == (current.major, current.minor) for m in mountinfo()):
        return
    loop_detach(current.source, backing_file=info.backing_file, timeout=timeout)
