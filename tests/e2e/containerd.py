"""A private containerd 1.6 for tests, and what tests do with it (pull, run, view a chain as a tree).

`Containerd` runs ``/usr/bin/containerd`` with its own root, state, sockets, config and log under one
temporary directory, never the host's ``/var/lib/containerd`` or ``/run/containerd`` (config version 2;
the CRI plugin and the snapshotters and runtimes that need host setup disabled; `proxy_plugins` as the
caller gives them). It is ready when ``ctr version`` answers on its socket; every failure message ends
with the tail of its log.

One host path cannot be moved in containerd 1.6: the runc v2 shim binds its socket in
``/run/containerd/s/`` whatever the state directory (``runtime/v2/shim/util_unix.go``, ``socketRoot``).
Only `run` starts shims; each removes its socket when it exits, teardown removes the socket of any shim
it had to kill (its exact path, read from the bundle's ``address`` file), and ``/run/containerd/s`` and
``/run/containerd`` are removed again if this process created them and they are empty. A mount
namespace would hide them, but containerd must see the mounts a proxy snapshotter makes on the host,
and the host's mounts are private (nothing would propagate into the namespace).

`stop` undoes everything by exact identity: containerd by pid (SIGTERM, then SIGKILL), containers left
in its runc root (``runc delete --force``), shims whose command line names its socket (by pid),
every mount below its directory (deepest first, by exact path), then the directory. `LEDGER.leaks()`
lists what any instance left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import trees
from tests.snapshotter.conftest import _mount_points

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
SHIM = "containerd-shim-runc-v2"
#: containerd 1.6 binds runc v2 shim sockets here, whatever its state directory (see the docstring).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
DEFAULT_NAMESPACE = "damselfly-test"

#: Plugins that need host setup (CRI: CNI, a pause image; aufs, btrfs, zfs, devmapper: their
#: filesystems or pools), or only slow the start. The v1 linux runtime stays: the tasks service of
#: 1.6 does not load without it (it is never used: runc v2 is the default runtime).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
#: containerd refuses to start when one of these fails to load, instead of failing later, obscurely.
REQUIRED_PLUGINS = (
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.runtime.v2.task",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
)


class ContainerdError(AssertionError):
    """containerd or ctr did not do what a test asked; the message carries output and the log tail."""


# -- the ledger of every instance ------------------------------------------------------------------


@dataclass
class Ledger:
    """Directories and sockets of every instance this process started, for a final leak check."""

    dirs: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def leaks(self) -> list[str]:
        found = []
        under = tuple(d + os.sep for d in self.dirs)
        for mp in _mount_points():
            if mp.startswith(under):
                found.append(f"mount {mp}")
        for d in self.dirs:
            if os.path.lexists(d):
                found.append(f"directory {d}")
        for pid, argv in _processes():
            if any(a in argv for a in self.addresses) or any(a.startswith(under) for a in argv):
                found.append(f"process {pid}: {' '.join(argv)}")
        return found


LEDGER = Ledger()


def _processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every live process but this one."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if raw and state != b"Z":
            yield int(name), [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")]


def _toml(value: object) -> str:
    """A TOML value (strings, bools, ints, lists of them): JSON's escapes are TOML's for these."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def mounts_below(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `path`, deepest (and latest) first: the order to unmount them."""
    top = os.path.realpath(path)
    found = [mp for mp in _mount_points() if mp == top or mp.startswith(top + os.sep)]
    return sorted(reversed(found), key=lambda mp: mp.count(os.sep), reverse=True)


def unmount_all_below(path: str | os.PathLike[str]) -> list[str]:
    """Unmount everything at or below `path`, by exact mount point; return what was unmounted."""
    done = []
    for _ in range(16):  # stacked mounts show again once the top one is gone
        points = mounts_below(path)
        if not points:
            break
        for mp in points:
            r = subprocess.run(["umount", "--", mp], capture_output=True, check=False, timeout=30)
            if r.returncode != 0:
                subprocess.run(["umount", "--lazy", "--", mp], capture_output=True, check=False, timeout=30)
            done.append(mp)
    return done


# -- containerd ------------------------------------------------------------------------------------


