"""A private containerd 1.6 (the demo's and the tests'): own root, state, sockets and config under one
directory, a log file, and ``ctr`` pointed at it.

Config version 2 with the CRI plugin (unless `cri_snapshotter` asks for it: a kubelet's image service,
its state and root below the directory, CNI directories there too, so PullImage works without any
network setup) and the snapshotters and runtimes that need host setup disabled, and
the caller's proxy snapshotter plugins (the demo's: ``damselfly``, its own `damselfly serve` socket);
never the host's ``/var/lib/containerd`` or ``/run/containerd/containerd.sock``. ``ctr`` always gets
``--address`` and ``--namespace``, and ``ctr run`` (`run_args`) keeps runc's state and the stdio fifos
below the directory too. It is ready when ``ctr version`` answers on its socket.

One host path cannot be moved in containerd 1.6: the runc v2 shim binds its socket in
``/run/containerd/s/`` whatever the state directory (``runtime/v2/shim/util_unix.go``, ``socketRoot``).
Each shim removes its socket when it exits; `stop` removes the socket of a shim it had to kill (its exact
path, from the bundle's ``address`` file), and ``/run/containerd/s`` and ``/run/containerd`` if this
process created them and they are empty. A mount namespace would hide them, but containerd must see the
mounts a proxy snapshotter makes on the host, and the host's mounts are private (nothing would propagate
into the namespace).

`stop` undoes everything by exact identity: containerd by pid (SIGTERM, then SIGKILL), containers left in
its runc root (``runc delete --force``), shims whose ``-address`` is its socket (by pid), then every
mount below its directory (deepest first, by exact path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

from .procs import Service, processes, signal_pid, unmount_below, wait_gone

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
SHIM = "containerd-shim-runc-v2"
#: containerd 1.6 binds runc v2 shim sockets here, whatever its state directory (see the docstring).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
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
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
#: containerd refuses to start when one of these fails to load, instead of failing later, obscurely.
REQUIRED_PLUGINS = (
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.runtime.v2.task",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
)
#: The label that makes a snapshot a root of containerd's garbage collection (metadata/gc.go).
GC_ROOT = "containerd.io/gc.root"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def toml_value(value: object) -> str:
    """A TOML value (strings, bools, ints, floats, lists of them): JSON's escapes are TOML's for these."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)  # always with a dot or an exponent: a TOML float, never an integer
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


class CtrError(Exception):
    """containerd or a ``ctr`` command failed; the message names the command and ends with its output."""


