"""`damselfly --version`: the package version and the git commit, from a checkout (editable install) and
from a normal install (the commit recorded in the wheel at build time)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from snapshotter.version import COMMIT_FILE, git_commit, version

REPO = Path(__file__).resolve().parents[2]
DAMSELFLY = Path(sys.executable).with_name("damselfly")


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", "-c", f"safe.directory={cwd}", "-C", str(cwd), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_version_of_the_editable_install_names_the_checkouts_commit() -> None:
    out = subprocess.run([str(DAMSELFLY), "--version"], capture_output=True, text=True, check=True).stdout
    head = _git("rev-parse", "HEAD")
    assert out.startswith(f"damselfly {version()} (commit {head}"), out
    assert out.rstrip().endswith(")"), out
    assert version() != "unknown"


def test_a_change_to_a_tracked_file_marks_the_commit_dirty(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f").write_text("1\n")
    subprocess.run(["git", "-C", str(repo), "add", "f"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "one"], check=True, env=env)
    head = _git("rev-parse", "HEAD", cwd=repo)
    assert git_commit(repo) == head
    (repo / "untracked").write_text("not ours\n")
    assert git_commit(repo) == head
    (repo / "f").write_text("2\n")
    assert git_commit(repo) == head + "-dirty"
    assert git_commit(tmp_path) is None  # not a checkout


@pytest.mark.slow
def test_a_normal_install_reports_the_commit_recorded_at_build_time(tmp_path: Path) -> None:
    """Built into a wheel from a clone of this checkout's HEAD (the build writes into its tree) and
    installed elsewhere: no .git next to the installed package."""
    src, wheels, target = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    head = _git("rev-parse", "HEAD")
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(src)], check=True)
    _git("checkout", "-q", head, cwd=src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("damselfly-*.whl")
    with zipfile.ZipFile(wheel) as z:
        recorded = z.read(f"snapshotter/{COMMIT_FILE}").decode().strip()
    assert recorded == head
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import snapshotter.version as v, sys; print(v.__file__); print(v.describe())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith(str(target)), out
    assert out[1] == f"damselfly {version()} (commit {recorded})", out