class Containerd:
    """One private containerd (see the module docstring). Use `start`, then `ctr`/`pull`/`run`, `stop`."""

    def __init__(
        self,
        *,
        proxy_plugins: Mapping[str, str] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        log_level: str = "debug",
        parent: str | os.PathLike[str] = "/tmp",
    ) -> None:
        # A short path: the socket path (plus ".ttrpc") must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="damselfly-ctrd-", dir=parent)).resolve()
        LEDGER.dirs.append(str(self.dir))
        self.proxy_plugins = dict(proxy_plugins or {})
        self.namespace = namespace
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self._created_run_dirs: list[Path] = []
        LEDGER.addresses.append(self.address)

    # -- paths --

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def fifo_dir(self) -> Path:
        """Where ctr makes the fifos of a task's stdio (its default is /run/containerd/fifo)."""
        return self.dir / "fifo"

    @property
    def runc_root(self) -> Path:
        """runc's state for our containers (the shim's default is /run/containerd/runc)."""
        return self.dir / "runc"

    @property
    def cgroup_parent(self) -> str:
        """The cgroup (in every hierarchy) that `run` puts containers below: one per instance."""
        return self.dir.name

    @property
    def mounts_dir(self) -> Path:
        """Where `view_tree` mounts views (below the directory, so teardown finds any it left)."""
        return self.dir / "mnt"

    def log_tail(self, size: int = 6000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- lifecycle --

    def config(self) -> str:
        lines = [
            "version = 2",
            f"root = {_toml(str(self.root))}",
            f"state = {_toml(str(self.state))}",
            f"disabled_plugins = {_toml(DISABLED_PLUGINS)}",
            f"required_plugins = {_toml(REQUIRED_PLUGINS)}",
            "oom_score = 0",
            "",
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {_toml(self.address + '.ttrpc')}",
            "",
            "[debug]",
            '  address = ""',
            f"  level = {_toml(self.log_level)}",
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(str(self.dir / 'opt'))}",
            "",
            '[plugins."io.containerd.gc.v1.scheduler"]',
            '  startup_delay = "0s"',
        ]
        for name, address in sorted(self.proxy_plugins.items()):
            lines += [
                "",
                f"[proxy_plugins.{_toml(name)}]",
                '  type = "snapshot"',
                f"  address = {_toml(address)}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> Containerd:
        for tool in (CONTAINERD, CTR, RUNC):
            if not os.access(tool, os.X_OK):
                raise ContainerdError(f"{tool} is missing: apt-get install containerd runc")
        if self.proc is not None:
            raise ContainerdError(f"containerd in {self.dir} is already running (pid {self.proc.pid})")
        for d in (self.root, self.state, self.fifo_dir, self.runc_root, self.mounts_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        for d in (SHIM_SOCKET_DIR.parent, SHIM_SOCKET_DIR):
            if not d.exists():
                self._created_run_dirs.append(d)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # a Ctrl-C of the test run reaches it only through stop()
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ContainerdError(f"containerd exited with {code} at start:\n{self.log_tail()}")
            r = self._ctr_raw(["version"], timeout=5.0)
            if r is not None and r.returncode == 0:
                return self
            if time.monotonic() > deadline:
                raise ContainerdError(
                    f"containerd did not answer on {self.address} in {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _env(self) -> dict[str, str]:
        # No CONTAINERD_* from the caller's environment (ctr reads CONTAINERD_SNAPSHOTTER, _NAMESPACE...).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        env["TMPDIR"] = str(self.dir)
        return env

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop and remove everything (see the module docstring); return what had to be forced or cleaned
        beyond a polite SIGTERM (an empty list when the tests cleaned up after themselves)."""
        forced: list[str] = []
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            _signal(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                forced.append(f"containerd {proc.pid} needed SIGKILL")
                _signal(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        forced += self._kill_containers()
        forced += self._kill_shims(timeout)
        _remove_empty_cgroups(self.cgroup_parent)
        forced += [f"umount {mp}" for mp in unmount_all_below(self.dir)]
        left = mounts_below(self.dir)
        if left:  # never delete through a mount: it could reach files that are not ours
            forced.append(f"mounts left, {self.dir} kept: {left}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        for d in reversed(self._created_run_dirs):
            with contextlib.suppress(OSError):  # only if empty: another containerd may use it now
                d.rmdir()
        return forced

    def _kill_containers(self) -> list[str]:
        done: list[str] = []
        if not self.runc_root.is_dir():
            return done
        for ns_root in sorted(self.runc_root.iterdir()):
            for state in sorted(p for p in ns_root.iterdir() if (p / "state.json").exists()):
                done.append(f"runc delete --force {state.name} (namespace {ns_root.name})")
                subprocess.run(
                    [RUNC, "--root", str(ns_root), "delete", "--force", state.name],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
        return done

    def _kill_shims(self, timeout: float) -> list[str]:
        done = []
        shims = [
            pid
            for pid, argv in _processes()
            if os.path.basename(argv[0]) == SHIM and "-address" in argv and self._names_us(argv)
        ]
        for pid in shims:
            done.append(f"shim {pid} killed")
            _signal(pid, signal.SIGKILL)
        for pid in shims:
            _wait_gone(pid, timeout)
        # A killed shim leaves its socket; the bundle's address file names it exactly.
        task_state = self.state / "io.containerd.runtime.v2.task"
        for address_file in task_state.glob("*/*/address") if task_state.is_dir() else []:
            sock = address_file.read_text().strip().removeprefix("unix://")
            if sock.startswith(str(SHIM_SOCKET_DIR) + "/") and os.path.lexists(sock):
                done.append(f"removed shim socket {sock}")
                with contextlib.suppress(OSError):
                    os.unlink(sock)
        return done

    def _names_us(self, argv: list[str]) -> bool:
        i = argv.index("-address")
        return i + 1 < len(argv) and argv[i + 1] == self.address

    def leaks(self) -> list[str]:
        """What is left of this instance: mounts, its directory, processes naming its socket."""
        found = [f"mount {mp}" for mp in mounts_below(self.dir)]
        if self.dir.exists():
            found.append(f"directory {self.dir}")
        for pid, argv in _processes():
            if self.address in argv:
                found.append(f"process {pid}: {' '.join(argv)}")
        found += [f"cgroup {cg}" for cg in _cgroups(self.cgroup_parent) if cg.exists()]
        return found

    # -- ctr --

    def _ctr_raw(
        self,
        args: Sequence[str],
        *,
        namespace: str | None = None,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str] | None:
        argv = [CTR, "--address", self.address, "--namespace", namespace or self.namespace, *args]
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=self._env(),
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return None

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK --namespace NS ARGS``; with `check`, a failure or a timeout raises
        `ContainerdError` with ctr's output and the tail of containerd's log."""
        r = self._ctr_raw(args, namespace=namespace, timeout=timeout, input=input)
        cmd = f"ctr -n {namespace or self.namespace} {' '.join(args)}"
        if r is None:
            raise ContainerdError(f"{cmd}: no answer in {timeout}s\ncontainerd log:\n{self.log_tail()}")
        if check and r.returncode != 0:
            raise ContainerdError(
                f"{cmd} exited {r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}\n"
                f"containerd log:\n{self.log_tail()}"
            )
        return r

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
        args = [
            "run",
            "-d" if detach else "--rm",
            "--snapshotter",
            snapshotter,
            "--fifo-dir",
            str(self.fifo_dir),
            "--runc-root",
            str(self.runc_root),
            "--cgroup",
            f"/{self.cgroup_parent}/{cid}",
            *extra,
            ref,
            cid,
            *command,
        ]
        try:
            return self.ctr(*args, namespace=namespace, check=check, timeout=timeout)
        finally:
            if not detach:
                _remove_empty_cgroups(self.cgroup_parent)

    # -- images and snapshots --

    def content(self, digest: str, *, namespace: str | None = None) -> bytes:
        """A blob of containerd's content store (``ctr content get``)."""
        r = subprocess.run(
            [
                CTR,
                "--address",
                self.address,
                "--namespace",
                namespace or self.namespace,
                "content",
                "get",
                digest,
            ],
            capture_output=True,
            timeout=60,
            check=False,
            env=self._env(),
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise ContainerdError(
                f"ctr content get {digest}: {r.stderr.decode(errors='replace')}\n{self.log_tail()}"
            )
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
                unmount_all_below(target)
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


def _remove_empty_cgroups(name: str) -> None:
    """rmdir the (empty) parent cgroup ``name`` that `Containerd.run` puts containers in, in every
    hierarchy; one still in use by another container stays (rmdir fails on a non-empty cgroup)."""
    for cg in _cgroups(name):
        with contextlib.suppress(OSError):
            if cg.is_dir():
                cg.rmdir()


def _cgroups(name: str) -> list[Path]:
    """Where a cgroup ``/name`` lives: the unified root, and every v1 hierarchy."""
    base = Path("/sys/fs/cgroup")
    return [base / name, *(d / name for d in base.iterdir() if d.is_dir() and not d.is_symlink())]


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
