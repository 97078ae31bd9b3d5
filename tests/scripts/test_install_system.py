"""``make install-system`` (scripts/install_system.py) into a temporary directory: the installed binary
runs from outside the checkout; the installed unit's ExecStart command line, started as systemd would
start it (no systemd needed), serves containerd's Snapshots API on the configured socket and stops
cleanly on SIGTERM, its device daemon with it; a second run is an upgrade that keeps the operator's
config. Nothing is written to /opt, /etc or /usr: every path is under the test's directory.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from scripts import install_system
from scripts.demolib.procs import alive, left_below, spawn, sweep, wait_gone, wait_ready
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
#: Variables that would point the install or the installed damselfly elsewhere than the test says.
FOREIGN = ("PREFIX", "BINDIR", "UNITDIR", "CONFDIR", "PYTHONPATH", "PIP_ARGS", "DAMSELFLY_STATE_DIR")


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory (the socket path below it must fit in sun_path), swept by exact pid and path."""
    if os.geteuid() != 0:
        pytest.fail("needs root: the installed `damselfly serve` mounts FUSE and loop devices")  # no skip
    d = Path(tempfile.mkdtemp(prefix="dfly-inst-", dir="/tmp"))
    try:
        yield d
    finally:
        sweep(d)  # whatever a failed assertion left: processes naming d, mounts and loop devices below it
        shutil.rmtree(d, ignore_errors=True)


def paths(tmp: Path) -> dict[str, str]:
    return {
        "PREFIX": str(tmp / "opt" / "damselfly"),
        "BINDIR": str(tmp / "usr" / "local" / "bin"),
        "UNITDIR": str(tmp / "etc" / "systemd" / "system"),
        "CONFDIR": str(tmp / "etc" / "damselfly"),
    }


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FOREIGN and not k.startswith("MAKE")}


def install(tmp: Path, ok: bool = True) -> str:
    """``make install-system`` with every path under `tmp`; its output (and its error output)."""
    argv = ["make", "--no-print-directory", "-C", str(REPO), "install-system"]
    argv += [f"{k}={v}" for k, v in paths(tmp).items()]
    proc = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert (proc.returncode == 0) == ok, (
        f"{shlex.join(argv)}: exit {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout + proc.stderr


def installed(tmp: Path, *args: str) -> str:
    """The installed `damselfly` run from `tmp` (not the checkout), with no path to the checkout."""
    binary = Path(paths(tmp)["BINDIR"]) / "damselfly"
    proc = subprocess.run(
        [str(binary), *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp,
        env=clean_env(),
        timeout=60,
    )
    assert proc.returncode == 0, f"{binary} {shlex.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def exec_start(unit: Path) -> list[str]:
    lines = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].removeprefix("ExecStart="))


def serve_answers(sock: Path) -> bool:
    """The socket takes a Snapshots List (a real call, not only a connection)."""
    if not sock.exists():
        return False
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        try:
            stub = pb_grpc.SnapshotsStub(channel)
            list(stub.List(pb.ListSnapshotsRequest(), metadata=[("containerd-namespace", "t")], timeout=2))
            return True
        except grpc.RpcError:
            return False