class Containerd(Service):
    """One private containerd (see the module docstring): `start`, then `ctr`, then `stop`.

    `wrap` rewrites every command line it starts (containerd's and ctr's): the demo's puts them in the
    node's cgroup."""

    config_name = "config.toml"

    def __init__(
        self,
        directory: Path,
        log: Path,
        *,
        namespace: str,
        proxy_plugins: Mapping[str, str] | None = None,
        log_level: str = "info",
        wrap: Callable[[Sequence[str]], list[str]] = list,
        cri_snapshotter: str | None = None,
        cri_auths: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(directory, log)
        self.namespace = namespace
        #: With a snapshotter: the CRI plugin runs (on `address`), pulling into it with the
        #: ``containerd.io/snapshot/cri.*`` labels; `cri_auths`: registry host -> (user, password) it
        #: pulls with when a PullImage brings none (its ``registry.configs``).
        self.cri_snapshotter = cri_snapshotter
        self.cri_auths = dict(cri_auths or {})
        self.proxy_plugins = dict(proxy_plugins or {})
        self.log_level = log_level
        self.wrap = wrap
        self.root = directory / "root"
        self.state = directory / "state"
        #: Where ctr makes the fifos of a task's stdio (its default is /run/containerd/fifo).
        self.fifo_dir = directory / "fifo"
        #: runc's state for our containers (the shim's default is /run/containerd/runc).
        self.runc_root = directory / "runc"
        self._created_run_dirs: list[Path] = []

    # -- paths --

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    def error(self, message: str) -> Exception:
        """The exception for a failure (the tests' carries the tail of containerd's log)."""
        return CtrError(f"{message}; see {self.log}")

    # -- lifecycle --

    def config(self) -> str:
        cri = self.cri_snapshotter is not None
        disabled = [p for p in DISABLED_PLUGINS if not (cri and p == CRI_PLUGIN)]
        required = [*REQUIRED_PLUGINS, CRI_PLUGIN] if cri else list(REQUIRED_PLUGINS)
        lines = [
            "version = 2",
            f"root = {toml_value(str(self.root))}",
            f"state = {toml_value(str(self.state))}",
            f"disabled_plugins = {toml_value(disabled)}",
            f"required_plugins = {toml_value(required)}",
            "oom_score = 0",
            "",
            "[grpc]",
            f"  address = {toml_value(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {toml_value(self.address + '.ttrpc')}",
            "",
            "[debug]",
            '  address = ""',
            f"  level = {toml_value(self.log_level)}",
            "",
            "[metrics]",
            '  address = ""',
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {toml_value(str(self.dir / 'opt'))}",
            "",
            '[plugins."io.containerd.gc.v1.scheduler"]',
            '  startup_delay = "0s"',
            # A collection at most 5x its own duration after the last one (the default, 0.02, is 50x:
            # on a loaded 2-core machine a removed container's snapshot could wait half a minute).
            "  pause_threshold = 0.2",
        ]
        if cri:
            lines += self._cri_config()
        for name, address in sorted(self.proxy_plugins.items()):
            lines += [
                "",
                f"[proxy_plugins.{toml_value(name)}]",
                '  type = "snapshot"',
                f"  address = {toml_value(address)}",
            ]
        return "\n".join(lines) + "\n"

    def _cri_config(self) -> list[str]:
        """The CRI plugin's table: its root and state are containerd's (below the directory), its CNI
        directories too (empty: no pod network, none needed to pull), its stream server on loopback."""
        cri = f'plugins."{CRI_PLUGIN}"'
        lines = [
            "",
            f"[{cri}]",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  disable_tcp_service = true",
            "",
            f"[{cri}.containerd]",
            f"  snapshotter = {toml_value(self.cri_snapshotter or '')}",
            "  disable_snapshot_annotations = false",
            "",
            f"[{cri}.cni]",
            f"  bin_dir = {toml_value(str(self.dir / 'cni' / 'bin'))}",
            f"  conf_dir = {toml_value(str(self.dir / 'cni' / 'net.d'))}",
        ]
        for host, (user, password) in sorted(self.cri_auths.items()):
            lines += [
                "",
                f"[{cri}.registry.configs.{toml_value(host)}.auth]",
                f"  username = {toml_value(user)}",
                f"  password = {toml_value(password)}",
            ]
        return lines

    def env(self) -> dict[str, str]:
        # No CONTAINERD_* of the caller's (ctr reads CONTAINERD_SNAPSHOTTER, _NAMESPACE, _ADDRESS).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env["PATH"] = PATH
        env["TMPDIR"] = str(self.dir)
        return env

    def start(self, timeout: float = 30.0) -> Self:
        for tool in (CONTAINERD, CTR, RUNC):
            if not os.access(tool, os.X_OK):
                raise self.error(f"{tool} is missing: apt-get install containerd runc")
        if self.proc is not None:
            raise self.error(f"containerd in {self.dir} is already running (pid {self.proc.pid})")
        for d in (self.dir, self.root, self.state, self.fifo_dir, self.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        for d in (SHIM_SOCKET_DIR.parent, SHIM_SOCKET_DIR):
            if not d.exists():
                self._created_run_dirs.append(d)

        def answers() -> bool:
            r = self.ctr_raw(["version"], timeout=5.0)
            return r is not None and r.returncode == 0

        argv = self.wrap([CONTAINERD, "--config", str(self.config_path)])
        why = self.launch(argv, answers, timeout, self.env(), interval=0.1)
        if why is not None:
            self.halt(signal.SIGTERM, 15.0)  # `stop` still removes what it made
            raise self.error(f"containerd on {self.address} {why}")
        return self

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop and remove everything (see the module docstring); return what had to be forced or
        cleaned beyond a polite SIGTERM (an empty list when the users cleaned up after themselves)."""
        forced: list[str] = []
        note = self.halt(signal.SIGTERM, timeout)
        if note:
            forced.append(f"containerd: {note}")
        forced += self._kill_containers()
        forced += self._kill_shims(timeout)
        forced += [f"umount {mp}" for mp in unmount_below(self.dir)]
        for d in reversed(self._created_run_dirs):
            with contextlib.suppress(OSError):  # only if empty: another containerd may use it now
                d.rmdir()
        return forced

    def _kill_containers(self) -> list[str]:
        done: list[str] = []
        if not self.runc_root.is_dir():
            return done
        for ns_root in sorted(p for p in self.runc_root.iterdir() if p.is_dir()):
            for state in sorted(p for p in ns_root.iterdir() if (p / "state.json").exists()):
                done.append(f"runc delete --force {state.name} (namespace {ns_root.name})")
                subprocess.run(
                    [RUNC, "--root", str(ns_root), "delete", "--force", state.name],
                    capture_output=True,
                    check=False,
                    timeout=30,
                )
        return done

    def shim_pids(self) -> list[int]:
        """The runc v2 shims of this containerd: ``-address`` followed by our socket on their command line."""
        return [pid for pid, argv in processes() if os.path.basename(argv[0]) == SHIM and self._is_ours(argv)]

    def _kill_shims(self, timeout: float) -> list[str]:
        done = []
        shims = self.shim_pids()
        for pid in shims:
            done.append(f"shim {pid} killed")
            signal_pid(pid, signal.SIGKILL)
        for pid in shims:
            wait_gone(pid, timeout)
        # A killed shim leaves its socket; the bundle's address file names it exactly.
        task_state = self.state / "io.containerd.runtime.v2.task"
        for address_file in task_state.glob("*/*/address") if task_state.is_dir() else []:
            with contextlib.suppress(OSError):
                sock = address_file.read_text().strip().removeprefix("unix://")
                if sock.startswith(str(SHIM_SOCKET_DIR) + "/") and os.path.lexists(sock):
                    done.append(f"removed shim socket {sock}")
                    os.unlink(sock)
        return done

    def _is_ours(self, argv: list[str]) -> bool:
        """Whether a shim's command line has ``-address`` followed by our socket."""
        if "-address" not in argv:
            return False
        i = argv.index("-address")
        return i + 1 < len(argv) and argv[i + 1] == self.address

    # -- ctr --

    def argv(self, args: Sequence[str], namespace: str | None = None) -> list[str]:
        """``ctr --address SOCK --namespace NS ARGS`` (not wrapped)."""
        return [CTR, "--address", self.address, "--namespace", namespace or self.namespace, *args]

    def ctr_raw(
        self,
        args: Sequence[str],
        *,
        namespace: str | None = None,
        timeout: float = 60.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str] | None:
        """Run ctr; None if it did not return within `timeout` seconds."""
        try:
            return subprocess.run(
                self.wrap(self.argv(args, namespace)),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=self.env(),
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
        log: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr ARGS``, its output appended to `log` if given; a timeout, or with `check` a failure,
        raises `error` with ctr's output."""
        r = self.ctr_raw(args, namespace=namespace, timeout=timeout, input=input)
        cmd = f"ctr -n {namespace or self.namespace} {' '.join(args)}"
        if log is not None:
            with log.open("a") as f:
                f.write(f"$ {cmd}\n{r.stdout if r else ''}{r.stderr if r else ''}\n")
        if r is None:
            raise self.error(f"{cmd}: no answer within {timeout:.0f}s")
        if check and r.returncode != 0:
            raise self.error(f"{cmd} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-3000:]}")
        return r

    def wait_snapshotter(self, snapshotter: str, timeout: float = 20.0) -> float:
        """Wait until containerd reaches proxy snapshotter `snapshotter` (after the snapshotter
        restarted, containerd's connection to it is in gRPC back-off for up to a few seconds and calls
        fail fast with UNAVAILABLE); the seconds it took. The probe is a Prepare of an empty snapshot,
        removed again: listing snapshots would not do, containerd answers it from its own metadata."""
        started = time.monotonic()
        key = f"damselfly-probe-{os.getpid()}"
        base = ["snapshots", "--snapshotter", snapshotter]
        while True:
            r = self.ctr_raw([*base, "prepare", key], timeout=10.0)
            if r is not None and r.returncode == 0:
                self.ctr(*base, "rm", key)
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                why = "no answer" if r is None else (r.stderr or r.stdout).strip()[-500:]
                raise self.error(
                    f"containerd does not reach snapshotter {snapshotter!r} in {timeout:.0f}s: {why}"
                )
            time.sleep(0.2)

    def run_args(
        self,
        ref: str,
        container_id: str,
        command: Sequence[str] = (),
        *,
        snapshotter: str,
        cgroup: str,
        detach: bool = False,
        extra: Sequence[str] = (),
    ) -> list[str]:
        """ctr's arguments to run `ref` as `container_id` (``--rm``, or ``-d`` with `detach`), with runc's
        state and the fifos below our directory and the container in the cgroup `cgroup`."""
        return [
            "run",
            "-d" if detach else "--rm",
            "--snapshotter",
            snapshotter,
            "--fifo-dir",
            str(self.fifo_dir),
            "--runc-root",
            str(self.runc_root),
            "--cgroup",
            cgroup,
            *extra,
            ref,
            container_id,
            *command,
        ]

    def top_chain_id(self, ref: str) -> str:
        """The chain ID of image `ref`'s top layer (the name of its top committed snapshot), from its
        manifest and config in containerd's content store; an index resolves to this machine's
        platform. Chain IDs: OCI image spec, config.md ("Layer ChainID")."""
        target = None
        for line in self.ctr("image", "ls").stdout.splitlines()[1:]:  # REF TYPE DIGEST SIZE ...
            cols = line.split()
            if cols[:1] == [ref]:
                target = next((c for c in cols if c.startswith("sha256:")), None)
        if target is None:
            raise self.error(f"no image {ref} in namespace {self.namespace}")
        doc = json.loads(self.ctr("content", "get", target).stdout)
        if "manifests" in doc:
            arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
            matches = [m for m in doc["manifests"] if m.get("platform", {}).get("architecture") == arch]
            if not matches:
                raise self.error(f"{ref}: no manifest for linux/{arch} in its index")
            doc = json.loads(self.ctr("content", "get", matches[0]["digest"]).stdout)
        config = json.loads(self.ctr("content", "get", doc["config"]["digest"]).stdout)
        chain = ""
        for diff_id in config["rootfs"]["diff_ids"]:
            step = f"{chain} {diff_id}".encode()
            chain = "sha256:" + hashlib.sha256(step).hexdigest() if chain else diff_id
        if not chain:
            raise self.error(f"{ref}: its config lists no layers")
        return chain

    def hold(self, key: str, parent: str, *, snapshotter: str, log: Path | None = None) -> None:
        """A view `key` of the committed snapshot `parent` that containerd's GC keeps (``gc.root``
        label) until `unhold`: with a remote snapshotter, it keeps the image's device attached."""
        # ctr cannot label a view as it creates it: containerd's GC, still running after an earlier
        # removal, may collect the bare view before the label lands. Then it is made again.
        for attempt in range(5):
            self.ctr("snapshots", "--snapshotter", snapshotter, "view", key, parent, log=log)
            r = self.ctr(
                "snapshots",
                "--snapshotter",
                snapshotter,
                "label",
                key,
                f"{GC_ROOT}=demo",
                log=log,
                check=False,
            )
            if r.returncode == 0:
                return
            if "not found" not in r.stderr or attempt == 4:
                raise self.error(
                    f"ctr snapshots label {key} exited {r.returncode}: {r.stderr.strip()[-1000:]}"
                )
            time.sleep(0.2)

    def unhold(self, key: str, *, snapshotter: str, log: Path | None = None) -> None:
        """Remove the view `key` (`hold`), if it is there."""
        self.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, log=log, check=False)

    def image_rm(self, ref: str, log: Path | None = None) -> None:
        """Remove the image and let containerd's GC delete its content and snapshots before returning."""
        if ref in self.ctr("image", "ls", "-q").stdout.split():
            self.ctr("image", "rm", "--sync", ref, log=log, timeout=600.0)
