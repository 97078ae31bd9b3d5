"""The one client of the device daemon: start it, stop it, and talk to it, typed.

Three users, one way:

- `damselfly serve` (`supervisor.DeviceDaemon`): started on demand, detached in its own session so it
  outlives the service, watched;
- the device commands (`damselfly mount`, `attach`, `commit`, ...): started on demand, detached;
- `damselfly convert`: a private daemon in its work directory, stopped when the conversion ends.

The daemon gets its settings as JSON objects (`config.DeviceSection.to_json`, and the ``[p2p]`` and
``[registry]`` tables' `to_json`); requests go over the
control socket (`control`), and a refusal comes back as the exception the daemon raised, with its
fields (`control.WIRE_ERRORS`), so exit codes hold across the socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blockformat.chunkfile import BlobInfo
from blockformat.durable import private_dir
from p2p.hosts import RegistrySettings
from p2p.manifest import Manifest, Platform, Resolved, parse_manifest, variant_problem
from p2p.settings import P2PSettings

from ..config import DeviceSection
from ..errors import ControlError, DeviceError
from ..host.mountinfo import find_mount
from ..host.syscalls import MNT_DETACH, unmount_path
from . import control
from .paths import Paths

if TYPE_CHECKING:
    from .manager import DeviceSpec
    from .prefetch import PrefetchRequest

log = logging.getLogger(__name__)

#: How long a daemon we started may take to answer.
START_TIMEOUT = 30.0
#: How long `DaemonProcess.stop` waits after each step (ask, SIGTERM, SIGKILL).
STOP_WAIT = 30.0
#: Control requests that may take long (a commit of a big upper) wait up to this.
LONG_CALL = 3600.0


class DaemonProcess:
    """A device daemon this process started, known by its pid."""

    def __init__(self, proc: subprocess.Popen[bytes], paths: Paths, log_path: str) -> None:
        self.proc = proc
        self.paths = paths
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, wait: float = STOP_WAIT) -> None:
        """End it — the shutdown request, then SIGTERM, then SIGKILL, by pid — and remove the FUSE
        mount a killed daemon leaves behind (by its exact path)."""
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(ControlError):
                control.call(self.paths.socket, {"op": "shutdown"}, timeout=5)
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    log.warning("device daemon %d did not stop; sending %s", proc.pid, sig.name)
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if find_mount(self.paths.mountpoint) is not None:
            unmount_path(self.paths.mountpoint, MNT_DETACH)


class DeviceClient:
    """The device daemon of one state directory, as its users see it."""

    def __init__(
        self,
        state_dir: str,
        settings: DeviceSection | None = None,
        p2p: P2PSettings | None = None,
        plain_http: bool = False,
        registry: RegistrySettings | None = None,
        log_format: str = "text",
    ) -> None:
        self.paths = Paths(state_dir)
        self.p2p = p2p
        self.plain_http = plain_http
        self.registry = registry  # None: the daemon's defaults (containerd's /etc/containerd/certs.d)
        self.log_format = log_format
        self.settings = settings or DeviceSection(state_dir=state_dir)

    # -- talking -----------------------------------------------------------------------------------

    def call(self, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
        """One control request; the daemon's refusal is raised as its own exception."""
        return control.call(self.paths.socket, request, timeout=timeout)

    def ping(self, timeout: float = 5.0) -> int | None:
        """The pid of the daemon that answers, or None."""
        try:
            return int(self.call({"op": "ping"}, timeout=timeout)["pid"])
        except (ControlError, KeyError, TypeError, ValueError):
            return None

    def peer_network(self) -> bool:
        """Whether a daemon answers here and runs the peer network."""
        try:
            return bool(self.call({"op": "ping"}, timeout=5.0).get("p2p"))
        except ControlError:
            return False

    def document(
        self, registry: str, repository: str, digest: str, size: int, plain_http: bool | None
    ) -> bytes:
        """A small whole blob (an image config) through the node's peer network, verified."""
        request = {
            "op": "document",
            "registry": registry,
            "repository": repository,
            "digest": digest,
            "size": size,
            "plain_http": plain_http,
        }
        path = str(self.call(request, timeout=LONG_CALL)["path"])
        with open(path, "rb") as f:
            data = f.read(size + 1)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DeviceError(f"the node's copy of {digest} at {path} is not that blob")
        return data

    def give_credentials(self, entries: list[dict[str, str]]) -> int:
        """Hand the daemon credentials per repository (`p2p.keychain.entry_to_json`), kept in its memory
        only; how many entries changed. The control socket is root's alone (0600)."""
        return int(self.call({"op": "credentials", "entries": entries})["changed"])

    def resolve(self, reference: str, platform: Platform, plain_http: bool | None) -> Resolved:
        """`reference` resolved by the daemon's registry client (its connections are warm, its imports
        done): the manifest for `platform`, checked again here (`Resolved.from_json`)."""
        request = {"op": "resolve", "reference": reference, "platform": str(platform)}
        reply = self.call({**request, "plain_http": plain_http}, timeout=LONG_CALL)["resolved"]
        return Resolved.from_json(reply, platform, reference)

    def variant(self, reference: str, subject: str, plain_http: bool | None) -> Manifest | None:
        """The converted variant of manifest `subject` in `reference`'s repository, found by the daemon
        among the subject's referrers; parsed and checked again here (its digest is its bytes', its
        subject and kind). None: there is none."""
        request = {"op": "variant", "reference": reference, "subject": subject, "plain_http": plain_http}
        reply = self.call(request, timeout=LONG_CALL)["variant"]
        if reply is None:
            return None
        where = f"variant of {reference}@{subject}"
        try:
            doc = parse_manifest(str(reply["manifest"]).encode(), str(reply["media_type"]), where)
        except (KeyError, TypeError, UnicodeError) as e:
            raise DeviceError(f"the device daemon sent a malformed {where}: {e}") from None
        if not isinstance(doc, Manifest) or doc.subject is None or doc.subject.digest != subject:
            raise DeviceError(f"the device daemon's {where} does not refer to {subject}")
        why = variant_problem(doc)
        if why:
            raise DeviceError(f"the device daemon's {where} is not a damselfly image: {why}")
        return doc

    def attach(self, spec: DeviceSpec, prefetch: PrefetchRequest | None = None) -> str:
        """Attach (idempotent for the same spec); the path of the device file. With `prefetch`, the
        image's trace is replayed (`snapshotter.device.prefetch`)."""
        request: dict[str, Any] = {"op": "attach", "spec": spec.to_json()}
        if prefetch is not None:
            request["prefetch"] = prefetch.to_json()
        return str(self.call(request)["path"])

    def record(self, name: str, seconds: float) -> None:
        """Record the reads of device `name` (attached now or later) for `seconds`."""
        self.call({"op": "record", "name": name, "seconds": seconds})

    def record_stop(self, name: str) -> tuple[bytes, int]:
        """End the recording of `name`: the trace (`blockformat.trace` JSON) and the number of reads."""
        reply = self.call({"op": "record-stop", "name": name})
        return str(reply["trace"]).encode(), int(reply["reads"])

    def detach(self, name: str, timeout: float = 120.0) -> None:
        """Detach device `name` (idempotent)."""
        self.call({"op": "detach", "name": name}, timeout=timeout)

    def commit(
        self, name: str, out: str, codec: str = "lz4", chunk_size: int = 65536, level: int | None = None
    ) -> BlobInfo:
        """Seal the writable upper of `name` into the layer blob `out` (atomically)."""
        request: dict[str, Any] = {
            "op": "commit",
            "name": name,
            "out": os.path.abspath(out),
            "codec": codec,
            "chunk_size": chunk_size,
        }
        if level is not None:
            request["level"] = level
        return BlobInfo(**self.call(request, timeout=LONG_CALL)["info"])

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.call({"op": "status"})["status"]
        return status

    def devices(self) -> set[str]:
        return set(self.status().get("devices", {}))

    def device_path(self, name: str) -> str:
        return os.path.join(self.paths.mountpoint, name)

    # -- the process -------------------------------------------------------------------------------

    def start(self, *, verbose: bool = True) -> DaemonProcess:
        """Start a daemon on this state directory in its own session and wait until it answers.

        Its own session: a Ctrl-C of the caller does not reach it (the caller stops it, or it outlives
        the caller by design). Raises `DeviceError` naming its log if it exits or does not answer."""
        state = private_dir(self.paths.state)  # its log must not be readable before the daemon starts
        argv = [sys.executable, "-m", "snapshotter.cli", "device-daemon", "--state-dir", state]
        argv += ["--settings", self.settings.to_json()] + (["-v"] if verbose else [])
        if self.p2p is not None and self.p2p.enabled:
            argv += ["--p2p", self.p2p.to_json()]
        if self.plain_http:
            argv.append("--plain-http")
        if self.registry is not None:
            argv += ["--registry", self.registry.to_json()]
        if self.log_format != "text":
            argv += ["--log-format", self.log_format]
        log_path = os.path.join(state, "devd.log")
        # Not systemd's to hear from: the unit's main process (`serve`) reports readiness alone.
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        started = DaemonProcess(proc, self.paths, log_path)
        log.info("started the device daemon (pid %d, state %s)", proc.pid, state)
        try:
            self._wait_answer(started)
        except BaseException:
            started.stop(wait=5.0)
            raise
        return started

    def _wait_answer(self, started: DaemonProcess) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while self.ping(timeout=2.0) != started.pid:
            if started.proc.poll() is not None:
                raise DeviceError(
                    f"the device daemon exited at start with status {started.proc.returncode}: "
                    f"{started.log_tail()}; see {started.log_path}"
                )
            if time.monotonic() > deadline:
                raise DeviceError(
                    f"the device daemon (pid {started.pid}) did not answer on {self.paths.socket} within "
                    f"{START_TIMEOUT:.0f}s; see {started.log_path}"
                )
            time.sleep(0.05)

    def running_pid(self) -> int | None:
        """The pid in the pid file when that process is alive and is a device daemon."""
        try:
            with open(self.paths.pidfile) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return None
        return pid if b"device-daemon" in cmdline else None

    def ensure(self) -> int:
        """The pid of the daemon that answers, starting one first if none does. A daemon that is alive
        but not answering yet (starting, very busy) is waited for: a second one would mount its FUSE
        filesystem over the first one's."""
        pid = self.ping()
        if pid is not None:
            return pid
        with self._starting():
            return self._ensure()

    @contextlib.contextmanager
    def _starting(self) -> Iterator[None]:
        """Hold the state directory's start lock: another process (a second `serve`, `record-trace`)
        checking for a daemon at the same moment waits, then finds ours answering."""
        private_dir(self.paths.state)
        fd = os.open(self.paths.start_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + START_TIMEOUT + 10.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise DeviceError(
                            f"another process has been starting the device daemon in {self.paths.state} "
                            f"for over {START_TIMEOUT + 10.0:.0f}s"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _ensure(self) -> int:
        pid = self.ping()
        if pid is not None:
            return pid
        busy = self.running_pid()
        if busy is not None:
            deadline = time.monotonic() + START_TIMEOUT
            while os.path.exists(f"/proc/{busy}") and time.monotonic() < deadline:
                pid = self.ping(timeout=2.0)
                if pid is not None:
                    return pid
                time.sleep(0.05)
        self.remove_dead()
        started = self.start()
        # Reap it in the background should it ever exit while we run (no zombie).
        threading.Thread(target=started.proc.wait, name="devd-reaper", daemon=True).start()
        return started.pid

    def shutdown(self, timeout: float = 30.0) -> int | None:
        """Ask the daemon to stop and wait until its process is gone; its pid, or None if none ran."""
        pid = self.ping()
        if pid is None:
            return None
        with contextlib.suppress(ControlError):
            self.call({"op": "shutdown"})
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise DeviceError(f"the device daemon (pid {pid}) did not exit within {timeout:.0f}s")
            time.sleep(0.05)
        return pid

    def remove_dead(self) -> bool:
        """Remove the FUSE mount, socket and pid file of a daemon that is gone (its pid file names no
        live device daemon); True if there was something to remove. Its devices are gone with it."""
        if self.running_pid() is not None:
            return False
        stale = [p for p in (self.paths.socket, self.paths.pidfile) if os.path.lexists(p)]
        mounted = find_mount(self.paths.mountpoint) is not None
        if mounted:
            unmount_path(self.paths.mountpoint, MNT_DETACH)
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if mounted or stale:
            log.warning("removed what a dead device daemon left in %s", self.paths.state)
        return mounted or bool(stale)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: it exited, its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


@contextlib.contextmanager
def private_daemon(state_dir: str, settings: DeviceSection | None = None) -> Iterator[DeviceClient]:
    """A daemon of the caller's own in `state_dir`, stopped (by pid) when the block ends."""
    client = DeviceClient(state_dir, settings)
    started = client.start()
    try:
        yield client
    finally:
        started.stop()
