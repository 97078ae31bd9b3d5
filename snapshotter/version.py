"""What this damselfly is: its package version and the git commit it comes from.

`damselfly --version` prints both, `damselfly status` shows them. The commit is found, in order:

1. from git, when the code runs from a checkout (an editable install, ``make install``, or the tree
   itself): ``git rev-parse HEAD`` in the directory above the package, with ``-dirty`` appended when
   tracked files differ from it — so it is always the code that runs, never a stale record;
2. else from ``snapshotter/_commit.txt``, which ``setup.py`` writes into the build when a wheel is
   built from a checkout (``pip install .``, ``make install-system``): a normal install, no git needed;
3. else ``unknown`` (built from a tree without git). Nothing here uses the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import subprocess
from pathlib import Path

DISTRIBUTION = "damselfly"
#: Written by setup.py's build step next to this module (never in the source tree).
COMMIT_FILE = "_commit.txt"
#: Seconds a git command may take (a slow disk; git itself never touches the network here).
GIT_TIMEOUT = 5.0


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_commit(tree: Path) -> str | None:
    """HEAD of the git checkout at `tree` (``-dirty`` if tracked files changed), or None."""
    if not (tree / ".git").exists():  # a directory, or a file in a worktree
        return None
    # safe.directory: root asking about a checkout another user owns (git refuses that otherwise).
    git = ["git", "-c", f"safe.directory={tree}", "-C", str(tree)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=GIT_TIMEOUT, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return head + ("-dirty" if changed else "")


def recorded_commit() -> str | None:
    """The commit setup.py recorded in the installed package, or None."""
    try:
        text = importlib.resources.files("snapshotter").joinpath(COMMIT_FILE).read_text()
    except (OSError, ValueError):
        return None
    return text.strip() or None


def commit() -> str:
    """The commit this code comes from (module docstring), or ``unknown``."""
    return git_commit(Path(__file__).resolve().parent.parent) or recorded_commit() or "unknown"


def describe() -> str:
    """``damselfly 0.1.0 (commit 0123abc...)``: what ``--version`` prints."""
    return f"{DISTRIBUTION} {version()} (commit {commit()})"
