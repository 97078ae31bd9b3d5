"""Fixtures for end-to-end tests with a real containerd and a real registry on loopback.

- `registry` (module, tests/conftest.py): a docker-registry without auth; `repo`: a repository name
  unique to the test.
- `containerd` (module): a private containerd with no proxy plugins (overlayfs, runc).
- `make_containerd` (test): ``make_containerd(proxy_plugins={"damselfly": "/x/snapshotter.sock"})``
  starts another one (``start=False``: made, its address known, started by the test); all are stopped
  at the end of the test.

Whatever a test leaves behind (containers, shims, mounts) is removed at teardown, and reported as a
warning; anything that teardown could not remove fails the test, and the session's last teardown
checks that no instance left a mount, a directory or a process.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .containerd import LEDGER, Containerd

ContainerdFactory = Callable[..., Containerd]


def _require_root() -> None:
    if os.geteuid() != 0:
        # CI runs as root; containerd needs it for mounts and runc. A failure, never a skip.
        pytest.fail("needs root: containerd mounts snapshots and runs containers")


def _stop(c: Containerd) -> None:
    forced = c.stop()
    if forced:
        warnings.warn(f"containerd {c.dir}: teardown had to clean up: {forced}", stacklevel=1)
    leaks = c.leaks()
    assert not leaks, f"containerd {c.dir} left: {leaks}"


@pytest.fixture(scope="session", autouse=True)
def _no_containerd_leaks() -> Iterator[None]:
    yield
    leaks = LEDGER.leaks()
    assert not leaks, f"containerd instances left behind: {leaks}"


_counter = itertools.count()


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to the test."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    return f"e2e/{name}-{os.getpid()}-{next(_counter)}"


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    """A private containerd (overlayfs, runc), shared by the tests of a module."""
    _require_root()
    c = Containerd()
    try:
        c.start()
        yield c
    finally:
        _stop(c)


@pytest.fixture
def make_containerd() -> Iterator[ContainerdFactory]:
    """``make_containerd(proxy_plugins=..., namespace=...)``: start a private containerd for this test."""
    _require_root()
    made: list[Containerd] = []

    def factory(*, start: bool = True, **kwargs: Any) -> Containerd:
        c = Containerd(**kwargs)
        made.append(c)
        return c.start() if start else c

    yield factory
    errors = []
    for c in reversed(made):
        try:
            _stop(c)
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, errors
