"""scripts/demo.py (``make demo``) on the small image (``--small``, busybox), in a temporary work dir: a
full run prints the results table — with the second node's column: its layers came from the first node,
not the registry — and leaves nothing running, and an interrupt (SIGINT) in the middle of the conversion
stops everything it had started — processes (the pids it reported and any process naming its work dir),
mounts and loop devices under the work dir, sockets, the nodes' cgroups, the network lab's bridge and
namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.demolib.procs import alive, left_below, mounts_below, sockets_below, sweep

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "scripts" / "demo.py"
CGROUPS = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def image_cache() -> Iterator[Path]:
    """The demo's image cache, shared by the tests of this module (the busybox image builds once)."""
    d = Path(tempfile.mkdtemp(prefix="dfly-demo-images-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    """A short work dir (the containerd socket path below it must fit in sun_path)."""
    if os.geteuid() != 0:
        pytest.fail("needs root: the demo runs containerd, mounts and loop devices")  # never a skip
    d = Path(tempfile.mkdtemp(prefix="dfly-demo-", dir="/tmp"))
    try:
        yield d
    finally:
        sweep(d)  # whatever a failed assertion left: by exact pid and path, never by name
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def demo(work: Path, image_cache: Path) -> Iterator[subprocess.Popen[str]]:
    """``demo.py --small`` in `work`, its output piped; killed on the way out if it still runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "CONTAINERD_"))}
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--small", "--work-dir", str(work), "--image-cache", str(image_cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def leftovers(work: Path, output: str) -> list[str]:
    """Everything of the demo still there: reported pids, processes naming the work dir, mounts, loop
    devices, sockets and the run directory below it, its cgroup."""
    found = []
    pids = {int(p) for p in re.findall(r"\bpid (\d+)", output)}
    assert pids, output
    found += [f"reported pid {pid} alive" for pid in sorted(pids) if alive(pid)]
    found += left_below(work)  # processes naming it, mounts and loop devices below it
    found += [f"socket {s}" for s in sockets_below(work)]
    if (work / "run").exists():
        found.append(f"directory {work / 'run'}")
    cgroups = re.findall(r"cgroup \(CPU accounting\): (\S+)", output)
    assert len(cgroups) == 2, output  # one per node
    for name in (Path(c).name for c in cgroups):
        found += [f"cgroup {d}" for d in [CGROUPS / name, *CGROUPS.glob(f"*/{name}")] if d.exists()]
    lab = re.search(r"network lab: bridge (\S+) .* network namespace (\S+),", output)
    assert lab, output
    bridge, netns = lab.groups()
    found += [f"link {bridge}"] if Path("/sys/class/net", bridge).exists() else []
    found += [f"network namespace {netns}"] if Path("/run/netns", netns).exists() else []
    return found


def test_interrupt_during_conversion_leaves_nothing_behind(work: Path, image_cache: Path) -> None:
    lines: list[str] = []
    with demo(work, image_cache) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "==> [3/7]" in line:  # the conversion step is announced: its converter starts now
                break
        else:
            pytest.fail("the demo ended before the conversion step:\n" + "".join(lines))
        # Mid-conversion: a layer's filesystem is mounted in the converter's work dir. (Waited for, not
        # slept: the small image converts in half a second.)
        deadline = time.monotonic() + 60
        while not mounts_below(work / "cache" / "convert") and proc.poll() is None:
            assert time.monotonic() < deadline, "the converter mounted nothing within 60 s"
            time.sleep(0.005)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "interrupted (SIGINT) during step 3" in output, output
    assert "nothing left running" in output, output
    assert "had to force" not in output, output  # the converter, asked with SIGINT, cleaned up itself
    assert leftovers(work, output) == [], output
    assert (work / "cache").is_dir() and (work / "logs").is_dir()
    assert not list((work / "cache" / "convert").glob("work-*")), "the converter's work dir was left"


def test_small_run_prints_the_table_and_leaves_nothing_behind(work: Path, image_cache: Path) -> None:
    with demo(work, image_cache) as proc:
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    for step in range(1, 8):
        assert f"==> [{step}/7]" in output, output
    table = output[output.index("==> [7/7]") :]
    rows = ("seconds to first output", "registry bytes served", "node CPU-seconds", "layer bytes from peers")
    for row in rows:
        assert row in table, output
    for column in ("damselfly, lazy", "2nd node, lazy", "overlayfs, full pull"):
        assert column in table, output
    assert "nothing left running" in output, output
    assert leftovers(work, output) == [], output

    result = json.loads((work / "result.json").read_text())
    (lazy,) = result["damselfly_lazy"]
    (full,) = result["overlayfs_full"]
    assert lazy["output"] == full["output"] == "hello\n"
    # the overlayfs pull fetched every layer; the lazy start only the blocks the container read
    assert full["registry_bytes"] >= result["image"]["compressed_size"]
    assert 0 < lazy["registry_bytes"] < result["image"]["converted_layer_bytes"]
    assert lazy["node_cpu_s"] > 0 and full["node_cpu_s"] > 0
    assert 0 < lazy["first_output_s"] <= lazy["total_s"]
    # node 2 started the same image with every layer byte from node 1: the registry served it only the
    # manifest and the image config (and answered HEADs), a few kB
    (second,) = result["second_node_lazy"]
    assert second["output"] == "hello\n"
    assert second["layer_sources"]["registry_bytes"] == 0, second
    assert second["layer_sources"]["peer_bytes"] > 0, second
    assert second["node1_uploaded_bytes"] >= second["layer_sources"]["peer_bytes"], second
    assert second["registry_bytes"] < 64 * 1024, second
    assert lazy["layer_sources"]["peer_bytes"] == 0, lazy  # node 1 is every tree's root: the registry
