"""`make install-system`: damselfly installed on this machine, from this checkout, for systemd to run.

What it lays down (every path overridable; `docs/operations.md` §1):

    PREFIX   /opt/damselfly               releases/<version>-<commit>-<UTC time>/   one virtualenv each
                                          current -> releases/<the newest complete one>
    BINDIR   /usr/local/bin               damselfly -> PREFIX/current/bin/damselfly
    UNITDIR  /etc/systemd/system          damselfly.service (ExecStart=BINDIR/damselfly serve ...)
    CONFDIR  /etc/damselfly               config.toml, only if there is none: `damselfly config`'s
                                          defaults printed by the release just built (never drifts)

An upgrade is the same command again. A release is a virtualenv built in place (a venv is not
relocatable: its scripts name their interpreter by absolute path), with a non-editable ``pip install``
of the checkout, so the release never reads the checkout again. It is checked (``damselfly --version``),
marked complete (``.complete``, written last), made to read the node's config (a release that refuses it
is removed again and nothing changes), and only then made current: ``current`` and the
``damselfly`` link are swapped with ``rename(2)``, so a reader sees the old release or the new one,
never half of one. A build that fails or is interrupted leaves ``current`` as it was; the next run
removes the incomplete directory.

Processes that run keep their release: a running ``damselfly serve`` and the device daemon it started
(``sys.executable`` is the release's ``bin/python``) go on importing from their own release directory.
Releases are therefore pruned only when nothing runs from them: the current one and the one before it
are always kept, any other is removed unless a live process's command line names it.

Environment: PREFIX, BINDIR, UNITDIR, CONFDIR (defaults above), PYTHON (the interpreter that builds the
venvs, default this one), PIP_ARGS (extra ``pip install`` arguments, split on blanks). Standard library
only: it runs before any damselfly is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
UNIT_TEMPLATE = CHECKOUT / "scripts" / "systemd" / "damselfly.service"
UNIT_NAME = "damselfly.service"
#: What the unit template's ExecStart names, and where systemd looks for units an admin installs.
DEFAULT_BINDIR = Path("/usr/local/bin")
DEFAULT_CONFDIR = Path("/etc/damselfly")
SYSTEMD_UNITDIR = Path("/etc/systemd/system")
#: Marker written last into a release: without it a release is a failed or interrupted build.
COMPLETE = ".complete"


class InstallError(Exception):
    """A step failed; the message says which and what to do. `current` is left as it was."""


@dataclass(frozen=True)
class Layout:
    prefix: Path
    bindir: Path
    unitdir: Path
    confdir: Path

    @property
    def releases(self) -> Path:
        return self.prefix / "releases"

    @property
    def current(self) -> Path:
        return self.prefix / "current"

    @property
    def link(self) -> Path:
        return self.bindir / "damselfly"

    @property
    def config(self) -> Path:
        return self.confdir / "config.toml"


def layout_from_env(env: os._Environ[str] | dict[str, str]) -> Layout:
    def path(name: str, default: str) -> Path:
        value = env.get(name) or default
        p = Path(value)
        if not p.is_absolute():
            raise InstallError(f"{name}={value}: must be an absolute path")
        return p

    return Layout(
        prefix=path("PREFIX", "/opt/damselfly"),
        bindir=path("BINDIR", str(DEFAULT_BINDIR)),
        unitdir=path("UNITDIR", str(SYSTEMD_UNITDIR)),
        confdir=path("CONFDIR", str(DEFAULT_CONFDIR)),
    )


def say(message: str) -> None:
    print(f"install-system: {message}", flush=True)


def run(argv: list[str], what: str) -> str:
    """Run `argv`; its stdout, or `InstallError` naming `what` with the command's own output."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        raise InstallError(f"{what} failed ({shlex.join(argv)}, exit {proc.returncode}):\n{out}")
    return proc.stdout


def release_name() -> str:
    """``<version>-<commit, 12 hex>[-dirty]-<UTC time>``: sortable by time within a version, unique."""
    with open(CHECKOUT / "pyproject.toml", "rb") as f:
        version = str(tomllib.load(f)["project"]["version"])
    sys.path.insert(0, str(CHECKOUT))
    try:  # the checkout's own module (stdlib only, like this script): setup.py records the same commit
        versions = importlib.import_module("snapshotter.version")
    finally:
        sys.path.pop(0)
    commit = versions.git_commit(CHECKOUT) or "unknown"
    short = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{version}-{short}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"


