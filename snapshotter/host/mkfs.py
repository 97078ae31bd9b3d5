"""``mkfs.ext4`` for damselfly devices: journal-less, reproducible, writing as few blocks as it can.

Why these ext4 options: a damselfly device is a sparse file or a FUSE file over layers, so whatever
mkfs writes becomes layer data. ``^has_journal`` (images are mounted ``ro,noload``; a writable upper
records its own crash-safe log), ``nodiscard`` (a discard of the whole device would only become one
huge trim record), ``lazy_itable_init=1`` plus, on e2fsprogs >= 1.47 and a freshly created file,
``assume_storage_prezeroed=1`` (inode tables are not written, and are marked as zeroed so the kernel's
lazy-init thread never writes them either — a sparse file reads as zeros), ``-m 0`` (no blocks
reserved for root in an image), ``-b 4096`` (the layer alignment). A fixed UUID, hash seed and
``E2FSPROGS_FAKE_TIME`` make the bytes reproducible.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import uuid as uuidlib

from ..errors import MountError
from .tools import DEFAULT_TIMEOUT, run_tool

MKFS_EXT4 = "mkfs.ext4"
BLOCK_SIZE = 4096
#: mkfs -d copies a whole tree; give it time in proportion to big images.
MKFS_TIMEOUT = 1800.0


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
