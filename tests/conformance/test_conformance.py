"""containerd's own snapshotter conformance suite (snapshots/testsuite of containerd 1.6.20) against
`damselfly serve`, through containerd's proxy client: builds `conformance_test.go` in GOPATH mode
against Debian's containerd Go source (no module downloads), starts the service on a temporary root
and socket, runs the suite and requires every test to pass (the suite's own `Rename` skips itself on
overlay, as it does for containerd's overlayfs snapshotter)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from tests.snapshotter.serving import mounts_under, serving

HERE = Path(__file__).parent
GOPATH = Path("/usr/share/gocode")
CONTAINERD_SRC = GOPATH / "src/github.com/containerd/containerd/snapshots/testsuite"

#: The suite's tests in containerd 1.6.20, and the ones it skips itself on overlayfs.
SUITE_TESTS = 21
SELF_SKIPPED = {"Rename"}

_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): TestSnapshotterSuite/(\S+)", re.MULTILINE)


def go_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GO111MODULE="off",  # GOPATH mode: imports come from /usr/share/gocode only
        GOPATH=str(GOPATH),
        GOCACHE=str(tmp / "gocache"),
        GOPROXY="off",  # never download
        GOFLAGS="",
    )
    return env


@pytest.mark.slow
def test_containerd_snapshotter_suite_passes(tmp_path: Path) -> None:
    go = shutil.which("go")
    assert go is not None, "go is missing: apt-get install golang-go golang-github-containerd-containerd-dev"
    assert CONTAINERD_SRC.is_dir(), (
        f"{CONTAINERD_SRC} is missing: apt-get install golang-github-containerd-containerd-dev"
    )
    binary = tmp_path / "conformance.test"
    t0 = time.monotonic()
    build = subprocess.run(
        [go, "test", "-c", "-o", str(binary), "."],
        cwd=HERE,
        env=go_env(tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    built = time.monotonic() - t0
    assert build.returncode == 0, f"go test -c failed:\n{build.stdout}{build.stderr}"
    shutil.rmtree(tmp_path / "gocache")

    with serving(tmp_path) as served:
        t1 = time.monotonic()
        run = subprocess.run(
            [str(binary), "-test.v", "-test.timeout", "15m", "-damselfly.address", str(served.socket)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
            timeout=1200,
        )
        ran = time.monotonic() - t1
        output = run.stdout + run.stderr
        results = {name: status for status, name in _RESULT.findall(output)}
        counts = {s: sum(1 for v in results.values() if v == s) for s in ("PASS", "FAIL", "SKIP")}
        summary = (
            f"containerd snapshotter suite: {counts['PASS']} passed, {counts['FAIL']} failed, "
            f"{counts['SKIP']} skipped by the suite of {len(results)} (build {built:.0f} s, run {ran:.0f} s)"
        )
        print(summary)
        failed = sorted(n for n, s in results.items() if s == "FAIL")
        assert not failed, f"{summary}; failed: {failed}\n{output[-20000:]}"
        assert run.returncode == 0, f"{summary}\n{output[-20000:]}"
        assert len(results) == SUITE_TESTS, f"{summary}: expected {SUITE_TESTS} tests\n{output[-5000:]}"
        skipped = {n for n, s in results.items() if s == "SKIP"}
        assert skipped == SELF_SKIPPED, f"{summary}; unexpected skips: {skipped - SELF_SKIPPED}"

        # The harness removed what each test made; nothing is left in the service or on disk.
        left = [i.name for r in served.stub.List(pb.ListSnapshotsRequest()) for i in r.info]
        assert left == []
        assert sorted(os.listdir(served.root / "snapshots")) == []
    assert mounts_under(tmp_path) == []
