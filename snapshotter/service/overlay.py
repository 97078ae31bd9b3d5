"""The overlay driver: the snapshot directories under ``<root>/snapshots/<id>/`` and their mounts.

It owns only directories named by snapshot id (the metadata store owns names, kinds and parents),
laid out like containerd 1.6's overlayfs snapshotter::

    <root>/snapshots/<id>/fs      the snapshot's files: the upperdir of an active snapshot, a lowerdir
                                  once committed (mode 0755, owner copied from the parent's fs)
    <root>/snapshots/<id>/work    overlayfs' workdir (active snapshots only, mode 0711)
    <root>/snapshots/new-XXXXXX   a directory being built; renamed to <id> when complete

A directory is built under a temporary name and renamed into place last, so ``<id>`` is either
absent or complete; anything in ``snapshots/`` whose name is not a live id (a leftover ``new-*``
after a crash, a removed snapshot whose deletion failed) is an orphan that `orphans` lists for Cleanup.

Mounts follow containerd's overlayfs snapshotter exactly:

| snapshot | parents | mount |
|---|---|---|
| active | none | ``bind <fs>`` options ``rw,rbind`` |
| view | none | ``bind <fs>`` options ``ro,rbind`` |
| active | 1+ | ``overlay`` options ``[index=off,]workdir=<work>,upperdir=<fs>,lowerdir=<p1>:<p2>...`` |
| view | 1 | ``bind <p1>`` options ``ro,rbind`` |
| view | 2+ | ``overlay`` options ``[index=off,]lowerdir=<p1>:<p2>...`` |

Lowerdirs are listed nearest parent first. ``index=off`` is added when the kernel's overlay module has
the ``index`` parameter, as containerd does. The caller may pass its own lowerdirs (e.g. a read-only
ext4 mount standing for a chain of converted layers) instead of the parents' ``fs`` directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blockformat.durable import fsync_dir, private_dir

from .records import Kind, Snapshot, Usage

log = logging.getLogger(__name__)

TEMP_PREFIX = "new-"
_OVERLAY_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


@dataclass(frozen=True)
class Mount:
    """A mount as containerd's ``containerd.types.Mount`` carries it (the target is containerd's)."""

    type: str
    source: str
    options: tuple[str, ...]


def disk_usage(path: Path) -> Usage:
    """Allocated bytes and inodes under `path`, each inode counted once (containerd's fs.DiskUsage)."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue  # removed while we walked (an active snapshot in use)
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            size += st.st_blocks * 512
        if p.is_dir() and not p.is_symlink():
            try:
                stack.extend(Path(e.path) for e in os.scandir(p))
            except FileNotFoundError:
                continue
    return Usage(size=size, inodes=len(seen))


class OverlayDriver:
    """Directories and mounts of plain (overlayfs) snapshots under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.snapshots_dir = root / "snapshots"
        private_dir(root)  # forced on every start: snapshots hold every container's files
        private_dir(self.snapshots_dir)
        self.index_off = _OVERLAY_INDEX_PARAM.exists()

    def dir_path(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id)

    def fs_path(self, snapshot_id: int) -> Path:
        return self.dir_path(snapshot_id) / "fs"

    def work_path(self, snapshot_id: int) -> Path:
        return self.dir_path(snapshot_id) / "work"

    def build(self, snapshot: Snapshot) -> Path:
        """Create the directory of a new active or view snapshot under a temporary name.

        Returns the temporary path; `install` renames it into place. The caller removes it (`discard`)
        if anything fails before that.
        """
        temp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.snapshots_dir))
        try:
            fs = temp / "fs"
            fs.mkdir()
            os.chmod(fs, 0o755)  # explicit: the service's umask must not decide (RootPermission test)
            if snapshot.info.kind is Kind.ACTIVE:
                work = temp / "work"
                work.mkdir()
                os.chmod(work, 0o711)
            if snapshot.parents:
                # As containerd: the new upper's root belongs to whoever owns the parent's root. A
                # parent without an fs directory (a remote layer may have none) leaves it root's.
                try:
                    st = self.fs_path(snapshot.parents[0].id).stat()
                except FileNotFoundError:
                    pass
                else:
                    os.lchown(fs, st.st_uid, st.st_gid)
        except BaseException:
            self.discard(temp)
            raise
        return temp

    def install(self, temp: Path, snapshot_id: int) -> Path:
        """Rename a built directory to its final name (the last step of creating a snapshot)."""
        final = self.dir_path(snapshot_id)
        os.rename(temp, final)
        fsync_dir(final.parent)  # durable before the metadata transaction that names it commits
        return final

    def discard(self, path: Path) -> None:
        """Remove a snapshot directory, best effort: a failure is logged and left to Cleanup."""
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s; Cleanup will retry", path, e)

    def remove(self, snapshot_id: int) -> None:
        self.discard(self.dir_path(snapshot_id))

    def usage(self, snapshot_id: int) -> Usage:
        return disk_usage(self.fs_path(snapshot_id))

    def orphans(self, live_ids: set[int]) -> list[Path]:
        """Entries of ``snapshots/`` that belong to no live snapshot."""
        names = {str(i) for i in live_ids}
        return sorted(
            self.snapshots_dir / name for name in os.listdir(self.snapshots_dir) if name not in names
        )

    def mounts(self, snapshot: Snapshot, lowerdirs: Sequence[str] | None = None) -> list[Mount]:
        """The mounts of an active or view snapshot (see the table in the module docstring).

        `lowerdirs` replaces the parents' ``fs`` directories (nearest first) when given.
        """
        kind = snapshot.info.kind
        if lowerdirs is None:
            lowerdirs = [str(self.fs_path(i)) for i in snapshot.parent_ids]
        if not lowerdirs:
            flag = "ro" if kind is Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_path(snapshot.id)), (flag, "rbind"))]
        if kind is Kind.VIEW and len(lowerdirs) == 1:
            return [Mount("bind", lowerdirs[0], ("ro", "rbind"))]
        options = ["index=off"] if self.index_off else []
        if kind is Kind.ACTIVE:
            options += [f"workdir={self.work_path(snapshot.id)}", f"upperdir={self.fs_path(snapshot.id)}"]
        options.append("lowerdir=" + ":".join(lowerdirs))
        return [Mount("overlay", "overlay", tuple(options))]
