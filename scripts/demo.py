#!/usr/bin/env python3
"""``make demo``: a converted image starts lazily with damselfly, next to the same image on overlayfs, and
on a second node from the first one's cache.

    demo.py [--work-dir DIR] [--image-cache DIR] [--small] [--runs N] [--target-mb MB]

Needs root (containerd, mounts, loop devices, network namespaces). Steps, each announced:

1. make a network lab (`demolib.netlab`: a bridge with 198.18.<s>.1 in this namespace, and node 2's
   network namespace on it, 198.18.<s>.10), start ``docker-registry`` on the bridge's address (free
   port, own storage: both nodes reach it there, over plain HTTP), and two nodes, each a private
   containerd (own root, state, sockets, config; proxy plugin ``damselfly`` = its own `damselfly
   serve`) and that `damselfly serve` (own config, root, socket, device-daemon state), in a cgroup of
   its own (CPU accounting). Node 1 runs in this namespace, node 2 (containerd, serve, its device
   daemon, its ``ctr`` and ``damselfly rpull``) in its network namespace (``nsenter --net``: mounts
   stay shared). Both serve configs have ``[remote] plain_http = true`` and the same ``[p2p]`` fleet:
   the two peer servers (node 1 on the bridge's address, node 2 on its own), one secret (a 0600 file
   in the run dir), node 1 the seed (the root of every blob's tree: see `p2p_tables`). Nothing of a
   containerd or damselfly already on the machine is used or touched;
2. build the sample image with ``scripts/build_debian_image.py`` (Debian bookworm minbase + python3 +
   a generated payload: >= ``--target-mb`` MB uncompressed; ``--small`` / ``DEMO_SMALL=1``: busybox and
   a 16 MB payload), cached in ``--image-cache``, and push it to the registry byte for byte;
3. ``damselfly convert`` it to the ``:damselfly`` tag (converted layers cached in the work dir);
4. cold start on node 1, lazily: ``damselfly rpull`` + ``ctr run --snapshotter damselfly IMAGE ID
   python3 -c 'print("hello")'`` (busybox: ``sh -c 'echo hello'``);
5. cold start on node 2, lazily, the same way, while node 1 still has the image: first a view of the
   image on node 1 keeps its device attached until its background download has every blob complete
   and verified (``damselfly devices``), then node 2 starts and its device daemon fetches the blocks
   from node 1's peer server, and so does `rpull` the image config (through node 2's device daemon);
   the registry still serves node 2 the manifest and answers the snapshotter's HEADs of the layers;
6. cold start on node 1, full pull: ``ctr image pull`` + ``ctr run`` of the original image on
   containerd's overlayfs. With ``--runs N``, 4+5 and 6 alternate in order (node 2 starts once per
   lazy start of node 1, right after it); each start is cold: page cache dropped, the image's
   content and snapshots removed from that node's containerd, its damselfly root and device cache
   emptied;
7. print the table: seconds from pull start to the container's first output line, bytes the registry
   served (its access log, so node 2's are only what node 2 caused: node 1 is idle then), node
   CPU-seconds (that node's cgroup: `demolib.coldstart`), and the ratios of node 1's two starts; then
   where each node's device daemon got its layer bytes (registry, peers).

Then, and also on Ctrl-C (SIGINT, SIGTERM) or a failure (which names the step and the log to read),
everything it started is stopped and removed: processes by pid, mounts and loop devices by path, the
cgroups, the network lab (by the names it made), the run directory. What stays in the work directory:
``cache/`` (converted layers), ``logs/`` and ``result.json``; built images stay in ``--image-cache``.

Work directory (default ``bench/work/demo``; ``DEMO_WORK_DIR``)::

    run/            removed at the end: registry/, containerd/, serve/ (node 1), node2/ (containerd/,
                    serve/), p2p-secret (the peers' cluster secret)
    netlab.json     the lab's names while it exists (a demo killed by SIGKILL leaves the lab: the
                    next one removes it)
    cache/convert/  damselfly convert --cache-dir (kept)
    logs/           registry, containerd, serve, devd (device daemon), node2-* (node 2's), convert,
                    runs (kept)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from build_debian_image import DEFAULT_CACHE, BuiltImage, ImageSpec, build_image
from demolib import procs
from demolib.coldstart import Bench, LayerSources, StartResult, cold_start
from demolib.containerd import Containerd
from demolib.netlab import NetLab, NetLabError, NetNode, link_exists, netns_exists
from demolib.registry import Registry, free_port, layer_bytes, push_layout
from demolib.serve import Serve, damselfly_argv
from demolib.ui import MB, Ui, fmt_bytes, results_table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK = REPO / "bench" / "work" / "demo"
NAMESPACE = "damselfly-demo"
SNAPSHOTTER = "damselfly"
#: Node 2's peer server port (a namespace of its own: nothing else listens there).
PEER_PORT = 7001
#: The view of the image that keeps node 1's device attached while node 2 starts (`Containerd.hold`).
HOLD_KEY = "damselfly-demo-hold"
#: Seconds node 1's background download may take to complete the image's blobs.
CACHE_TIMEOUT = 900.0
STEPS = (
    "start the network lab, the registry and two nodes (containerd + damselfly serve)",
    "build the sample image and push it",
    "convert it with damselfly convert",
    "cold start on node 1, lazily: damselfly rpull + ctr run --snapshotter damselfly",
    "cold start on node 2 (own netns, containerd, damselfly), lazily: its blocks from node 1",
    "cold start on node 1, full pull: ctr image pull + ctr run (overlayfs)",
    "results",
)
#: Where to look when a step fails (below logs/), besides what the message names.
STEP_LOGS = (
    ("registry.log", "containerd.log", "serve.log", "node2-containerd.log", "node2-serve.log"),
    (),
    ("convert.log",),
    ("runs.log", "serve.log", "devd.log"),
    ("runs.log", "node2-serve.log", "node2-devd.log", "devd.log"),
    ("runs.log", "containerd.log"),
    (),
)
LOGS = ("registry", "containerd", "serve", "devd", "convert", "runs")
NODE2_LOGS = ("containerd", "serve", "devd")
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with its NUL)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived (a KeyboardInterrupt, so no ``except Exception`` swallows it)."""


