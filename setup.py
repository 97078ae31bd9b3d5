"""The build records the git commit it was made from (``snapshotter/_commit.txt``), so that
`damselfly --version` names it in a normal install too, where no git checkout is at hand (an
editable install asks git at run time: `snapshotter.version`). Everything else is in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapshotter.version import COMMIT_FILE, git_commit


class BuildPyWithCommit(build_py):
    def run(self) -> None:
        super().run()
        commit = git_commit(Path(__file__).resolve().parent)
        if commit is None or self.editable_mode:
            return  # no checkout to ask; an editable install asks git at run time
        target = Path(self.build_lib, "snapshotter", COMMIT_FILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
