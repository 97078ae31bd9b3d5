"""The tree under a layer's root: safe paths, removal of what lower layers left, directory times.

`RootTree` is what `applytar` changes the filesystem through, one entry at a time:

- **Path safety.** Every name is normalised (``./x``, ``a/../b``; ``/x`` is ``x``, as containerd applies
  it) and must stay under root without ever naming root's parent. Each parent directory is checked
  with ``lstat`` before anything is created, removed or linked through it, and a symlink met on the
  way is an error, never followed: ``link -> /`` followed by ``link/etc/passwd`` (or a whiteout or
  hardlink through ``link``) fails and touches nothing outside root. We rely on being the only writer
  under root while applying, which holds for a converter's private mount.
- **Removal.** Whiteouts and opaque directories remove what lower layers left (`prune`), never what
  this layer made or `preserve` names (its paths and their ancestors are *mine*); an entry replaces
  whatever is at its path (`make_room`). With `hold_removed` every removed inode stays referenced until
  `release`, so the filesystem frees them all at the end in one order, never midway where its
  allocator would reuse them depending on the clock (the converter's reproducible allocation).
- **Determinism.** The wall clock never reaches the tree: directories whose children change get their
  earlier times back (`touch` records them first); parents the tar implies but does not list are made
  ``0755 0:0`` with the time of the entry that needed them; `restore_times` sets every directory's
  times once nothing will add children to it any more.

Every failure is a `LayerError` naming the layer and the entry being applied (`entry`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable

from ..errors import LayerError

_ROOT_REMEDY = (
    "applying a layer needs root (CAP_CHOWN, CAP_MKNOD, CAP_FOWNER, CAP_SYS_ADMIN for trusted.* xattrs): "
    "run the conversion as root or in a privileged CI runner"
)


class RootTree:
    """The directory `root` (resolved, trusted) that layer `layer` is applied onto."""

    def __init__(
        self, root: str, layer: str, preserve: Iterable[str] = (), hold_removed: bool = False
    ) -> None:
        self.root = root
        self.layer = layer
        self.entry: str | None = None  # the tar entry being applied, for errors
        self.removed = 0  # lower-layer paths (a file or a whole tree) removed by whiteouts and opaques
        self.replaced = 0  # existing paths (a whole tree for a dir) removed to make room for an entry
        self._hold = hold_removed
        self._held: list[int] = []
        # Paths this layer created or modified, and their ancestors: what whiteouts and opaque
        # directories must leave alone (plus `preserve`, e.g. ext4's lost+found).
        self._mine: set[str] = set()
        for path in preserve:
            self.mark_mine(path.strip("/"))
        # Directories already checked to be real directories, with every ancestor ("" for root): a
        # directory is added after its parents and removed with its whole tree (`remove`).
        self._dirs: set[str] = set()
        # Directories this layer made (empty then): a path in one exists only if this layer made it,
        # so `make_room` needs no lstat for the other names there (most of a layer's entries).
        self._fresh: set[str] = set()
        self._dir_times: dict[str, tuple[int, int]] = {}  # (atime, mtime) ns to set at the end

    # -- errors --

    def err(self, why: str, remedy: str | None = None) -> LayerError:
        if remedy is None:
            return LayerError(self.layer, self.entry, why)
        return LayerError(self.layer, self.entry, why, remedy)

    def os_error(self, e: OSError, what: str) -> LayerError:
        why = f"{what}: {e.strerror or e}"
        if e.errno in (errno.EPERM, errno.EACCES):
            return self.err(why, _ROOT_REMEDY)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.err(why, "the target filesystem is full: give the layer device a larger size")
        return self.err(why)

    # -- paths --

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def clean(self, name: str, what: str) -> str:
        """`name` as a normalised path relative to root ("" for root itself), or a LayerError."""
        wrapped = f"/{name}/"
        if "//" not in wrapped and "/./" not in wrapped and "/../" not in wrapped:
            return name  # no empty, "." or ".." component, no leading or trailing "/": clean already
        # A leading "/" names the same path relative to the root, as containerd applies it (OCI
        # layer.md says paths are relative; docker-archive tools write absolute ones). "/.." still
        # leaves the root and fails below.
        parts: list[str] = []
        for comp in name.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    raise self.err(f"{what} {name!r} leaves the root through '..'")
                parts.pop()
            else:
                parts.append(comp)
        return "/".join(parts)

    def parents(self, rel: str, *, create: bool, mtime_ns: int = 0) -> bool:
        """Check (and with `create`, make) every parent of `rel`; False if one is missing or no dir.

        A symlink among them is always an error: nothing is ever written, removed or linked through
        one. Created parents are ``0755 0:0`` with time `mtime_ns`, as containerd's MkdirAll makes them.
        """
        if rel.rpartition("/")[0] in self._dirs:  # (so are all its ancestors: see `_dirs`)
            return True
        prefix = ""
        for comp in rel.split("/")[:-1]:
            parent, prefix = prefix, f"{prefix}/{comp}" if prefix else comp
            if prefix in self._dirs:
                continue
            path = self.path(prefix)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return False
                self.touch(parent)
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)  # whatever the umask
                self._dir_times[prefix] = (mtime_ns, mtime_ns)
                self._dirs.add(prefix)
                self._fresh.add(prefix)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.err(
                    f"parent {prefix!r} is a symlink (to {os.readlink(path)!r}); layer entries are never "
                    "written, removed or linked through symlinks, which could reach outside the root"
                )
            if not stat.S_ISDIR(st.st_mode):
                if not create:
                    return False
                raise self.err(f"parent {prefix!r} is not a directory")
            self._dirs.add(prefix)
        return True

    def mark_mine(self, rel: str) -> None:
        mine = self._mine
        while rel not in mine:
            mine.add(rel)
            rel = rel.rpartition("/")[0]

    def touch(self, dir_rel: str) -> None:
        """Remember a directory's times before its children change (see "Determinism")."""
        if dir_rel not in self._dir_times:
            st = os.lstat(self.path(dir_rel))
            self._dir_times[dir_rel] = (st.st_atime_ns, st.st_mtime_ns)

    def remove(self, rel: str, st: os.stat_result) -> None:
        self.touch(rel.rpartition("/")[0])
        path = self.path(rel)
        if self._hold:
            self._hold_tree(path, stat.S_ISDIR(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # fd-based: never follows a symlink inside the tree
            inside = rel + "/"
            self._dirs = {d for d in self._dirs if d != rel and not d.startswith(inside)}
            self._fresh = {d for d in self._fresh if d != rel and not d.startswith(inside)}
            gone = [d for d in self._dir_times if d == rel or d.startswith(inside)]
            for d in gone:
                del self._dir_times[d]
        else:
            os.unlink(path)

    def make_room(self, rel: str, *, for_dir: bool) -> bool:
        """Clear `rel` for a new entry; True when it is a directory that a directory entry keeps."""
        parent = rel.rpartition("/")[0]
        if parent in self._fresh and rel not in self._mine:
            # Nothing to remove in a directory this layer made, but a path it made itself; and the
            # parent's times were recorded when it was made, so `touch` has nothing to do (no lstat).
            return False
        try:
            st = os.lstat(self.path(rel))
        except FileNotFoundError:
            self.touch(rel.rpartition("/")[0])
            return False
        if for_dir and stat.S_ISDIR(st.st_mode):
            return True
        self.remove(rel, st)
        self.replaced += 1
        return False

    def prune(self, rel: str) -> None:
        """Remove what lower layers left at and below `rel`; keep what this layer made there."""
        stack = [rel]
        while stack:
            cur = stack.pop()
            try:
                st = os.lstat(self.path(cur))
            except FileNotFoundError:
                continue
            if cur not in self._mine:
                self.remove(cur, st)
                self.removed += 1
            elif stat.S_ISDIR(st.st_mode):
                stack.extend(f"{cur}/{name}" for name in os.listdir(self.path(cur)))

    # -- directories and times --

    def add_dir(self, rel: str, times: tuple[int, int], *, made: bool = False) -> None:
        """A directory this layer's entry made (`made`: it was created empty) or kept: checked, mine,
        its times set at the end."""
        self._dirs.add(rel)
        if made:
            self._fresh.add(rel)
        self._dir_times[rel] = times
        self.mark_mine(rel)

    def restore_times(self) -> None:
        """Set directory times, now that no child will change them any more."""
        self.entry = None
        for rel, (atime, mtime) in sorted(self._dir_times.items()):
            path = self.path(rel)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self.os_error(e, f"cannot set the times of directory {rel or '.'!r}") from None

    # -- holding removed inodes --

    def _hold_tree(self, path: str, is_dir: bool) -> None:
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        if is_dir:
            for top, dirs, files in os.walk(path, topdown=True, followlinks=False):
                for name in dirs + files:
                    self._held.append(os.open(os.path.join(top, name), flags))
        self._held.append(os.open(path, flags))

    def release(self) -> None:
        """Let the filesystem free what this layer removed (see `hold_removed`)."""
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)
