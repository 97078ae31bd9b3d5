"""Processes, mounts, loop devices and a cgroup, found and undone by exact pid and path.

Everything the demo starts lives below its run directory (sockets, state, roots) or names it on its
command line, so "what is left" is a question about that one path: processes whose argv mentions it,
mounts at or below it, loop devices whose backing file is below it. `sweep` answers it and undoes
what it finds, deepest mounts first, by exact mount point and pid (never by process name).

`NodeCgroup` is the cgroup the demo puts the node's processes in (containerd and its shims,
`damselfly serve` and its device daemon, ``ctr`` and ``damselfly rpull``): their CPU time is read from
it (cgroup v2 ``cpu.stat``, or v1 ``cpuacct.usage``), and containers go in a sibling branch so the
node's figure does not include the workload.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


# -- processes ------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every live process but this one."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if raw and alive(int(name)):
            yield int(name), [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")]


def processes_naming(path: str | os.PathLike[str]) -> list[tuple[int, list[str]]]:
    """Live processes with `path` (or a path below it) somewhere in their argv."""
    top = os.fspath(path)
    return [(pid, argv) for pid, argv in processes() if any(top in a for a in argv)]


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_pid(pid: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> str | None:
    """Send `sig`, wait, then SIGKILL; returns a note when SIGKILL was needed."""
    if not alive(pid):
        return None
    signal_pid(pid, sig)
    if wait_gone(pid, timeout):
        return None
    signal_pid(pid, signal.SIGKILL)
    wait_gone(pid, 10.0)
    return f"process {pid} needed SIGKILL"


def stop_popen(
    proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0
) -> str | None:
    """`stop_pid` for a child of ours (reaped, so it leaves no zombie)."""
    if proc.poll() is not None:
        return None
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return None
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10.0)
        return f"process {proc.pid} needed SIGKILL"


# -- mounts and loop devices ----------------------------------------------------------------------


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space...)."""
    out = bytearray()
    raw = field.encode()
    i = 0
    while i < len(raw):
        if raw[i : i + 1] == b"\\" and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f if line.strip()]


def mounts_below(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them)."""
    top = os.path.realpath(path)
    found = [mp for mp in mount_points() if mp == top or mp.startswith(top + os.sep)]
    return sorted(reversed(found), key=lambda mp: mp.count(os.sep), reverse=True)


def unmount_below(path: str | os.PathLike[str]) -> list[str]:
    """Unmount everything at or below `path` by exact mount point (lazily if busy); return them."""
    done: list[str] = []
    for _ in range(16):  # stacked mounts show again once the top one is gone
        points = mounts_below(path)
        if not points:
            break
        for mp in points:
            r = subprocess.run(["umount", "--", mp], capture_output=True, check=False, timeout=60)
            if r.returncode != 0:
                subprocess.run(["umount", "--lazy", "--", mp], capture_output=True, check=False, timeout=60)
            done.append(mp)
    return done


def loops_below(path: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is below `path`."""
    top = os.path.realpath(path) + os.sep
    found = []
    for loop in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)").startswith(top):
            found.append(f"/dev/{loop.name}")
    return found


def detach_loops_below(path: str | os.PathLike[str]) -> list[str]:
    found = loops_below(path)
    for dev in found:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, check=False, timeout=60)
    return found


def sockets_below(path: str | os.PathLike[str]) -> list[str]:
    """Unix sockets bound below `path` that the kernel still knows (/proc/net/unix)."""
    top = os.path.realpath(path) + os.sep
    found = set()
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if len(cols) >= 8 and cols[7].startswith(top):
                found.add(cols[7])
    return sorted(found)


def sweep(path: str | os.PathLike[str]) -> list[str]:
    """Undo whatever is left of the demo below `path`: processes naming it (SIGTERM, then SIGKILL),
    mounts (deepest first), loop devices. Returns what it had to undo (empty when all was clean)."""
    undone: list[str] = []
    for pid, argv in processes_naming(path):
        undone.append(f"process {pid} ({' '.join(argv)[:120]})")
        stop_pid(pid, timeout=10.0)
    undone += [f"mount {mp}" for mp in unmount_below(path)]
    undone += [f"loop device {dev}" for dev in detach_loops_below(path)]
    return undone


# -- the node's cgroup ----------------------------------------------------------------------------


def cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


class NodeCgroup:
    """``/NAME/node`` holds the node's processes, ``/NAME/containers/ID`` the containers (runc makes
    those from ``ctr run --cgroup``). On cgroup v1 the node's processes join the cpuacct hierarchy
    only; runc creates the containers' cgroups in every hierarchy, and `remove` removes ``/NAME``
    from every hierarchy."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.v2 = cgroup_v2()
        base = CGROUP_ROOT if self.v2 else CGROUP_ROOT / "cpuacct"
        self.top = base / name
        self.node = self.top / "node"

    @property
    def containers_parent(self) -> str:
        """The cgroup path (from the hierarchy's root) to put a container below."""
        return f"/{self.name}/containers"

    def create(self) -> None:
        if not self.v2 and not (CGROUP_ROOT / "cpuacct" / "cpuacct.usage").exists():
            raise OSError(
                f"no cgroup v2 at {CGROUP_ROOT} and no cgroup v1 cpuacct hierarchy: cannot count CPU"
            )
        self.node.mkdir(parents=True, exist_ok=True)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` started through a shell that first moves itself into the node cgroup, then execs it
        (a ``preexec_fn`` would do the same, but is not safe in a process with threads)."""
        procs = str(self.node / "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *argv]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of everything that ran in the node cgroup so far."""
        if self.v2:
            for line in (self.node / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            raise OSError(f"{self.node}/cpu.stat has no usage_usec")
        return int((self.node / "cpuacct.usage").read_text()) / 1e9

    def dirs(self) -> list[Path]:
        """``/NAME`` in every hierarchy where it exists."""
        found = [CGROUP_ROOT / self.name] if (CGROUP_ROOT / self.name).is_dir() else []
        if not self.v2:
            for h in sorted(CGROUP_ROOT.iterdir()):
                if h.is_dir() and not h.is_symlink() and (h / self.name).is_dir():
                    found.append(h / self.name)
        return found

    def pids(self) -> list[int]:
        out: set[int] = set()
        for top in self.dirs():
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    out |= {int(p) for p in procs.read_text().split()}
        return sorted(out)

    def remove(self) -> list[str]:
        """Kill what is still in it (by pid), then remove its directories, deepest first."""
        undone: list[str] = []
        for pid in self.pids():
            undone.append(f"process {pid} in cgroup {self.name}")
            signal_pid(pid, signal.SIGKILL)
            wait_gone(pid, 10.0)
        for top in self.dirs():
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
            if top.exists():
                undone.append(f"cgroup {top} could not be removed")
        return undone
