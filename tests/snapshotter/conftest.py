"""Fixtures for tests that make real loop devices and mounts: everything is undone by exact name.

`KernelResources` remembers the mount points a test registers; its teardown unmounts exactly those and
detaches every loop device bound to a file under the test's own directory, whoever attached it. It
uses util-linux and /proc (`scripts.demolib.procs`) directly, not the code under test, so a bug there
cannot hide a leak.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from scripts.demolib.procs import attached_loops, mount_points

if TYPE_CHECKING:
    from .devd import DeviceLab


class KernelResources:
    """Mount points and loop devices a test made, removed in reverse order at teardown."""

    def __init__(self, root: Path) -> None:
        self.dir = root  # where the test keeps its files; loop devices over files below it are ours
        self.root = str(root.resolve())
        self._mounts: list[str] = []

    def mount_point(self, path: Path) -> Path:
        """Make directory `path` and register it as a mount point to clean up."""
        path.mkdir(parents=True, exist_ok=True)
        self._mounts.append(os.path.abspath(path))
        return path

    def file_mount_point(self, path: Path) -> Path:
        """Register file `path` (which must exist) as a mount point to clean up (a bind mount of a file)."""
        assert path.is_file(), path
        self._mounts.append(os.path.abspath(path))
        return path

    def loop(self, dev: str) -> str:
        """Note a device the test attached itself (teardown finds it by its backing file anyway)."""
        backing = attached_loops().get(dev, "")
        assert backing.startswith(self.root + os.sep), f"{dev} is bound to {backing!r}, not a file of ours"
        return dev

    def cleanup(self) -> list[str]:
        """Undo everything; return what had to be undone (tests that clean up themselves leave [])."""
        undone = []
        for target in reversed(self._mounts):
            for _ in range(8):  # stacked mounts: unmount until the point is free
                if target not in mount_points():
                    break
                undone.append(f"umount {target}")
                r = subprocess.run(["umount", "--", target], capture_output=True, check=False)
                if r.returncode != 0:
                    subprocess.run(["umount", "--lazy", "--", target], capture_output=True, check=False)
        # Only devices bound to files under our directory: device numbers are shared with every other
        # process on the host, and a number we used may already belong to someone else.
        for dev, backing in sorted(attached_loops().items()):
            if backing.startswith(self.root + os.sep):
                undone.append(f"losetup -d {dev}")
                subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False)
        return undone


def _require_root() -> None:
    if os.geteuid() != 0:
        # CI runs as root; without it these tests cannot run, and that is a failure, never a skip.
        pytest.fail("needs root (CAP_SYS_ADMIN) for loop devices and mounts")


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[KernelResources]:
    _require_root()
    res = KernelResources(tmp_path)
    yield res
    res.cleanup()


@pytest.fixture(scope="module")
def kernel_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelResources]:
    _require_root()
    res = KernelResources(tmp_path_factory.mktemp("kernel"))
    yield res
    res.cleanup()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DeviceLab]:
    """A `DeviceLab` (device daemons, registries, mounts) under the test's directory; its teardown
    fails the test if anything it made was left behind. Modules with a lab of another kind define
    their own `lab`."""
    if os.geteuid() != 0:
        pytest.fail("the device tests need root: FUSE, loop devices and mounts")
    from .devd import DeviceLab  # noqa: PLC0415  # devd imports KernelResources from here

    lab = DeviceLab(tmp_path)
    yield lab
    problems = lab.close()
    assert not problems, problems


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread, as Python's default handler does."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def convert_then_sigterm(args: list[str], delay: float) -> tuple[int, str]:
    """Run ``damselfly convert -v ARGS``, send it SIGTERM `delay` seconds after its first layer is
    applied (the next one is being built then), and return its exit code and output."""
    damselfly = Path(sys.executable).with_name("damselfly")
    proc = subprocess.Popen(
        [str(damselfly), "convert", "-v", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "bytes of tar" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out
