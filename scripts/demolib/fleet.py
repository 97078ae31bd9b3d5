"""A fleet of damselfly nodes in network namespaces, with the registry behind a shaped link of its own:
the multi-node P2P tests, `scripts/bench_p2p.py` and the demo's second node use it.

Each `FleetNode` is a network namespace of a `NetLab` (`scripts/demolib/netlab`), a state directory,
a config file (``[remote] plain_http``, ``[device]``, ``[p2p]``: the same TOML file `damselfly serve`
reads) and a ``damselfly device-daemon --config`` started in the namespace (``nsenter --net``, so its
FUSE mount is visible to the host). ``damselfly mount`` runs in the root namespace against the node's
state directory (``DAMSELFLY_STATE_DIR``), as an operator would. The registry (docker-registry, with
its access log: the bytes it served are counted there) runs in a namespace of its own behind `tbf`.

`Fleet.close` undoes everything by exact path and pid: mounts and loop devices below the fleet's
directory, the daemons, the registry, then the lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from snapshotter.device import control
from snapshotter.errors import ControlError

from .netlab import NetLab, NetNode
from .procs import (
    alive,
    detach_loops_below,
    left_below,
    signal_pid,
    spawn,
    stop_pid,
    unmount_below,
    wait_gone,
    wait_ready,
)
from .registry import Registry

DAMSELFLY = str(Path(sys.executable).with_name("damselfly"))
PEER_PORT = 7001
REGISTRY_PORT = 5000
SECRET = b"the-demo-fleet-cluster-secret-0123456789"


@dataclass
class FleetNode:
    label: str
    net: NetNode
    dir: Path
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    mounts: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.net.ip}:{PEER_PORT}"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def log(self) -> Path:
        return self.dir / "devd.log"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DAMSELFLY_STATE_DIR": str(self.state)}

    def start(self, timeout: float = 30.0) -> Self:
        argv = [
            DAMSELFLY,
            "device-daemon",
            "--state-dir",
            str(self.state),
            "--config",
            str(self.config),
            "-v",
        ]
        self.proc = spawn(self.net.argv(argv), self.log)
        sock = str(self.state / "devd.sock")

        def answers() -> bool:
            try:
                control.call(sock, {"op": "ping"}, timeout=2)
            except ControlError:
                return False
            return True

        why = wait_ready(self.proc, answers, timeout)
        if why is not None:
            raise RuntimeError(f"node {self.label}: device daemon {why}; see {self.log}")
        return self

    def cli(self, *args: str, timeout: float = 300.0) -> str:
        r = subprocess.run(
            [DAMSELFLY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if r.returncode != 0:
            raise RuntimeError(f"node {self.label}: damselfly {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.cli("devices", timeout=60))
        return doc

    def mount(self, ref: str, mountpoint: Path) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mounts.append(mountpoint)
        self.cli("mount", "--plain-http", ref, str(mountpoint))

    def complete(self) -> bool:
        blobs = [b for b in self.status()["blobs"].values() if not b["local"]]
        return bool(blobs) and all(b["complete"] and b["verified"] for b in blobs)

    def kill(self) -> None:
        """SIGKILL the daemon (a node that dies mid-transfer); its mounts stay until `Fleet.close`."""
        if self.proc is not None and alive(self.proc.pid):
            signal_pid(self.proc.pid, signal.SIGKILL)
            wait_gone(self.proc.pid, 10)
            self.proc.wait(5)

    def stop(self) -> list[str]:
        """Unmount its mounts, detach its loop devices, stop its daemon (by pid); what went wrong."""
        problems: list[str] = []
        for m in reversed(self.mounts):
            unmount_below(m)  # what `damselfly umount` would do, by exact path
        detach_loops_below(self.state)
        proc, self.proc = self.proc, None
        if proc is not None and alive(proc.pid):
            with contextlib.suppress(ControlError):
                control.call(str(self.state / "devd.sock"), {"op": "shutdown"}, timeout=5)
            if not wait_gone(proc.pid, 20):
                note = stop_pid(proc.pid, signal.SIGTERM, 10)
                problems.append(f"{self.label}: daemon {proc.pid} needed a signal {note or ''}")
            proc.wait(5)
        unmount_below(self.state)  # the FUSE mount of a daemon that was killed
        return problems


class Fleet:
    """`nodes` device daemons and a registry, each in its own namespace (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        registry_mbit: float | None = None,
        node_mbit: float | None = None,
    ) -> None:
        self.dir = directory
        self.lab = NetLab()
        self.node_mbit = node_mbit
        self.nodes: list[FleetNode] = []
        self.secret = directory / "secret"
        directory.mkdir(parents=True, exist_ok=True)
        self.secret.write_bytes(SECRET + b"\n")
        os.chmod(self.secret, 0o600)
        try:
            net = self.lab.add_node("registry", rate_mbit=registry_mbit)
            self.registry_net = net
            self.registry = Registry(
                directory / "registry",
                directory / "registry.log",
                bind=net.ip,
                wrap=net.argv,
                port=REGISTRY_PORT,
            )
            self.registry.start()
        except BaseException:
            self.lab.close()
            raise

    @property
    def registry_host(self) -> str:
        return self.registry.host

    def add_nodes(self, count: int, *, p2p: bool = True, **keys: Any) -> list[FleetNode]:
        """`count` more nodes (not started: `start` them, or `start_all`); all nodes list each other."""
        nets = [
            self.lab.add_node(f"node{len(self.nodes) + i}", rate_mbit=self.node_mbit) for i in range(count)
        ]
        new = []
        for net in nets:
            d = self.dir / net.label
            d.mkdir(parents=True, exist_ok=True)
            new.append(FleetNode(net.label, net, d, d / "config.toml"))
        self.nodes += new
        self.write_configs(p2p=p2p, **keys)
        return new

    def write_configs(self, *, p2p: bool = True, **keys: Any) -> None:
        """(Re)write every node's config: every node is a static member of every other's fleet."""
        members = [n.address for n in self.nodes]
        device = {"background_delay": 0.0, "read_timeout": 30.0, **keys.pop("device", {})}
        for n in self.nodes:
            p2p_keys = {
                "enabled": p2p,
                "listen": n.address,
                "peers": members,
                "secret_file": str(self.secret),
                "health_interval": 1.0,
                "registries": [self.registry_host],  # roots fetch for peers before they read it themselves
                **keys,
            }
            lines = ["[remote]", "plain_http = true", "", "[device]"]
            lines += [f"{k} = {json.dumps(v)}" for k, v in device.items()]
            lines += ["", "[p2p]"] + [f"{k} = {json.dumps(v)}" for k, v in p2p_keys.items()]
            n.config.write_text("\n".join(lines) + "\n")

    def start_all(self) -> None:
        for n in self.nodes:
            if n.proc is None:
                n.start()

    def served_since(self, offset: int) -> tuple[int, int]:
        """(body bytes, requests) the registry served since access-log `offset` (`Registry.log_offset`)."""
        return self.registry.served_since(offset)

    def wait_complete(self, nodes: list[FleetNode], timeout: float) -> float:
        """Wait until every node's blobs are complete and verified; seconds it took."""
        t0 = time.monotonic()
        pending = list(nodes)
        while pending:
            pending = [n for n in pending if not n.complete()]
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"nodes {[n.label for n in pending]} not complete after {timeout:.0f}s")
            time.sleep(0.2)
        return time.monotonic() - t0

    def close(self) -> list[str]:
        problems: list[str] = []
        for n in self.nodes:
            problems += n.stop()
        note = self.registry.stop()
        if note:
            problems.append(note)
        problems += [f"left behind: {x}" for x in left_below(self.dir)]
        unmount_below(self.dir)
        detach_loops_below(self.dir)
        self.lab.close()
        return problems

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
