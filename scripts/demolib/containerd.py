"""A private containerd 1.6 for the demo: own root, state, sockets, config and log under one directory.

Config version 2 with the CRI plugin and the snapshotters that need host setup disabled, and one proxy
plugin, ``damselfly``, pointing at the demo's own `damselfly serve` socket; never the host's
``/var/lib/containerd`` or ``/run/containerd/containerd.sock``. ``ctr`` always gets ``--address`` and
``--namespace``, and ``ctr run`` keeps runc's state and the stdio fifos below the directory too.

One path cannot be moved in containerd 1.6: the runc v2 shim binds its socket in ``/run/containerd/s/``
whatever the state directory (``runtime/v2/shim/util_unix.go``). Each shim removes its socket when it
exits; `stop` removes the socket of a shim it had to kill (the exact path, from the bundle's
``address`` file), and the two directories if this process created them and they are empty.

`stop` undoes everything by exact identity: containerd by pid (SIGTERM, then SIGKILL), containers left in
its runc root (``runc delete --force``), shims whose command line names its socket (by pid), then every
mount below its directory (deepest first).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .procs import processes, stop_pid, stop_popen, unmount_below

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
SHIM = "containerd-shim-runc-v2"
SHIM_SOCKET_DIR = Path("/run/containerd/s")
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
REQUIRED_PLUGINS = (
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.runtime.v2.task",
    "io.containerd.grpc.v1.tasks",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _toml(value: object) -> str:
    """A TOML string or list of strings (JSON's escapes are TOML's for these)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


class CtrError(Exception):
    """A ``ctr`` command failed; the message names it and ends with its output."""