def test_install_then_unit_command_serves_then_upgrade(tmp: Path) -> None:
    p = {k: Path(v) for k, v in paths(tmp).items()}
    install(tmp)

    # The binary the unit names runs from outside the checkout, from code inside the prefix.
    version = installed(tmp, "--version")
    assert version.startswith("damselfly ") and "(commit unknown)" not in version, version
    python = p["PREFIX"] / "current" / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import snapshotter; print(snapshotter.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=clean_env(),
        check=True,
    ).stdout.strip()
    assert Path(where).resolve().is_relative_to(p["PREFIX"].resolve()), where
    first = (p["PREFIX"] / "current").resolve()

    # The sample config is `damselfly config`'s defaults: read back, it is the same effective config.
    config = p["CONFDIR"] / "config.toml"
    assert installed(tmp, "config", "--config", str(config)) == installed(
        tmp, "config", "--config", "/dev/null"
    )

    # The operator's config: every state path under tmp.
    root, sock, state = tmp / "var" / "root", tmp / "run" / "snapshotter.sock", tmp / "var" / "device"
    ours = f'[snapshotter]\nroot = "{root}"\naddress = "{sock}"\n\n[device]\nstate_dir = "{state}"\n'
    config.write_text(ours)

    # systemd's start of the unit, by hand: its ExecStart command line as the unit has it.
    argv = exec_start(p["UNITDIR"] / "damselfly.service")
    assert argv[0] == str(p["BINDIR"] / "damselfly") and argv[1] == "serve", argv
    assert argv[2:] == ["--config", str(config)], argv
    log = tmp / "serve.log"
    proc = spawn(argv, log, clean_env())
    try:
        why = wait_ready(proc, lambda: serve_answers(sock), 60.0)
        assert why is None, f"{shlex.join(argv)} {why}:\n{log.read_text()}"
        # serve starts the device daemon at once; wait for it so that its stop is checked too.
        pidfile = state / "devd.pid"
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pidfile.exists(), f"no device daemon started:\n{log.read_text()}"
        daemon = int(pidfile.read_text())
        assert alive(daemon)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()
    assert wait_gone(daemon, 30.0), f"device daemon {daemon} outlived an idle serve:\n{log.read_text()}"
    assert not sock.exists()
    assert left_below(tmp) == [], log.read_text()

    # A release that refuses the node's config is not made current, and is not left behind.
    config.write_text(ours.replace("[device]\n", "[device]\nno_such_key = 1\n"))
    refused = install(tmp, ok=False)
    assert "refuses" in refused and "no_such_key" in refused, refused
    assert (p["PREFIX"] / "current").resolve() == first
    assert sorted(r.name for r in (p["PREFIX"] / "releases").iterdir()) == [first.name]

    # An upgrade: the same command again. A new release becomes current; the config stays the operator's.
    config.write_text(ours)
    time.sleep(1.1)  # release names carry the time to the second
    out = install(tmp)
    second = (p["PREFIX"] / "current").resolve()
    assert second != first and second.parent == first.parent, out
    assert first.is_dir(), "the previous release is kept (a running serve or daemon may use it)"
    assert config.read_text() == ours
    assert installed(tmp, "--version") == version
    assert exec_start(p["UNITDIR"] / "damselfly.service") == argv


def test_prune_keeps_current_previous_and_releases_in_use(tmp: Path) -> None:
    layout = install_system.layout_from_env(paths(tmp))
    releases = {}
    for name in ("a", "b", "c", "d", "e"):
        releases[name] = layout.releases / name
        releases[name].mkdir(parents=True)
        if name != "e":  # e: an interrupted build
            (releases[name] / install_system.COMPLETE).write_text("damselfly\n")
    # A process running from release a, as a device daemon started by an older serve would.
    user = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(releases["a"] / "bin" / "python")]
    )
    try:
        install_system.prune(layout, releases["d"], releases["c"])
        assert sorted(p.name for p in layout.releases.iterdir()) == ["a", "c", "d"]
    finally:
        user.kill()
        user.wait()
    install_system.prune(layout, releases["d"], releases["c"])
    assert sorted(p.name for p in layout.releases.iterdir()) == ["c", "d"]


def test_unit_with_default_paths_is_the_template(tmp: Path) -> None:
    """With the default BINDIR and CONFDIR the installed unit is the template byte for byte: its
    ExecStart (/usr/local/bin/damselfly serve) is where install-system puts the link."""
    layout = install_system.Layout(
        prefix=Path("/opt/damselfly"),
        bindir=install_system.DEFAULT_BINDIR,
        unitdir=tmp / "units",
        confdir=install_system.DEFAULT_CONFDIR,
    )
    install_system.install_unit(layout)
    template = install_system.UNIT_TEMPLATE.read_text()
    assert (tmp / "units" / install_system.UNIT_NAME).read_text() == template
    assert f"ExecStart={layout.link} serve\n" in template