def symlink_atomic(target: str | Path, link: Path) -> None:
    """`link` -> `target`, replacing what `link` was in one rename (readers never see it missing)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_release(layout: Layout, python: str, pip_args: list[str]) -> Path:
    """A new, complete release under `layout.releases` (not yet current)."""
    layout.releases.mkdir(parents=True, exist_ok=True, mode=0o755)
    release = layout.releases / release_name()
    say(f"building {release}")
    try:
        run(
            [python, "-m", "venv", str(release)],
            "creating the virtualenv (Debian: apt-get install python3-venv)",
        )
        pip = [str(release / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        # Non-editable: the release holds its own copy of the code and never reads the checkout again.
        # setuptools builds in the checkout's build/ and packs whatever build/lib holds: a module deleted
        # since an earlier build would ship again. So build/ (ignored by git, `make clean` removes it)
        # is removed before and after.
        shutil.rmtree(CHECKOUT / "build", ignore_errors=True)
        try:
            run([*pip, "install", "-q", *pip_args, str(CHECKOUT)], f"pip install of {CHECKOUT}")
        finally:
            shutil.rmtree(CHECKOUT / "build", ignore_errors=True)
        described = run([str(release / "bin" / "damselfly"), "--version"], "the new release's --version")
        write_atomic(release / COMPLETE, described, 0o644)
    except BaseException:
        shutil.rmtree(release, ignore_errors=True)
        raise
    say(f"built {described.strip()}")
    return release


def in_use(directory: Path) -> list[int]:
    """Pids of live processes whose command line names a path at or below `directory`."""
    top = str(directory).encode()
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if any(a == top or a.startswith(top + b"/") for a in args):
            pids.append(int(entry.name))
    return pids


def prune(layout: Layout, current: Path, previous: Path | None) -> None:
    """Remove incomplete releases, and complete ones other than `current` and `previous` that no live
    process runs from."""
    keep = {current.name} | ({previous.name} if previous is not None else set())
    for release in sorted(layout.releases.iterdir()):
        if release.name in keep or not release.is_dir():
            continue
        complete = (release / COMPLETE).exists()
        users = in_use(release)
        if users:
            say(f"keeping {release}: in use by pid {', '.join(map(str, users))}")
            continue
        say(f"removing {'incomplete ' if not complete else ''}release {release}")
        shutil.rmtree(release, ignore_errors=True)


def install_unit(layout: Layout) -> None:
    """The unit template with ExecStart naming this install's binary (and config, when not the
    default one `damselfly serve` reads by itself)."""
    command = f"{layout.link} serve"
    if layout.config != DEFAULT_CONFDIR / "config.toml":
        command += f" --config {layout.config}"
    text, n = re.subn(r"(?m)^ExecStart=.*$", f"ExecStart={command}", UNIT_TEMPLATE.read_text())
    if n != 1:
        raise InstallError(f"{UNIT_TEMPLATE}: expected one ExecStart= line, found {n}")
    layout.unitdir.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(layout.unitdir / UNIT_NAME, text, 0o644)
    say(f"installed {layout.unitdir / UNIT_NAME} (ExecStart={command})")
    if layout.unitdir == SYSTEMD_UNITDIR and Path("/run/systemd/system").is_dir():
        run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        say("systemctl daemon-reload done")


def check_config(layout: Layout, release: Path) -> None:
    """Refuse to make `release` current if it refuses the node's config (a key it does not know, a
    value of the wrong type): the next start of `damselfly serve` would fail."""
    if not layout.config.exists():
        return
    try:
        run([str(release / "bin" / "damselfly"), "config", "--config", str(layout.config)], "checking")
    except InstallError as e:
        raise InstallError(
            f"the new release refuses {layout.config}; fix it (or move it away for a fresh sample) and "
            f"run again. Nothing was changed: {layout.current} still names the running release.\n{e}"
        ) from e


def install_config(layout: Layout, release: Path) -> None:
    """`damselfly config`'s defaults as the sample config, only where there is no config yet."""
    if layout.config.exists():
        say(f"kept {layout.config} (check it with: {layout.link} config --config {layout.config})")
        return
    # --config /dev/null: the built-in defaults, whatever config the machine already has elsewhere.
    defaults = run(
        [str(release / "bin" / "damselfly"), "config", "--config", "/dev/null"], "damselfly config"
    )
    header = (
        "# damselfly's configuration: every key at its default, as `damselfly config` printed them\n"
        "# at install time. Edit what you need; `damselfly config` checks the file and prints the\n"
        "# effective one (docs/operations.md, README's Configuration table).\n"
    )
    layout.confdir.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_atomic(layout.config, header + defaults, 0o644)
    say(f"wrote {layout.config}")


def install(layout: Layout, python: str, pip_args: list[str]) -> Path:
    previous = layout.current.resolve() if layout.current.is_symlink() else None
    release = build_release(layout, python, pip_args)
    try:
        check_config(layout, release)
    except InstallError:
        shutil.rmtree(release, ignore_errors=True)
        raise
    # The relative target keeps the prefix movable as a whole (a bind mount, a container image).
    symlink_atomic(Path("releases") / release.name, layout.current)
    layout.bindir.mkdir(parents=True, exist_ok=True, mode=0o755)
    symlink_atomic(layout.current / "bin" / "damselfly", layout.link)
    say(f"{layout.current} -> {release}; {layout.link} -> {layout.current / 'bin' / 'damselfly'}")
    install_unit(layout)
    install_config(layout, release)
    prune(layout, release, previous)
    if previous is not None:
        say(
            "upgrade installed; a running `damselfly serve` keeps its release until it restarts:"
            " systemctl restart damselfly (containers keep running; docs/operations.md §2)"
        )
    else:
        say("installed; next: systemctl enable --now damselfly (docs/operations.md)")
    return release


def main() -> int:
    try:
        layout = layout_from_env(os.environ)
        python = os.environ.get("PYTHON") or sys.executable
        install(layout, python, os.environ.get("PIP_ARGS", "").split())
    except InstallError as e:
        print(f"install-system: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        hint = "run as root, or set PREFIX, BINDIR, UNITDIR, CONFDIR"
        print(f"install-system: {e} ({hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
