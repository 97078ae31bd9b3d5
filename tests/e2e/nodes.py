"""A node of the multi-node e2e tests: a containerd 1.6 with its own `damselfly serve` and device daemon,
driven through the `damselfly` CLI (in process), and a container that holds an image's chain mounted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from tests.p2p.peerlab import wait_for
from tests.snapshotter import remote_lab, serving

from .containerd import Containerd

SNAPSHOTTER = "damselfly"


@dataclass
class Node:
    name: str
    dir: Path
    served: serving.Served
    containerd: Containerd
    namespace: str

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def cli(self, *args: str) -> str:
        """``damselfly ARGS``; its output. A failure fails the test with the node's logs."""
        r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert r.exit_code == EXIT_OK, (
            f"node {self.name}: damselfly {args[0]} failed:\n{r.output}\n{self.logs()}"
        )
        return r.output

    def rpull(self, ref: str) -> str:
        c = self.containerd
        return self.cli(
            "rpull",
            ref,
            "--address",
            c.address,
            "--namespace",
            self.namespace,
            "--state-dir",
            str(self.state),
        )

    def devices(self) -> dict[str, Any]:
        """``damselfly devices --state-dir STATE``: the device daemon's status."""
        status: dict[str, Any] = json.loads(self.cli("devices", "--state-dir", str(self.state)))
        return status

    def logs(self) -> str:
        """The tail of serve's and the device daemon's logs, for a failure message."""
        daemon = self.state / "devd.log"
        text = daemon.read_text(errors="replace") if daemon.exists() else "(no device daemon log)"
        serve = self.served.log_text()[-6000:]
        return (
            f"--- node {self.name}: damselfly serve ---\n{serve}\n"
            f"--- node {self.name}: device daemon ---\n{text[-6000:]}"
        )


@contextmanager
def holding(node: Node, ref: str) -> Iterator[None]:
    """A container of `ref` that sleeps on `node`: while it runs, the node's device of the image (its
    layer blobs, their counters, a replay's counts, the background download) stays open. (A ``ctr
    snapshots view`` would not do: containerd's GC removes a view no lease holds.) Removed, and its
    chain released, on exit."""
    c, cid = node.containerd, f"holder-{node.name}"
    c.run(
        ref,
        ["/bin/sleep", "3600"],
        container_id=cid,
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    try:
        yield
    finally:
        c.ctr("task", "rm", "--force", cid, check=False)
        c.ctr("container", "rm", cid)
        # containerd 1.6 removes the container's snapshot from the snapshotter at its next GC
        wait_for(
            lambda: not remote_lab.chain_mounts(node.served.root) and not remote_lab.device_loops(node.state),
            30,
            f"node {node.name}: the chain released after its last container",
        )
