"""Fixtures of the layer applier's tests: they need root (chown, mknod), and a fresh root directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .lab import T0


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    # CI runs as root; applying layers needs chown and mknod. Without root: a failure, never a skip.
    if os.geteuid() != 0:
        pytest.fail("applying layers needs root (chown, mknod)")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    os.utime(r, ns=(T0, T0))
    return r
