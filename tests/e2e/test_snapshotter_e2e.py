"""The damselfly snapshotter under a real containerd 1.6 (proxy plugin ``damselfly`` → a `damselfly serve`
started here) with the real loopback registry, behind a TCP proxy that counts what the registry serves:

- a converted image pulled with `damselfly rpull` runs with ``ctr run --snapshotter damselfly`` having
  fetched only part of itself;
- the unconverted image pulls with ``ctr image pull --snapshotter damselfly`` and runs;
- containers that write, ``ctr snapshots commit`` of one (a plain layer over converted ones), and
  ``ctr image rm --sync`` (containerd's GC) leave no snapshot, mount, loop device or attached device;
- ten containers of one converted image started at once share one device;
- `damselfly serve` killed with SIGKILL and restarted while a container reads: no read fails, and the
  service answers again.

One containerd, one `damselfly serve` and one device daemon serve the whole module (each test removes
what it made); the teardown undoes, by exact path and pid, what serve leaves on purpose (chain mounts,
the detached device daemon) and fails the module if anything else was left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from scripts.demolib.registry import free_port
from scripts.demolib.serve import release as release_remote
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from snapshotter.host.mountinfo import find_mount
from tests import oci_images as oi
from tests.p2p.registry_server import RegistryServer
from tests.programs import euid_program
from tests.snapshotter import remote_lab, serving
from tests.snapshotter.devd import CountingProxy

from . import observe
from .containerd import Containerd, remove_container, task_status, wait_task

SNAPSHOTTER = "damselfly"
NS = "e2e-remote"
MiB = 1 << 20


def big_file(name: str, size: int, seed: int) -> oi.TarEntry:
    """Incompressible bytes: the converted blob is as big as the file."""
    return oi.file(name, random.Random(seed).randbytes(size))


@dataclass(frozen=True)
class Images:
    plain: str  # the unconverted busybox image (registry reference)
    lazy: str  # converted: busybox + a 40 MiB file nobody reads, for the byte count
    lazy_repo: str
    shared: str  # converted: busybox + an 8 MiB file, for the other tests


@pytest.fixture(scope="module")
def images(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Images:
    tmp = tmp_path_factory.mktemp("images")
    plain = oi.push_image(
        registry.host, oi.write_layout(oi.busybox_image(), tmp / "plain"), "e2e-remote/plain", "v1"
    )
    out = {}
    for name, size, seed in (("lazy", 40 * MiB, 1), ("shared", 8 * MiB, 2)):
        layer = oi.Layer((big_file("big", size, seed),), created_by=f"ADD {name} /")
        src = oi.push_image(
            registry.host, oi.write_layout(oi.busybox_image(layer), tmp / name), f"e2e-remote/{name}", "src"
        )
        dst = f"{registry.host}/e2e-remote/{name}:damselfly"
        remote_lab.convert(src, dst, tmp / "cache")  # one cache: the busybox layer converts once
        out[name] = dst
    return Images(plain, out["lazy"], "e2e-remote/lazy", out["shared"])


@pytest.fixture(scope="module")
def proxy(registry: RegistryServer) -> Iterator[CountingProxy]:
    with CountingProxy(registry.host) as p:
        yield p


@dataclass
class Stack:
    containerd: Containerd
    served: serving.Served
    dir: Path
    config: Path
    metrics: str  # host:port of the device daemon's /metrics

    @property
    def root(self) -> Path:
        return self.served.root

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def restart_serve(self) -> None:
        self.served = serving.start(self.dir, "--config", str(self.config))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """`damselfly serve` on a short temporary directory, and a containerd whose proxy plugin is it."""
    d = Path(tempfile.mkdtemp(prefix="dfly-e2e-", dir="/tmp"))
    metrics = f"127.0.0.1:{free_port()}"
    config = remote_lab.serve_config(d / "config.toml", d / "state", device_metrics=metrics)
    served = serving.start(d, "--config", str(config))
    c = Containerd(proxy_plugins={SNAPSHOTTER: str(served.socket)}, namespace=NS)
    stack = Stack(c, served, d, config, metrics)
    problems: list[str] = []
    try:
        c.start()
        yield stack
    finally:
        problems += c.stop()  # first: containerd may still call the snapshotter
        problems += [f"containerd left {x}" for x in c.leaks()]
        stack.served.stop()
        problems += release_remote(stack.root, stack.state)
        serving.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)
    assert not problems, problems


def rpull(c: Containerd, ref: str) -> str:
    r = CliRunner().invoke(
        cli, ["rpull", ref, "--address", c.address, "--namespace", NS], catch_exceptions=False
    )
    assert r.exit_code == EXIT_OK, r.output
    return r.output


def snapshot_names(c: Containerd) -> list[str]:
    lines = c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
    return sorted(line.split()[0] for line in lines if line.strip())


def assert_nothing_left(stack: Stack) -> None:
    """No snapshot (containerd's or ours), no mount under serve's root, no loop device over a device
    file, no attached device."""
    assert snapshot_names(stack.containerd) == []
    assert serving.names(stack.served.stub, None) == [], "containerd's GC left snapshots in damselfly"
    assert serving.mounts_under(stack.root) == []
    assert remote_lab.device_loops(stack.state) == []
    assert remote_lab.attached_devices(stack.state) == []


def wait_released(stack: Stack, timeout: float = 20.0) -> None:
    """containerd 1.6 removes a snapshot from its own store at once but from the snapshotter only when its
    garbage collector next runs (soon after a deletion): wait for the chain mounts to go."""
    deadline = time.monotonic() + timeout
    while remote_lab.chain_mounts(stack.root):
        assert time.monotonic() < deadline, (
            f"chain mounts outlived their users: {remote_lab.chain_mounts(stack.root)}"
        )
        time.sleep(0.1)


def remove_image(stack: Stack, ref: str) -> None:
    stack.containerd.ctr("image", "rm", "--sync", ref)
    assert_nothing_left(stack)


# -- the lazy pull ---------------------------------------------------------------------------------


def test_converted_image_runs_after_fetching_only_part_of_it(
    stack: Stack, images: Images, proxy: CountingProxy
) -> None:
    c = stack.containerd
    ref = f"{proxy.host}/{images.lazy_repo}:damselfly"  # every byte of the registry through the proxy
    manifest = remote_lab.manifest_of(proxy.host, ref)
    image_bytes = sum(d.size for d in manifest.layers) + manifest.config.size + manifest.size
    before = proxy.served

    out = rpull(c, ref)
    assert re.findall(r"^layer \d+/\d+ [0-9a-f]{12}: (\w+)", out, re.MULTILINE) == ["remote", "remote"], out
    run = c.run(ref, ["/bin/sh", "-c", "echo hello"], snapshotter=SNAPSHOTTER)
    assert run.stdout == "hello\n"

    served = proxy.served - before
    print(f"registry served {served} of {image_bytes} bytes ({served / image_bytes:.1%})")
    assert 0 < served < image_bytes * 0.25, f"the registry served {served} of {image_bytes} bytes"

    # What an operator sees while a container of the image runs: `damselfly status` and /metrics.
    c.run(
        ref,
        ["/bin/sh", "-c", "sleep 300"],
        container_id="observed",
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    try:
        wait_task(c, "observed", "RUNNING")
        assert_lazy_status_and_metrics(
            stack, ref, [d.digest for d in manifest.layers], lambda: proxy.served - before
        )
    finally:
        remove_container(c, "observed")
    wait_released(stack)
    remove_image(stack, ref)


def assert_lazy_status_and_metrics(
    stack: Stack, ref: str, layers: list[str], proxied_now: Callable[[], int]
) -> None:
    """`damselfly status --json` shows the image's chain, mounted and attached, each layer's blob
    partly local (the background download is held back), bytes from the registry; a scrape of the
    daemon's /metrics agrees. `proxied_now()`: what the registry served the test so far."""
    status = observe.status(stack.config, stack.root)
    proxied = proxied_now()  # after the status: the kernel's readahead may still be fetching
    assert status["daemon"]["running"] and status["daemon"]["metrics"] == {
        "address": stack.metrics,
        "error": None,
    }
    (chain,) = [x for x in status["chains"] if ref in x["images"]]
    assert chain["layers"] == layers
    # The running container (containerd's GC may not have removed the first one's snapshot yet).
    assert chain["mounted"] and chain["attached"] and chain["users"] >= 1, chain
    (device,) = [d for d in status["devices"] if d["name"] == chain["device"]]
    assert device["layers"] == layers and not device["writable"]
    blobs = [observe.blob(status, digest) for digest in layers]
    for b in blobs:
        assert b["devices"] == [chain["device"]]
        assert 0 < b["local_bytes"] <= b["size"] and not b["complete"], b
        assert b["background"] == "waiting", b  # held back: background_delay = 3600
    big = blobs[-1]  # the 40 MiB file nobody reads
    assert big["percent"] < 25, big
    registry_bytes = sum(b["registry_bytes"] for b in blobs)
    fetched = status["bytes"]["fetched"]["registry"]
    # Every layer byte came from the registry, through the proxy (the node's counter has more: the
    # image config, and what other tests fetched). The blobs' own counters start at their open: once
    # containerd's GC removed the first container's snapshot, this device was attached anew.
    assert 0 < fetched <= proxied, (fetched, proxied)
    assert registry_bytes <= fetched, (registry_bytes, fetched)
    assert status["bytes"]["fetched"]["peer"] == 0
    read = status["bytes"]["read"]
    assert read["registry"] > 0 and read["peer"] == 0, read  # reads that waited for the registry
    assert status["reads"]["timeouts"] == 0 and status["reads"]["errors"] == 0

    samples = observe.scrape(stack.metrics)  # after the status: counters can only have grown
    assert observe.sample(samples, "damselfly_fetched_bytes_total", source="registry") >= fetched
    assert observe.sample(samples, "damselfly_read_bytes_total", source="registry") >= read["registry"]
    assert observe.sample(samples, "damselfly_read_bytes_total", source="cache") >= read["cache"]
    assert observe.sample(samples, "damselfly_fetch_seconds_count", source="registry") > 0
    assert observe.sample(samples, "damselfly_devices") >= 1
    for b in blobs:
        assert observe.sample(samples, "damselfly_blob_size_bytes", blob=b["digest"]) == b["size"]
        local = observe.sample(samples, "damselfly_blob_local_bytes", blob=b["digest"])
        assert b["local_bytes"] <= local <= b["size"]
        assert observe.sample(samples, "damselfly_blob_complete", blob=b["digest"]) == 0
        assert (
            observe.sample(samples, "damselfly_background_download", blob=b["digest"], state="waiting") == 1
        )
    assert observe.sample(samples, "damselfly_blob_local_bytes", blob=big["digest"]) < big["size"]
    assert observe.sample(samples, "damselfly_cache_usage_bytes") > 0
    assert observe.sample(samples, "damselfly_corrupt_chunks_total", source="registry") == 0


def test_unconverted_image_pulls_and_runs_through_ctr(stack: Stack, images: Images) -> None:
    c = stack.containerd
    c.pull(images.plain, snapshotter=SNAPSHOTTER)
    assert c.run(images.plain, ["/bin/sh", "-c", "echo plain"], snapshotter=SNAPSHOTTER).stdout == "plain\n"
    remove_image(stack, images.plain)


# -- writes, commits and containerd's GC -----------------------------------------------------------


def test_written_files_commits_and_gc_leave_nothing_behind(stack: Stack, images: Images) -> None:
    c = stack.containerd
    rpull(c, images.shared)
    # ctr run --rm of a container that writes: its upper goes with it.
    script = "echo scratch > /tmp/scratch && rm /etc/group && cat /tmp/scratch"
    assert c.run(images.shared, ["/bin/sh", "-c", script], snapshotter=SNAPSHOTTER).stdout == "scratch\n"
    wait_released(stack)

    # A container that writes and stays; its snapshot committed as a plain layer on the converted ones.
    c.run(
        images.shared,
        ["/bin/sh", "-c", "mkdir /data && echo written > /data/f && rm /etc/group"],
        container_id="writer",
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    wait_task(c, "writer", "STOPPED")
    c.ctr("task", "rm", "writer")
    c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "commit", "writer-committed", "writer")
    assert remote_lab.chain_mounts(stack.root) == [], "a committed container keeps no chain mount"
    info = json.loads(c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", "writer-committed").stdout)
    assert info["Kind"] == "Committed"
    with c.view("writer-committed", snapshotter=SNAPSHOTTER) as root:
        assert (root / "data" / "f").read_text() == "written\n"
        assert not (root / "etc" / "group").exists()
        assert (root / "etc" / "passwd").exists()  # from the converted layer below
        assert (root / "bin" / "busybox").stat().st_size > 100_000
        assert len(remote_lab.chain_mounts(stack.root)) == 1
    wait_released(stack)

    c.ctr("container", "rm", "writer")  # its snapshot key is gone (committed): tolerated
    c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "writer-committed")
    remove_image(stack, images.shared)


# -- many containers, one device -------------------------------------------------------------------


def test_ten_containers_started_at_once_share_one_device(stack: Stack, images: Images) -> None:
    c = stack.containerd
    rpull(c, images.shared)
    outputs: dict[int, str] = {}
    errors: list[BaseException] = []
    cids = [f"many-{i}" for i in range(10)]

    def start(i: int) -> None:
        try:
            # Each waits for /go, which the test creates once all ten run: they are up at the same time.
            script = f"cat /bin/busybox > /dev/null && echo ok-{i} && while [ ! -e /go ]; do sleep 0.1; done"
            r = c.run(
                images.shared,
                ["/bin/sh", "-c", script],
                container_id=cids[i],
                snapshotter=SNAPSHOTTER,
                timeout=180,
            )
            outputs[i] = r.stdout
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while sum(1 for cid in cids if task_status(c).get(cid) == "RUNNING") < 10:
            assert not errors, errors
            assert time.monotonic() < deadline, f"not all ten started: {task_status(c)}"
            time.sleep(0.2)
        assert len(remote_lab.chain_mounts(stack.root)) == 1
        assert len(remote_lab.attached_devices(stack.state)) == 1
        assert len(remote_lab.device_loops(stack.state)) == 1
    finally:
        for cid in cids:
            with contextlib.suppress(OSError):
                (c.state / "io.containerd.runtime.v2.task" / NS / cid / "rootfs" / "go").touch()
        for t in threads:
            t.join(180)
    assert not errors, errors
    assert outputs == {i: f"ok-{i}\n" for i in range(10)}
    wait_released(stack)
    remove_image(stack, images.shared)


# -- what the container sees -------------------------------------------------------------------------


def test_a_setuid_binary_of_a_converted_image_runs_setuid_in_its_container(
    stack: Stack, registry: RegistryServer, tmp_path: Path
) -> None:
    """The chain mount under the container is nosuid,nodev; the container's own overlay decides what
    runs in it, so `su`, `ping` and `sudo` keep working (docs/security.md)."""
    layer = oi.Layer(
        (
            oi.file("euid", euid_program(tmp_path / "programs"), mode=0o4755),
            oi.char_device("devnull", 1, 3, mode=0o666),
        ),
        created_by="ADD euid devnull /",
    )
    image = dataclasses.replace(oi.busybox_image(layer), user="65534:65534")
    src = oi.push_image(registry.host, oi.write_layout(image, tmp_path / "suid"), "e2e-remote/suid", "src")
    ref = f"{registry.host}/e2e-remote/suid:damselfly"
    remote_lab.convert(src, ref, tmp_path / "cache")
    c = stack.containerd
    rpull(c, ref)
    c.run(
        ref,
        ["/bin/sh", "-c", "sleep 60"],
        container_id="suid",
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    try:
        wait_task(c, "suid", "RUNNING")
        (chain,) = remote_lab.chain_mounts(stack.root)
        info = find_mount(chain)
        assert info is not None and {"ro", "nosuid", "nodev"} <= set(info.options), info
    finally:
        remove_container(c, "suid")
    # ctr's default spec sets no_new_privs; a Kubernetes pod's default (allowPrivilegeEscalation) does not.
    out = c.run(ref, ["/euid"], snapshotter=SNAPSHOTTER, extra=["--allow-new-privs"]).stdout
    assert out == "euid=0 uid=65534\n", out
    wrote = c.run(ref, ["/bin/sh", "-c", "echo x > /devnull && echo wrote"], snapshotter=SNAPSHOTTER)
    assert wrote.stdout == "wrote\n", wrote
    wait_released(stack)
    remove_image(stack, ref)


# -- restarts --------------------------------------------------------------------------------------

READER = (
    "i=0; while true; do "
    "dd if=/big of=/dev/null bs=65536 count=4 skip=$(( (i * 37) % 128 )) 2>/dev/null "
    "|| echo err $i >> /errors; "
    "cat /bin/busybox > /dev/null || echo err busybox $i >> /errors; "
    "i=$((i + 1)); echo $i > /count.new && mv /count.new /count; done"
)


def test_serve_killed_and_restarted_while_a_container_reads(stack: Stack, images: Images) -> None:
    c = stack.containerd
    rpull(c, images.shared)
    c.run(
        images.shared,
        ["/bin/sh", "-c", READER],
        container_id="reader",
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    rootfs = c.state / "io.containerd.runtime.v2.task" / NS / "reader" / "rootfs"
    try:

        def count() -> int:
            try:
                return int((rootfs / "count").read_text() or 0)
            except (FileNotFoundError, ValueError):
                return 0

        def advances(timeout: float = 20.0) -> int:
            start = count()
            deadline = time.monotonic() + timeout
            while count() < start + 20:
                assert time.monotonic() < deadline, f"the reader stalled at {count()}"
                time.sleep(0.05)
            return count()

        advances()
        [chain] = remote_lab.chain_mounts(stack.root)
        mount_before = find_mount(chain)
        assert mount_before is not None

        stack.served.stop(signal.SIGKILL)
        advances()  # reads go on without the service: the device daemon serves them
        stack.restart_serve()
        deadline = time.monotonic() + 30
        while c.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False).returncode != 0:
            assert time.monotonic() < deadline, "containerd never reached the restarted snapshotter"
            time.sleep(0.2)
        assert "reader" in snapshot_names(c)
        advances()

        assert not (rootfs / "errors").exists(), (rootfs / "errors").read_text()
        after = find_mount(chain)
        assert after is not None and after.mount_id == mount_before.mount_id, "the chain was remounted"
        assert "reconciled converted chains: 1 needed, 1 mounted, 0 released" in stack.served.log_text()
    finally:
        remove_container(c, "reader")
    remove_image(stack, images.shared)