class StepError(Exception):
    def __init__(self, step: int, cause: BaseException) -> None:
        super().__init__(f"step {step}: {cause}")
        self.step = step
        self.cause = cause


@dataclasses.dataclass(frozen=True)
class Options:
    work: Path
    image_cache: Path
    small: bool
    runs: int
    target_mb: int


class Node:
    """One node: a containerd, its `damselfly serve` (and the device daemon serve starts), the cgroup
    all of them run in; `net` is its network namespace (None: this one). Its files are below
    `directory` (``containerd/``, ``serve/``), its logs ``logs/<log_prefix>{containerd,serve,devd}.log``."""

    def __init__(
        self,
        label: str,
        directory: Path,
        logs: Path,
        log_prefix: str,
        cgroup: str,
        registry: Registry,
        children: list[subprocess.Popen[bytes]],
    ) -> None:
        self.label = label
        self.net: NetNode | None = None
        self.cgroup = procs.NodeCgroup(cgroup)
        self.serve = Serve(
            directory / "serve",
            directory / "serve" / "snapshotter.sock",
            logs / f"{log_prefix}serve.log",
            self.wrap,
        )
        self.containerd = Containerd(
            directory / "containerd",
            logs / f"{log_prefix}containerd.log",
            namespace=NAMESPACE,
            proxy_plugins={SNAPSHOTTER: str(self.serve.socket)},
            wrap=self.wrap,
        )
        self.runs_log = logs / "runs.log"
        self.devd_log = logs / f"{log_prefix}devd.log"
        self.bench = Bench(self.containerd.env(), registry, self.cgroup, self.runs_log, children)
        self.fresh = False  # serve just started: nothing of any image on the node

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` in the node's cgroup, and in its network namespace if it has one."""
        return self.cgroup.wrap(self.net.argv(argv) if self.net is not None else argv)

    def start(self) -> None:
        self.serve.start()
        self.fresh = True
        self.containerd.start()

    def make_cold(self, ref: str) -> None:
        """No snapshots, content or device cache of `ref` (nothing to do right after `start`)."""
        if not self.fresh:
            self.containerd.image_rm(ref, self.runs_log)
            self.serve.reset(keep_log=self.devd_log)
        self.fresh = False

    def rpull_argv(self, ref: str) -> list[str]:
        # --plain-http: the registry is on the lab's bridge, not on loopback (HTTP only there by default);
        # --state-dir: the node's device daemon, which gets the image config from peers when it has them
        address, state = self.containerd.address, str(self.serve.state)
        argv = ["rpull", ref, "--address", address, "--namespace", NAMESPACE, "--plain-http"]
        return self.wrap([*damselfly_argv(), *argv, "--state-dir", state])

    def run_argv(self, ref: str, cid: str, command: list[str], snapshotter: str) -> list[str]:
        """``ctr run --rm``, in the node's cgroup; the container in its own, below the containers'."""
        cgroup = f"{self.cgroup.containers_parent}/{cid}"
        args = self.containerd.run_args(ref, cid, command, snapshotter=snapshotter, cgroup=cgroup)
        return self.containerd.wrap(self.containerd.argv(args))


def p2p_tables(me: str, members: list[str], secret: Path) -> dict[str, Mapping[str, object]]:
    """The ``[remote]`` and ``[p2p]`` tables of a node's serve config: plain HTTP to the registry (it is
    on the bridge, not loopback), the peer network with the two members, node 1 (`members[0]`) the seed.

    Why a seed: a blob's tree is a rendezvous order of the members (`p2p.tree`), and its root fetches
    from the registry and asks no peer. Without a seed, node 2 would be the root of about half of the
    layer blobs and fetch those from the registry although node 1 has them; with node 1 first in every
    tree, node 2 asks node 1 for every blob (and node 1 never asks node 2)."""
    return {
        "remote": {"plain_http": True},
        "p2p": {
            "enabled": True,
            "listen": me,
            "peers": members,
            "seeds": members[:1],
            "secret_file": str(secret),
        },
    }


def write_secret(path: Path) -> Path:
    """A fresh cluster secret, 0600 from its creation (the device daemon refuses a wider mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def remove_stale_lab(record: Path) -> list[str]:
    """Remove the links and namespaces an earlier demo's lab left (its names in `record`, written when
    it was made; it is gone after a clean close). Its processes were stopped by pid before."""
    try:
        names = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    removed = []
    for veth, netns in names.get("nodes", []):
        if link_exists(veth):  # deleting one end of a veth deletes both
            subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False, timeout=60)
            removed.append(f"link {veth}")
        if netns_exists(netns):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False, timeout=60)
            removed.append(f"network namespace {netns}")
    bridge = names.get("bridge", "")
    if bridge and link_exists(bridge):
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False, timeout=60)
        removed.append(f"bridge {bridge}")
    record.unlink()
    return removed


class Demo:
    def __init__(self, opts: Options, ui: Ui) -> None:
        self.opts = opts
        self.ui = ui
        self.run_dir = opts.work / "run"
        self.logs = opts.work / "logs"
        self.cache = opts.work / "cache"
        self.lab_record = opts.work / "netlab.json"
        tag = hashlib.sha256(str(opts.work).encode()).hexdigest()[:10]
        # The registry's address is the lab's bridge: set when the lab exists (`start_services`).
        self.registry = Registry(self.run_dir / "registry", self.logs / "registry.log")
        self.children: list[subprocess.Popen[bytes]] = []
        self.node1 = Node(
            "node 1", self.run_dir, self.logs, "", f"damselfly-demo-{tag}", self.registry, self.children
        )
        self.node2 = Node(
            "node 2",
            self.run_dir / "node2",
            self.logs,
            "node2-",
            f"damselfly-demo-{tag}-node2",
            self.registry,
            self.children,
        )
        self.nodes = (self.node1, self.node2)
        self.lab: NetLab | None = None
        self.held = False  # node 1's view of the image (`HOLD_KEY`) exists
        self.step = 0

    # -- steps ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def announce(self, n: int, title: str | None = None) -> Iterator[None]:
        self.step = n
        self.ui.step(n, title or STEPS[n - 1])
        try:
            yield
        except (Interrupted, StepError):
            raise
        except Exception as e:
            raise StepError(n, e) from e

    def prepare(self) -> None:
        """Clean what an earlier demo in this work dir may have left (killed with SIGKILL, say)."""
        for d in (self.logs, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        stale = procs.sweep(self.run_dir) + procs.sweep(self.cache)
        for node in self.nodes:
            stale += node.cgroup.remove()
        stale += remove_stale_lab(self.lab_record)
        if stale:
            self.ui.warn(f"removed what an earlier run left: {'; '.join(stale)}")
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        names = [f"{n}.log" for n in LOGS] + [f"node2-{n}.log" for n in NODE2_LOGS]
        for name in names:
            (self.logs / name).unlink(missing_ok=True)
        (self.opts.work / "result.json").unlink(missing_ok=True)
        for node in self.nodes:
            longest = node.containerd.address + ".ttrpc"
            if len(os.fsencode(longest)) > SUN_PATH_MAX:
                raise OSError(
                    f"the socket path {longest} is too long for a unix socket; use a shorter --work-dir"
                )

    def start_lab(self) -> NetLab:
        # The names go to `lab_record` as they are made: a demo killed by SIGKILL leaves them to the next.
        lab = self.lab = NetLab()
        self.lab_record.write_text(json.dumps({"bridge": lab.bridge, "nodes": []}) + "\n")
        net = self.node2.net = lab.add_node("node2")
        record = {"bridge": lab.bridge, "nodes": [[net.host_veth, net.netns]]}
        self.lab_record.write_text(json.dumps(record) + "\n")
        self.ui.info(
            f"network lab: bridge {lab.bridge} {lab.gateway}/24 (this namespace: the registry, node 1); "
            f"node 2 in network namespace {net.netns}, {net.ip}"
        )
        return lab

    def start_services(self) -> None:
        for node in self.nodes:
            node.cgroup.create()
        lab = self.start_lab()
        assert self.node2.net is not None
        self.registry.bind = lab.gateway
        self.registry.start()
        self.ui.info(
            f"registry: http://{self.registry.host} (pid {self.registry.pid}), storage {self.registry.dir}"
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        secret = write_secret(self.run_dir / "p2p-secret")
        members = [f"{lab.gateway}:{free_port(lab.gateway)}", f"{self.node2.net.ip}:{PEER_PORT}"]
        for node, me in zip(self.nodes, members, strict=True):
            node.serve.tables = p2p_tables(me, members, secret)
            node.start()
            where = f"network namespace {node.net.netns}" if node.net else "this network namespace"
            self.ui.info(
                f"{node.label} ({where}): damselfly serve {node.serve.socket} (pid {node.serve.pid}), "
                f"config {node.serve.config_path}; containerd {node.containerd.address} "
                f"(pid {node.containerd.pid}), namespace {NAMESPACE}; peer server {me}"
            )
        self.ui.info(f"node cgroup (CPU accounting): {self.node1.cgroup.top}")
        self.ui.info(f"node 2 cgroup (CPU accounting): {self.node2.cgroup.top}")

    def image_spec(self) -> ImageSpec:
        if self.opts.small:
            return ImageSpec(variant="busybox", payload_mb=16)
        return ImageSpec(variant="debian", target_mb=self.opts.target_mb)

    def build_and_push(self) -> tuple[BuiltImage, str]:
        spec = self.image_spec()
        self.ui.info(f"building (or reusing) the {spec.variant} image in {self.opts.image_cache}")
        image = build_image(spec, self.opts.image_cache)
        self.ui.info(
            f"image: {image.layout_dir} ({'cached' if image.cached else f'built in {image.seconds:.0f}s'}), "
            f"{len(image.layers)} layers, {image.uncompressed_size / MB:.0f} MB uncompressed, "
            f"{image.compressed_size / MB:.0f} MB gzip"
        )
        name = "demo/busybox" if self.opts.small else "demo/python"
        ref = f"{self.registry.host}/{name}:latest"
        self.ui.info(f"pushing to {ref}, byte for byte")
        with self.ui.bar("push (hash + upload)", 2 * image.compressed_size) as advance:
            push_layout(
                self.registry.host, Path(image.layout_dir), image.manifest_digest, name, "latest", advance
            )
        return image, ref

    def convert(self, src: str) -> str:
        dst = src.rsplit(":", 1)[0] + ":damselfly"
        argv = [
            *damselfly_argv(),
            "convert",
            src,
            dst,
            "--plain-http",
            "--cache-dir",
            str(self.cache / "convert"),
        ]
        log = self.logs / "convert.log"
        started = time.monotonic()
        self.ui.info(f"damselfly convert {src} {dst}  (log: {log})")
        with log.open("ab") as out, self.ui.status("converting") as update:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            self.children.append(proc)  # until it ends: an interrupted demo stops it with SIGINT
            while proc.poll() is None:
                update(f"{time.monotonic() - started:.0f}s  {_last_line(log)[:60]}")
                time.sleep(0.2)
            self.children.remove(proc)
        if proc.returncode != 0:
            raise OSError(
                f"damselfly convert exited with status {proc.returncode}: {_last_line(log)}; see {log} "
                f"(converted layers are reused from {self.cache / 'convert'}: delete it to start afresh)"
            )
        self.ui.info(_last_line(log))
        return dst

    def lazy_start(
        self, node: Node, ref: str, command: list[str], expect: str
    ) -> tuple[StartResult, LayerSources]:
        """A cold, lazy start on `node`; the image stays on it (`drop_image`)."""
        node.make_cold(ref)
        pull = node.rpull_argv(ref)
        run = node.run_argv(ref, "demo-lazy", command, SNAPSHOTTER)
        with self.ui.status(f"damselfly rpull, then ctr run, from a cold {node.label}"):
            result = cold_start(node.bench, f"damselfly lazy, {node.label}", pull, run, expect)
        sources = LayerSources.of(node.serve.devices())
        self.ui.info(
            f"first output after {result.first_output_s:.2f}s (rpull {result.pull_s:.2f}s), "
            f"registry served {fmt_bytes(result.registry_bytes)} in {result.registry_requests} requests, "
            f"node CPU {result.node_cpu_s:.2f}s; its device daemon (pid {node.serve.daemon_pid()}) "
            f"fetched {fmt_bytes(sources.registry_bytes)} of layers from the registry, "
            f"{fmt_bytes(sources.peer_bytes)} from peers"
        )
        return result, sources

    def fill_cache(self, ref: str) -> None:
        """Keep the image's device attached on node 1 (a view of it) until its background download has
        every blob complete and verified: then node 1 has all of it for node 2."""
        node = self.node1
        node.containerd.hold(
            HOLD_KEY, node.containerd.top_chain_id(ref), snapshotter=SNAPSHOTTER, log=node.runs_log
        )
        self.held = True
        started = time.monotonic()
        with self.ui.status(f"{node.label}: background download of the image's blobs") as update:
            while True:
                blobs = [b for b in node.serve.devices()["blobs"].values() if not b["local"]]
                done = sum(b["present_units"] for b in blobs)
                total = sum(b["total_units"] for b in blobs)
                if blobs and all(b["complete"] and b["verified"] for b in blobs):
                    break
                failed = [b.get("error") for b in blobs if b.get("background") == "failed"]
                if failed:
                    raise OSError(
                        f"{node.label}'s background download failed: {failed[0]}; see {node.devd_log}"
                    )
                if time.monotonic() - started > CACHE_TIMEOUT:
                    raise OSError(
                        f"{node.label}'s cache of {ref} is not complete after {CACHE_TIMEOUT:.0f}s "
                        f"({done} of {total} units); see {node.devd_log}"
                    )
                update(f"{done}/{total} units")
                time.sleep(0.5)
        self.ui.info(
            f"{node.label} has every block of the image: {len(blobs)} blobs complete and verified "
            f"{time.monotonic() - started:.1f}s after its run (its background download starts "
            f"[device] background_delay after the device is attached)"
        )

    def drop_image(self, ref: str) -> None:
        """Node 1's view (if any) and the image off both nodes: their devices are detached."""
        if self.held:
            self.node1.containerd.unhold(HOLD_KEY, snapshotter=SNAPSHOTTER, log=self.node1.runs_log)
            self.held = False
        for node in self.nodes:
            node.containerd.image_rm(ref, node.runs_log)

    def second_start(
        self, ref: str, command: list[str], expect: str
    ) -> tuple[StartResult, LayerSources, LayerSources]:
        """Node 1's cache complete, node 2's lazy cold start; (node 2's result and sources, node 1's
        sources afterwards: what it uploaded)."""
        self.fill_cache(ref)
        result, sources = self.lazy_start(self.node2, ref, command, expect)
        first = LayerSources.of(self.node1.serve.devices())
        self.ui.info(f"{self.node1.label} served {fmt_bytes(first.uploaded_bytes)} to its peers")
        self.drop_image(ref)
        return result, sources, first

    def full_start(self, ref: str, command: list[str], expect: str) -> StartResult:
        node = self.node1
        node.containerd.image_rm(ref, node.runs_log)
        pull = node.wrap(node.containerd.argv(["image", "pull", "--plain-http", ref]))
        run = node.run_argv(ref, "demo-full", command, "overlayfs")
        with self.ui.status("ctr image pull, then ctr run, from a cold node"):
            result = cold_start(node.bench, "overlayfs full pull", pull, run, expect)
        self.ui.info(
            f"first output after {result.first_output_s:.2f}s (pull {result.pull_s:.2f}s), "
            f"registry served {fmt_bytes(result.registry_bytes)}, node CPU {result.node_cpu_s:.2f}s"
        )
        node.containerd.image_rm(ref, node.runs_log)
        return result

    def run(self) -> dict[str, object]:
        with self.announce(1):
            self.prepare()
            self.start_services()
        with self.announce(2):
            image, src = self.build_and_push()
        with self.announce(3):
            dst = self.convert(src)
        if self.opts.small:
            command, expect = ["sh", "-c", "echo hello"], "hello"
        else:
            command, expect = ["python3", "-c", 'print("hello")'], "hello"
        lazy: list[StartResult] = []
        full: list[StartResult] = []
        second: list[StartResult] = []
        lazy_sources: list[LayerSources] = []
        second_sources: list[LayerSources] = []
        uploads: list[LayerSources] = []
        for i in range(self.opts.runs):
            suffix = f" (run {i + 1}/{self.opts.runs})" if self.opts.runs > 1 else ""
            for kind in ("lazy", "full") if i % 2 == 0 else ("full", "lazy"):
                if kind == "lazy":
                    with self.announce(4, STEPS[3] + suffix):
                        result, sources = self.lazy_start(self.node1, dst, command, expect)
                        lazy.append(result)
                        lazy_sources.append(sources)
                    with self.announce(5, STEPS[4] + suffix):
                        result, sources, first = self.second_start(dst, command, expect)
                        second.append(result)
                        second_sources.append(sources)
                        uploads.append(first)
                else:
                    with self.announce(6, STEPS[5] + suffix):
                        full.append(self.full_start(src, command, expect))
        with self.announce(7):
            converted = layer_bytes(dst)
            what = (
                "busybox + 16 MB payload"
                if self.opts.small
                else "Debian bookworm minbase + python3 + payload"
            )
            title = (
                f"{what}: {image.uncompressed_size / MB:.0f} MB uncompressed, "
                f"{image.compressed_size / MB:.0f} MB gzip, {converted / MB:.0f} MB converted (lz4)"
            )
            table = results_table(lazy, full, title, second, lazy_sources, second_sources)
            self.ui.console.print(table)
            for note in NOTES:
                self.ui.info(note)
        return {
            "image": {
                **image.to_json(),
                "converted_layer_bytes": converted,
                "ref": src,
                "converted_ref": dst,
            },
            "command": command,
            "damselfly_lazy": [
                {**dataclasses.asdict(r), "layer_sources": dataclasses.asdict(s)}
                for r, s in zip(lazy, lazy_sources, strict=True)
            ],
            "second_node_lazy": [
                {
                    **dataclasses.asdict(r),
                    "layer_sources": dataclasses.asdict(s),
                    "node1_uploaded_bytes": u.uploaded_bytes,
                }
                for r, s, u in zip(second, second_sources, uploads, strict=True)
            ],
            "overlayfs_full": [dataclasses.asdict(r) for r in full],
        }

    # -- teardown ---------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Stop and remove everything this run started; return what had to be undone by force."""
        undone: list[str] = []
        for proc in list(self.children):  # convert and rpull clean up after themselves on SIGINT
            note = procs.stop_popen(proc, signal.SIGINT, 60.0)
            undone += [note] if note else []
        # The containerds first, while the snapshotters they may still call are up (node 2's first: node
        # 1's removes the shim socket directory it made, if empty); each device daemon last.
        steps: list[tuple[str, Callable[[], list[str]]]] = [
            (f"{self.node2.label}'s containerd", self.node2.containerd.stop),
            (f"{self.node1.label}'s containerd", self.node1.containerd.stop),
        ]
        for node in reversed(self.nodes):  # node 2 first: node 1 is its peer, not the other way round
            steps += [
                (f"{node.label}'s damselfly serve", node.serve.stop),
                (f"{node.label}'s device daemon", node.serve.release),
            ]
        steps += [("registry", self._stop_registry)]
        undone += procs.stop_all(steps)
        for node in self.nodes:
            with contextlib.suppress(OSError):
                node.serve.keep_daemon_log(node.devd_log)
            undone += node.cgroup.remove()
        undone += procs.sweep(self.run_dir) + procs.sweep(self.cache)
        undone += self._close_lab()
        # a converter's work directory, left if it was killed (it removes its own otherwise)
        for work in sorted((self.cache / "convert").glob("work-*")):
            if not procs.mounts_below(work):
                undone.append(f"converter work directory {work}")
                shutil.rmtree(work, ignore_errors=True)
        if self.run_dir.exists() and not procs.mounts_below(self.run_dir):
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return undone

    def _stop_registry(self) -> list[str]:
        note = self.registry.stop()
        return [f"registry: {note}"] if note else []

    def _close_lab(self) -> list[str]:
        """Close the lab (every process in node 2's namespace was stopped by pid before)."""
        if self.lab is None:
            return []
        try:
            self.lab.close()
        except NetLabError as e:
            return [f"network lab: {'; '.join(e.problems)}"]
        self.lab_record.unlink(missing_ok=True)
        return []

    def leftovers(self) -> list[str]:
        """What of this run is still there (should be nothing)."""
        found = [
            f"process {pid}: {' '.join(argv)[:100]}" for pid, argv in procs.processes_naming(self.run_dir)
        ]
        found += [f"mount {mp}" for mp in procs.mounts_below(self.opts.work)]
        found += [f"loop device {dev}" for dev in procs.loops_below(self.opts.work)]
        found += [f"socket {s}" for s in procs.sockets_below(self.opts.work)]
        for node in self.nodes:
            found += [f"cgroup {d}" for d in node.cgroup.dirs()]
            found += [
                f"process {pid} ({node.label}'s device daemon)"
                for pid in node.serve.daemon_pids
                if procs.alive(pid)
            ]
        if self.lab is not None:
            found += [f"link {self.lab.bridge}"] if link_exists(self.lab.bridge) else []
            for net in self.lab.nodes:
                found += [f"link {net.host_veth}"] if link_exists(net.host_veth) else []
                found += [f"network namespace {net.netns}"] if netns_exists(net.netns) else []
        if self.run_dir.exists():
            found.append(f"directory {self.run_dir}")
        return found


#: Printed under the table.
NOTES = (
    "registry bytes and CPU-seconds: from the pull's start until `ctr run` returned; node CPU = containerd "
    "+ shims + damselfly serve + device daemon + ctr/rpull (that node's cgroup), not the container",
    "2nd node: its own network namespace, containerd and damselfly; it starts the image once after each "
    "lazy start of node 1, whose cache then has every block (node 1 is its seed: the root of every "
    "blob's tree); the registry serves it the manifest and the image config, peers serve layers only",
    "layer bytes: what each node's device daemon fetched into its cache until `ctr run` returned "
    "(`damselfly devices`, p2p.fetched_bytes); ratios compare node 1's two starts",
)


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("DEMO_WORK_DIR", DEFAULT_WORK)))
    p.add_argument("--image-cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--small", action="store_true", default=os.environ.get("DEMO_SMALL", "") not in ("", "0"))
    p.add_argument("--runs", type=int, default=int(os.environ.get("DEMO_RUNS", "1")))
    p.add_argument("--target-mb", type=int, default=1100, help="uncompressed size of the Debian image")
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error("--runs must be at least 1")
    return Options(a.work_dir.resolve(), a.image_cache.resolve(), a.small, a.runs, a.target_mb)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    ui = Ui(len(STEPS))
    if os.geteuid() != 0:
        ui.error(
            "make demo needs root: it runs containerd and runc, mounts filesystems and attaches loop devices."
        )
        ui.error("Run it as root: sudo make demo")
        return 1
    opts.work.mkdir(parents=True, exist_ok=True)
    lock = (opts.work / ".lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        ui.error(f"another demo is running in {opts.work}; wait for it or use --work-dir")
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    demo = Demo(opts, ui)
    kind = "small: busybox" if opts.small else "Debian + python3"
    ui.console.print(f"[bold]damselfly demo[/] ({kind}), work dir {opts.work}, pid {os.getpid()}")
    status = 0
    try:
        result = demo.run()
        (opts.work / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    except Interrupted as e:
        ui.error(
            f"interrupted ({e}) during step {demo.step} ({STEPS[demo.step - 1] if demo.step else 'setup'})"
        )
        status = 130
    except StepError as e:
        logs = [str(opts.work / "logs" / name) for name in STEP_LOGS[e.step - 1]]
        ui.error(f"demo failed at step {e.step} ({STEPS[e.step - 1]}): {e.cause}")
        if logs:
            ui.error(f"read: {', '.join(logs)}")
        status = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not leave half of it behind
        ui.console.print(
            "[bold]==> cleanup[/]: stopping and removing everything the demo started "
            "(Ctrl-C is ignored until done)"
        )
        undone = demo.cleanup()
        if undone:
            ui.warn(f"had to force: {'; '.join(undone)}")
        left = demo.leftovers()
        if left:
            ui.error(f"left behind (remove by hand): {'; '.join(left)}")
            status = status or 1
        else:
            ui.info(
                f"nothing left running; kept: {opts.work / 'cache'}, {opts.work / 'logs'}, {opts.image_cache}"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
