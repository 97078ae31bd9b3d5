"""A private containerd 1.6 for tests, and what tests do with it (pull, run, view a chain as a tree).

`Containerd` is the demo's harness (`scripts.demolib.containerd`: its own root, state, sockets, config
and log, never the host's ``/var/lib/containerd`` or ``/run/containerd``; see there for the shim
sockets that cannot move) on a temporary directory of its own, with containerd's log at debug level and
every failure raised as `ContainerdError` carrying the tail of that log.

`stop` undoes everything by exact identity: containerd by pid (SIGTERM, then SIGKILL), containers left
in its runc root (``runc delete --force``), shims whose command line names its socket (by pid), the
cgroup its containers went in, every mount below its directory (deepest first, by exact path), then the
directory. `LEDGER.leaks()` lists what any instance left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.demolib import containerd as harness
from scripts.demolib.procs import (
    cgroup_dirs,
    left_below,
    mounts_below,
    processes,
    remove_empty_cgroups,
    unmount_below,
)
from tests import trees

DEFAULT_NAMESPACE = "damselfly-test"
SHIM = harness.SHIM
SHIM_SOCKET_DIR = harness.SHIM_SOCKET_DIR


class ContainerdError(harness.CtrError, AssertionError):
    """containerd or ctr did not do what a test asked; the message carries output and the log tail."""


# -- the ledger of every instance ------------------------------------------------------------------


@dataclass
class Ledger:
    """Directories and sockets of every instance this process started, for a final leak check."""

    dirs: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def leaks(self) -> list[str]:
        found = left_below(*self.dirs)
        found += [f"directory {d}" for d in self.dirs if os.path.lexists(d)]
        for pid, argv in processes():
            if any(a in argv for a in self.addresses):
                found.append(f"process {pid}: {' '.join(argv)}")
        return found


LEDGER = Ledger()


# -- containerd ------------------------------------------------------------------------------------


class Containerd(harness.Containerd):
    """One private containerd (see the module docstring). Use `start`, then `ctr`/`pull`/`run`, `stop`."""

    def __init__(
        self,
        *,
        proxy_plugins: Mapping[str, str] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        log_level: str = "debug",
        parent: str | os.PathLike[str] = "/tmp",
        cri_snapshotter: str | None = None,
        cri_auths: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        # A short path: the socket path (plus ".ttrpc") must fit in sun_path (108 bytes).
        directory = Path(tempfile.mkdtemp(prefix="damselfly-ctrd-", dir=parent)).resolve()
        super().__init__(
            directory,
            directory / "containerd.log",
            namespace=namespace,
            proxy_plugins=proxy_plugins,
            log_level=log_level,
            cri_snapshotter=cri_snapshotter,
            cri_auths=cri_auths,
        )
        #: The cgroup (in every hierarchy) that `run` puts containers below: one per instance.
        self.cgroup_parent = directory.name
        #: Where `view_tree` mounts views (below the directory, so teardown finds any it left).
        self.mounts_dir = directory / "mnt"
        LEDGER.dirs.append(str(self.dir))
        LEDGER.addresses.append(self.address)

    def error(self, message: str) -> Exception:
        return ContainerdError(f"{message}\ncontainerd log:\n{self.log_tail()}")

    def start(self, timeout: float = 30.0) -> Containerd:
        self.mounts_dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop and remove everything (see the module docstring); return what had to be forced or cleaned
        beyond a polite SIGTERM (an empty list when the tests cleaned up after themselves)."""
        forced = super().stop(timeout)
        remove_empty_cgroups(self.cgroup_parent)
        left = mounts_below(self.dir)
        if left:  # never delete through a mount: it could reach files that are not ours
            forced.append(f"mounts left, {self.dir} kept: {left}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return forced

    def leaks(self) -> list[str]:
        """What is left of this instance: mounts, its directory, processes naming its socket."""
        found = [f"mount {mp}" for mp in mounts_below(self.dir)]
        if self.dir.exists():
            found.append(f"directory {self.dir}")
        for pid, argv in processes():
            if self.address in argv:
                found.append(f"process {pid}: {' '.join(argv)}")
        found += [f"cgroup {cg}" for cg in cgroup_dirs(self.cgroup_parent)]
        return found

    # -- pulling and running --

    def pull(
        self,
        ref: str,
        *,
        snapshotter: str = "overlayfs",
        plain_http: bool = True,
        namespace: str | None = None,
        timeout: float = 180.0,
    ) -> None:
        """``ctr image pull`` (fetch and unpack into `snapshotter`)."""
        args = ["image", "pull", "--snapshotter", snapshotter]
        if plain_http:
            args.append("--plain-http")
        self.ctr(*args, ref, namespace=namespace, timeout=timeout)

    def run(
        self,
        ref: str,
        command: Sequence[str] = (),
        *,
        container_id: str | None = None,
        snapshotter: str = "overlayfs",
        namespace: str | None = None,
        extra: Sequence[str] = (),
        detach: bool = False,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run --rm`` of `ref` (pulled before) with `command` (default: the image's); returns ctr's
        result, the container's stdout in ``.stdout``. With `detach`: ``ctr run -d`` (no ``--rm``), the
        container keeps running (``ctr task kill`` and ``ctr container rm`` it, or `stop` removes it).

        Fifos and runc state stay below our directory; the container's cgroup is ``/PARENT/ID`` with
        PARENT = `cgroup_parent` (runc removes it with the container; the parent once it is empty)."""
        cid = container_id or f"t-{uuid.uuid4().hex[:12]}"
        cgroup = f"/{self.cgroup_parent}/{cid}"
        args = self.run_args(
            ref, cid, command, snapshotter=snapshotter, cgroup=cgroup, detach=detach, extra=extra
        )
        try:
            return self.ctr(*args, namespace=namespace, check=check, timeout=timeout)
        finally:
            if not detach:
                remove_empty_cgroups(self.cgroup_parent)

    # -- images and snapshots --

    def content(self, digest: str, *, namespace: str | None = None) -> bytes:
        """A blob of containerd's content store (``ctr content get``)."""
        r = subprocess.run(
            self.argv(["content", "get", digest], namespace),
            capture_output=True,
            timeout=60,
            check=False,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise self.error(f"ctr content get {digest}: {r.stderr.decode(errors='replace')}")
        return r.stdout

    def image_target(self, ref: str, *, namespace: str | None = None) -> str:
        """The digest an image record points at (manifest or index)."""
        out = self.ctr("image", "ls", namespace=namespace).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if cols and cols[0] == ref:
                for c in cols:
                    if c.startswith("sha256:"):
                        return c
        raise ContainerdError(f"image {ref} is not in containerd's image store:\n{out}")

    def image_chain_id(self, ref: str, *, namespace: str | None = None) -> str:
        """The chain ID of the image's top layer for this platform (its committed snapshot's name)."""
        from tests.oci_images import chain_ids, host_arch  # noqa: PLC0415

        doc = json.loads(self.content(self.image_target(ref, namespace=namespace), namespace=namespace))
        if "manifests" in doc:  # an index: the manifest of this machine's platform
            arch = host_arch()
            matches = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture") == arch]
            if not matches:
                raise ContainerdError(f"{ref}: no manifest for linux/{arch} in its index")
            doc = json.loads(self.content(matches[0]["digest"], namespace=namespace))
        config = json.loads(self.content(doc["config"]["digest"], namespace=namespace))
        return chain_ids(config["rootfs"]["diff_ids"])[-1]

    @contextlib.contextmanager
    def view(
        self, parent: str, *, snapshotter: str = "overlayfs", namespace: str | None = None
    ) -> Iterator[Path]:
        """A read-only view of the committed snapshot `parent`, mounted by this process below
        `mounts_dir`; unmounted and removed on exit."""
        key = f"damselfly-test-view-{uuid.uuid4().hex[:12]}"
        target = self.mounts_dir / key
        target.mkdir(parents=True)
        out = self.ctr(
            "snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, parent, namespace=namespace
        ).stdout
        try:
            mount_all(json.loads(out), target)
            try:
                yield target
            finally:
                unmount_below(target)
        finally:
            self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, namespace=namespace, check=False)
            with contextlib.suppress(OSError):
                target.rmdir()


def mount_all(mounts: Sequence[Mapping[str, Any]], target: Path) -> None:
    """Perform containerd mounts (``ctr ... --mounts`` JSON: Type, Source, Options) on `target`, in
    order, as containerd's ``mount.All`` does: a bind (``rbind``/``bind`` in the options) or a typed
    mount (overlay, ext4...)."""
    for m in mounts:
        kind, source, options = m["Type"], m["Source"], list(m.get("Options") or [])
        if kind == "bind" or "bind" in options or "rbind" in options:
            argv = ["mount", "-o", ",".join(options), "--", source, str(target)]
        else:
            argv = ["mount", "-t", kind, "-o", ",".join(options), "--", source, str(target)]
        r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if r.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


# -- trees of images -------------------------------------------------------------------------------


def view_tree(
    containerd: Containerd,
    ref: str,
    *,
    snapshotter: str = "overlayfs",
    namespace: str | None = None,
    ignore: Sequence[str] = trees.DEFAULT_IGNORE,
) -> trees.Tree:
    """The tree of an image already unpacked into `snapshotter`: a view of its top chain ID, mounted,
    snapshotted (`tests.trees.snapshot`), unmounted and removed."""
    chain = containerd.image_chain_id(ref, namespace=namespace)
    with containerd.view(chain, snapshotter=snapshotter, namespace=namespace) as mnt:
        return trees.snapshot(mnt, ignore=ignore)


def overlay_tree(
    containerd: Containerd,
    ref: str,
    *,
    namespace: str | None = None,
    ignore: Sequence[str] = trees.DEFAULT_IGNORE,
) -> trees.Tree:
    """The tree containerd's own overlayfs snapshotter makes of `ref` (a loopback registry reference):
    ``ctr image pull --plain-http``, then `view_tree`. The reference result for converter tests."""
    containerd.pull(ref, snapshotter="overlayfs", namespace=namespace)
    return view_tree(containerd, ref, snapshotter="overlayfs", namespace=namespace, ignore=ignore)


# -- tasks -----------------------------------------------------------------------------------------


def task_status(c: Containerd) -> dict[str, str]:
    """Task id -> status (``RUNNING``, ``STOPPED``) from ``ctr task ls``."""
    out = {}
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3:
            out[cols[0]] = cols[2]
    return out


def wait_task(c: Containerd, cid: str, status: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while task_status(c).get(cid) != status:
        assert time.monotonic() < deadline, f"task {cid} is not {status}: {task_status(c)}"
        time.sleep(0.1)


def remove_container(c: Containerd, cid: str) -> None:
    """Kill (SIGKILL) and remove container `cid`'s task, then the container."""
    if cid in task_status(c):
        c.ctr("task", "kill", "--signal", "SIGKILL", cid, check=False)
        wait_task(c, cid, "STOPPED")
        c.ctr("task", "rm", cid)
    c.ctr("container", "rm", cid)
