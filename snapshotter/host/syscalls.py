"""mount(2) and umount2(2) through libc, for the mounts no command can make (a FUSE mount with the
server's /dev/fuse descriptor) and for unmounts that must not wait on a hung filesystem."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc  # noqa: PLW0603 - one handle per process
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); an `OSError` names the type, the target and the kernel's reason."""
    if _lib().mount(source.encode(), target.encode(), fstype.encode(), flags, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}", target)


def unmount_path(target: str, flags: int = 0) -> None:
    """umount2(2); a target that is not mounted (any more) is fine."""
    if _lib().umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}", target)
