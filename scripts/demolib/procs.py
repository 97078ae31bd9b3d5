"""Processes, mounts, loop devices and a cgroup, found and undone by exact pid and path.

Everything the demo starts lives below its run directory (sockets, state, roots) or names it on its
command line, so "what is left" is a question about that one path: processes whose argv mentions it,
mounts at or below it, loop devices whose backing file is below it. `sweep` answers it and undoes
what it finds, deepest mounts first, by exact mount point and pid (never by process name).

`NodeCgroup` is the cgroup the demo puts the node's processes in (containerd and its shims,
`damselfly serve` and its device daemon, ``ctr`` and ``damselfly rpull``): their CPU time is read from
it (cgroup v2 ``cpu.stat``, or v1 ``cpuacct.usage``), and containers go in a sibling branch so the
node's figure does not include the workload.

`Service` is what the registry, containerd and `damselfly serve` of the demo share: a directory, a
config file, a log, a process started with `spawn` and awaited with `wait_ready`, stopped by pid. The
tests use the same functions (``from scripts.demolib.procs import ...``) for their own processes and
leak checks (`left_below`, `mount_points`, `attached_loops`, `processes`). None of it calls
damselfly's own code, so a bug there cannot hide a leak.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def spawn(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` with stdin from /dev/null and stdout and stderr appended to `log`, in a session of
    its own: a Ctrl-C of ours reaches it only through its owner's ``stop`` (by pid), in order."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )


def wait_ready(
    proc: subprocess.Popen[bytes], answers: Callable[[], bool], timeout: float, interval: float = 0.05
) -> str | None:
    """Poll `answers` while `proc` runs: None once it answered, else why not (for an error message)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return f"exited with status {proc.returncode} at start"
        if answers():
            return None
        if time.monotonic() > deadline:
            return f"did not answer within {timeout:.0f}s"
        time.sleep(interval)


def log_tail(path: Path, size: int = 6000) -> str:
    """The last `size` bytes of a log ("" if there is none)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Service:
    """A long-running process of ours (a registry, containerd, `damselfly serve`): its directory, the
    config file there, its log, and its `subprocess.Popen` while it runs. `launch` starts it and waits
    until it answers; `halt` stops it by pid."""

    config_name = "config"

    def __init__(self, directory: Path, log: Path) -> None:
        self.dir = directory
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def config_path(self) -> Path:
        return self.dir / self.config_name

    def log_tail(self) -> str:
        return log_tail(self.log)

    def launch(
        self,
        argv: Sequence[str],
        answers: Callable[[], bool],
        timeout: float,
        env: Mapping[str, str] | None = None,
        interval: float = 0.05,
    ) -> str | None:
        """`spawn` `argv`, then `wait_ready`: None once it answers, else why not (it may still run)."""
        self.proc = spawn(argv, self.log, env)
        return wait_ready(self.proc, answers, timeout, interval)

    def halt(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> str | None:
        """Stop the process (`sig`, then SIGKILL after `timeout` seconds); a note if SIGKILL was needed."""
        proc, self.proc = self.proc, None
        return stop_popen(proc, sig, timeout) if proc is not None else None


# -- mounts and loop devices ----------------------------------------------------------------------


def _unescape(raw: bytes) -> str:
    """Undo mountinfo's octal escapes (the kernel writes space, tab, newline and backslash as \\ooo)."""
    out = bytearray()
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
    """Mount points from /proc/self/mountinfo (escapes decoded, any bytes kept), in mount order."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [_unescape(line.split(b" ")[4]) for line in f.read().splitlines() if line.strip()]


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


def attached_loops() -> dict[str, str]:
    """/dev/loopN -> backing file, for every attached loop device."""
    out = {}
    for loop in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (loop / "loop" / "backing_file").read_text().strip()
        except OSError:  # not attached, or being detached right now
            continue
        out[f"/dev/{loop.name}"] = backing.removesuffix(" (deleted)")
    return out


def loops_below(path: str | os.PathLike[str]) -> list[str]:
    """Loop devices whose backing file is below `path` (device numbers are shared with the whole
    host: only the backing file says a device is ours)."""
    top = os.path.realpath(path) + os.sep
    return [dev for dev, backing in attached_loops().items() if backing.startswith(top)]


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


def left_below(*paths: str | os.PathLike[str]) -> list[str]:
    """What is still there of `paths`, for a leak check: mounts at or below them, loop devices over
    files below them, live processes whose argv names them."""
    found: list[str] = []
    for path in paths:
        found += [f"mount {mp}" for mp in mounts_below(path)]
        found += [f"loop device {dev}" for dev in loops_below(path)]
        found += [f"process {pid}: {' '.join(argv)}" for pid, argv in processes_naming(path)]
    return found


def stop_all(steps: Sequence[tuple[str, Callable[[], list[str]]]]) -> list[str]:
    """Run every ``(what, stop)`` step in order, past failures (everything else must still be undone);
    what they had to undo, less what a clean stop of `damselfly serve` does anyway (its chain mounts,
    loop devices and device daemon outlive it on purpose), and each failure."""
    undone: list[str] = []
    for what, stop in steps:
        try:
            notes = stop()
        except Exception as e:
            undone.append(f"{what}: {e}")
            continue
        undone += [n for n in notes if not n.startswith(("umount", "losetup", "device daemon"))]
    return undone


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


def cgroup_dirs(name: str) -> list[Path]:
    """Where the cgroup ``/name`` exists: the unified root (v2), or every v1 hierarchy (a cgroup runc
    makes for a container exists in each of them)."""
    found = [CGROUP_ROOT / name] if (CGROUP_ROOT / name).is_dir() else []
    if not cgroup_v2():
        for h in sorted(CGROUP_ROOT.iterdir()):
            if h.is_dir() and not h.is_symlink() and (h / name).is_dir():
                found.append(h / name)
    return found


def remove_empty_cgroups(name: str) -> None:
    """rmdir ``/name`` wherever it exists; one still in use stays (rmdir fails on a busy cgroup)."""
    for d in cgroup_dirs(name):
        with contextlib.suppress(OSError):
            d.rmdir()


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
        return cgroup_dirs(self.name)

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
