"""`ext4layer.run_like_every_time`: the applier's thread — its CPU, and how an interrupt waits for it.

Plain functions stand in for applying a tar (real layers: `test_convert`, `test_convert_parallel`)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from snapshotter.convert.ext4layer import run_like_every_time

WAIT = 10.0


def test_the_applier_runs_pinned_to_the_cpu_asked_for() -> None:
    for cpu in sorted(os.sched_getaffinity(0)):
        assert run_like_every_time(lambda: os.sched_getaffinity(0), cpu=cpu) == {cpu}
    assert run_like_every_time(lambda: os.sched_getaffinity(0)) == {min(os.sched_getaffinity(0))}


def test_an_interrupted_applier_is_waited_for_through_a_second_interrupt(sigint_raises: None) -> None:
    # The caller unmounts the filesystem as soon as this returns: the applier must have stopped writing.
    cancel = threading.Event()
    ended: list[float] = []

    def apply() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the layer is applied
        assert cancel.wait(WAIT)  # the applier notices at its next read...
        os.kill(os.getpid(), signal.SIGINT)  # ...while a second Ctrl-C arrives
        time.sleep(0.3)  # and finishes what it was writing
        ended.append(time.monotonic())

    with pytest.raises(KeyboardInterrupt):
        run_like_every_time(apply, cancel)
    assert ended, "returned while the applier was still running"
