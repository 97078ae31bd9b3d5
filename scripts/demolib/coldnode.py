"""The cold-start benchmark's node states (``scripts/bench_coldstart.py``): a `damselfly serve` whose
device daemon answers (`wait_daemon`), an image whose device cache is complete (`fill_cache`), and the
P2P parent (`PeerParent`): a second damselfly, a device daemon only, in a network namespace of its own,
whose cache holds a whole image for the node under test to fetch from. Also what the installed
damselfly can do (`knows_prefetch_key`, `has_record_trace`: trace prefetch is newer than the benchmark)
and `run_to_end` (a child command the benchmark's cleanup can stop).

The node under test is the demo's `Node` (``scripts/demo.py``); here only its parts are used (its
`Serve`, its `Containerd`), so this module does not import the demo.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snapshotter import config as damselfly_config
from snapshotter.errors import ConfigError

from .coldstart import LayerSources
from .containerd import Containerd, toml_value
from .fleet import FleetNode
from .netlab import NetNode
from .serve import Serve, damselfly_argv


def knows_prefetch_key() -> bool:
    """Whether this damselfly's config has ``[remote] prefetch`` (unknown keys are refused)."""
    try:
        damselfly_config.parse("[remote]\nprefetch = false\n", "probe")
    except ConfigError:
        return False
    return True


def has_record_trace() -> bool:
    """Whether this damselfly has ``record-trace`` (the prefetch column needs it)."""
    r = subprocess.run(
        [*damselfly_argv(), "record-trace", "--help"], capture_output=True, check=False, timeout=60
    )
    return r.returncode == 0


def run_to_end(
    argv: list[str],
    log: Path,
    what: str,
    children: list[subprocess.Popen[bytes]],
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run `argv` to its end, its output appended to `log`; in `children` meanwhile (an interrupted
    benchmark stops it). A failure or a timeout raises `OSError` naming `what` and `log`."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        children.append(proc)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise OSError(f"{what} did not finish in {timeout:.0f}s; see {log}") from None
        children.remove(proc)
    if status != 0:
        raise OSError(f"{what} exited with status {status}; see {log}")


def wait_daemon(serve: Serve, timeout: float, member: str | None = None) -> float:
    """Wait until the device daemon that `serve` starts at its start answers (and, given `member`, counts
    it among its live peers); the seconds it took."""
    started = time.monotonic()
    while serve.daemon_pid() is None:
        if time.monotonic() - started > timeout:
            raise OSError(
                f"no device daemon answers {timeout:.0f}s after damselfly serve started; see {serve.log} "
                f"and {serve.state}/devd.log"
            )
        time.sleep(0.05)
    while member is not None and member not in serve.devices()["p2p"].get("members", []):
        if time.monotonic() - started > timeout:
            raise OSError(f"the device daemon does not count {member} among its live peers; see {serve.log}")
        time.sleep(0.1)
    return time.monotonic() - started


def fill_cache(
    containerd: Containerd,
    serve: Serve,
    ref: str,
    *,
    snapshotter: str,
    hold_key: str,
    timeout: float,
    log: Path | None = None,
) -> float:
    """Keep image `ref`'s device attached (a view of its top snapshot) until every blob of the device
    daemon is complete and verified, then remove the view: no container or view is left, so the chain
    mount is released and the device detached; the image, its snapshots, the daemon and its cache stay.
    Returns the seconds it took; ctr's output goes to `log`."""
    containerd.hold(hold_key, containerd.top_chain_id(ref), snapshotter=snapshotter, log=log)
    started = time.monotonic()
    try:
        while True:
            blobs = [b for b in serve.devices()["blobs"].values() if not b["local"]]
            if blobs and all(b["complete"] and b["verified"] for b in blobs):
                return time.monotonic() - started
            failed = [b.get("error") for b in blobs if b.get("background") == "failed"]
            if failed:
                raise OSError(f"background download failed: {failed[0]}; see {serve.state}/devd.log")
            if time.monotonic() - started > timeout:
                raise OSError(f"the cache of {ref} is not complete after {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        containerd.unhold(hold_key, snapshotter=snapshotter, log=log)


class PeerParent:
    """The P2P column's parent: a ``damselfly device-daemon`` in network namespace `net` (a
    `FleetNode`), its files below `directory`. Its config: plain HTTP to the registry, no background
    delay, ``[p2p]`` with `members` (itself first: the seed), the `secret`, and the registry it may
    fetch from for peers; `prime` mounts an image and waits until its cache holds all of it."""

    def __init__(
        self,
        net: NetNode,
        directory: Path,
        members: list[str],
        secret: Path,
        registry: str,
        prefetch_key: bool,
    ) -> None:
        directory.mkdir(parents=True)
        self.node = FleetNode("p2p parent", net, directory, directory / "config.toml")
        self.dir = directory
        if self.node.address != members[0]:
            raise ValueError(f"the parent ({self.node.address}) must be the first member (the seed)")
        remote: dict[str, object] = {"plain_http": True}
        if prefetch_key:
            remote["prefetch"] = False  # its cache is filled whole anyway
        tables: dict[str, dict[str, object]] = {
            "remote": remote,
            "device": {"background_delay": 0.0},
            "p2p": {
                "enabled": True,
                "listen": self.node.address,
                "peers": members,
                "seeds": members[:1],
                "secret_file": str(secret),
                "registries": [registry],
            },
        }
        self.node.config.write_text(
            "\n".join(
                f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())
                for name, keys in tables.items()
            )
        )

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def log(self) -> Path:
        return self.node.log

    def prime(self, ref: str, timeout: float) -> float:
        """Start the daemon, mount `ref` (the mount stays until `stop`), wait until every blob is
        complete and verified; the seconds the download took."""
        self.node.start()
        started = time.monotonic()
        self.node.mount(ref, self.dir / "mnt")
        while not self.node.complete():
            if time.monotonic() - started > timeout:
                raise OSError(f"the parent's cache is not complete after {timeout:.0f}s; see {self.log}")
            time.sleep(0.5)
        return time.monotonic() - started

    def sources(self) -> LayerSources:
        status: dict[str, Any] = self.node.status()
        return LayerSources.of(status)

    def stop(self) -> list[str]:
        return self.node.stop()