class Containerd:
    def __init__(
        self,
        directory: Path,
        log: Path,
        namespace: str,
        proxy_plugins: dict[str, str],
        wrap: Callable[[Sequence[str]], list[str]] = list,
    ) -> None:
        self.dir = directory
        self.log = log
        self.namespace = namespace
        self.proxy_plugins = proxy_plugins
        self.wrap = wrap
        self.proc: subprocess.Popen[bytes] | None = None
        self._created_run_dirs: list[Path] = []

    @property
    def address(self) -> str:
        return str(self.dir / "containerd.sock")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def runc_root(self) -> Path:
        return self.dir / "runc"

    @property
    def fifo_dir(self) -> Path:
        return self.dir / "fifo"

    def config(self) -> str:
        lines = [
            "version = 2",
            f"root = {_toml(str(self.dir / 'root'))}",
            f"state = {_toml(str(self.dir / 'state'))}",
            f"disabled_plugins = {_toml(DISABLED_PLUGINS)}",
            f"required_plugins = {_toml(REQUIRED_PLUGINS)}",
            "",
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "[ttrpc]",
            f"  address = {_toml(self.address + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(str(self.dir / 'opt'))}",
            '[plugins."io.containerd.gc.v1.scheduler"]',
            '  startup_delay = "0s"',
        ]
        for name, address in sorted(self.proxy_plugins.items()):
            lines += [
                f"[proxy_plugins.{_toml(name)}]",
                '  type = "snapshot"',
                f"  address = {_toml(address)}",
            ]
        return "\n".join(lines) + "\n"

    def env(self) -> dict[str, str]:
        # No CONTAINERD_* of the caller's (ctr reads CONTAINERD_SNAPSHOTTER, _NAMESPACE, _ADDRESS).
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env["PATH"] = PATH
        env["TMPDIR"] = str(self.dir)
        return env

    def start(self, timeout: float = 30.0) -> None:
        for tool in (CONTAINERD, CTR, RUNC):
            if not os.access(tool, os.X_OK):
                raise OSError(f"{tool} is missing: apt-get install containerd runc")
        for d in (self.dir, self.runc_root, self.fifo_dir):
            d.mkdir(parents=True, exist_ok=True)
        config = self.dir / "config.toml"
        config.write_text(self.config())
        for d in (SHIM_SOCKET_DIR.parent, SHIM_SOCKET_DIR):
            if not d.exists():
                self._created_run_dirs.append(d)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.wrap([CONTAINERD, "--config", str(config)]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise OSError(
                    f"containerd exited with status {self.proc.returncode} at start; see {self.log}"
                )
            r = self.ctr_raw(["version"], timeout=5.0)
            if r is not None and r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise OSError(
                    f"containerd did not answer on {self.address} within {timeout:.0f}s; see {self.log}"
                )
            time.sleep(0.1)

    # -- ctr ----------------------------------------------------------------------------------------

    def argv(self, args: Sequence[str]) -> list[str]:
        return [CTR, "--address", self.address, "--namespace", self.namespace, *args]

    def ctr_raw(self, args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(
                self.wrap(self.argv(args)),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                env=self.env(),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return None

    def ctr(self, *args: str, timeout: float = 600.0, log: Path | None = None) -> str:
        """``ctr ARGS``; its output goes to `log` (if given) and is returned; a failure raises `CtrError`."""
        r = self.ctr_raw(args, timeout=timeout)
        cmd = "ctr " + " ".join(args)
        if log is not None:
            with log.open("a") as f:
                f.write(f"$ {cmd}\n{r.stdout if r else ''}{r.stderr if r else ''}\n")
        if r is None:
            raise CtrError(f"{cmd}: no answer within {timeout:.0f}s")
        if r.returncode != 0:
            raise CtrError(
                f"{cmd} exited with status {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}"
            )
        return r.stdout

    def run_argv(
        self, ref: str, cid: str, command: Sequence[str], snapshotter: str, cgroup_parent: str
    ) -> list[str]:
        """``ctr run --rm`` of `ref`, with runc's state, the fifos and the cgroup where we find them."""
        return self.wrap(
            self.argv(
                [
                    "run",
                    "--rm",
                    "--snapshotter",
                    snapshotter,
                    "--fifo-dir",
                    str(self.fifo_dir),
                    "--runc-root",
                    str(self.runc_root),
                    "--cgroup",
                    f"{cgroup_parent}/{cid}",
                    ref,
                    cid,
                    *command,
                ]
            )
        )

    def image_rm(self, ref: str, log: Path | None = None) -> None:
        """Remove the image and let containerd's GC delete its content and snapshots before returning."""
        if ref in self.ctr("image", "ls", "-q", log=None).split():
            self.ctr("image", "rm", "--sync", ref, log=log)

    # -- teardown -----------------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Stop and remove everything (see the module docstring); return what had to be forced."""
        forced: list[str] = []
        proc, self.proc = self.proc, None
        if proc is not None:
            note = stop_popen(proc, signal.SIGTERM, timeout)
            if note:
                forced.append(f"containerd: {note}")
        if self.runc_root.is_dir():
            for ns_root in sorted(p for p in self.runc_root.iterdir() if p.is_dir()):
                for state in sorted(p for p in ns_root.iterdir() if (p / "state.json").exists()):
                    forced.append(f"runc delete --force {state.name}")
                    subprocess.run(
                        [RUNC, "--root", str(ns_root), "delete", "--force", state.name],
                        capture_output=True,
                        check=False,
                        timeout=30,
                    )
        for pid, argv in processes():
            if os.path.basename(argv[0]) == SHIM and self.address in argv:
                forced.append(f"shim {pid} killed")
                stop_pid(pid, signal.SIGKILL, timeout)
        task_state = self.dir / "state" / "io.containerd.runtime.v2.task"
        for address_file in task_state.glob("*/*/address") if task_state.is_dir() else []:
            with contextlib.suppress(OSError):
                sock = address_file.read_text().strip().removeprefix("unix://")
                if sock.startswith(str(SHIM_SOCKET_DIR) + "/") and os.path.lexists(sock):
                    forced.append(f"removed shim socket {sock}")
                    os.unlink(sock)
        forced += [f"umount {mp}" for mp in unmount_below(self.dir)]
        for d in reversed(self._created_run_dirs):
            with contextlib.suppress(OSError):  # only if empty: another containerd may use it now
                d.rmdir()
        return forced
