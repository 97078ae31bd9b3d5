"""Durable, private files: the few file-system primitives every writer of damselfly shares.

- `fsync_dir`: a rename or a new file is durable only once its directory is synced.
- `atomic_write` / `write_file_atomic`: write a file whole or not at all — a temp file in the same
  directory, fsync, rename over the target, fsync the directory. A crash at any step leaves either
  the old file or the new one (and at worst a ``.tmp-*`` file that the next write replaces).
- `private_dir`: a directory only its owner (root, for the daemons) can enter, forced so on every
  call whoever created it and whatever the umask: node caches and device state hold image bytes
  that local users must not read (see docs/security.md).

They live in `blockformat` because it is the bottom of the dependency order: the writable upper uses
them, and so do `p2p` (the blob cache) and `snapshotter` (state, layouts, sockets).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from typing import BinaryIO

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory `path` (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a file to write; on a clean exit it replaces `path` durably, on an exception it vanishes.

    The file gets `mode` exactly (not filtered by the umask)."""
    target = os.fspath(path)
    directory = os.path.dirname(target) or "."
    tmp = os.path.join(directory, f".tmp-{os.path.basename(target)}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_file_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data`, durably and whole (`atomic_write`)."""
    with atomic_write(path, mode) as f:
        f.write(data)


def private_dir(path: str | os.PathLike[str]) -> str:
    """Create directory `path` (and missing parents) and force it to be ours and mode 0700.

    An existing directory is re-owned and re-moded whoever made it (an earlier command with another
    umask, an older version). A symlink in its place is refused rather than followed: the mode would
    land on whatever it points at. Returns the path."""
    p = os.fspath(path)
    os.makedirs(p, mode=PRIVATE_DIR_MODE, exist_ok=True)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_gid != os.getegid():
            os.fchown(fd, os.geteuid(), os.getegid())
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
            os.fchmod(fd, PRIVATE_DIR_MODE)
    finally:
        os.close(fd)
    return p
