"""`fanout.run`: platforms side by side with the outcome of one after another.

The tasks are plain functions synchronised by events (the conversion is not the point here:
`test_convert_parallel` runs real ones); every wait has a timeout, so a broken guarantee fails the test
instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from snapshotter.convert.fanout import Lane, run

WAIT = 10.0


def test_results_come_back_in_plan_order_whatever_order_they_finish_in() -> None:
    second_done = threading.Event()

    def first(lane: Lane) -> str:
        assert second_done.wait(WAIT), "the tasks did not run side by side"
        return "first"

    def second(lane: Lane) -> str:
        second_done.set()
        return "second"

    assert run([first, second], jobs=2) == ["first", "second"]


def test_running_tasks_hold_distinct_slots_below_jobs() -> None:
    barrier = threading.Barrier(3, timeout=WAIT)
    slots: list[int] = []

    def task(lane: Lane) -> None:
        slots.append(lane.slot)
        barrier.wait()  # all three run at once

    run([task, task, task], jobs=3)
    assert sorted(slots) == [0, 1, 2]


def test_one_job_runs_in_the_calling_thread_and_stops_at_the_first_failure() -> None:
    ran: list[tuple[int, threading.Thread]] = []

    def task(i: int) -> Callable[[Lane], int]:
        def body(lane: Lane) -> int:
            ran.append((i, threading.current_thread()))
            if i == 1:
                raise ValueError("platform 1 is bad")
            return i

        return body

    with pytest.raises(ValueError, match="platform 1 is bad"):
        run([task(0), task(1), task(2)], jobs=1)
    assert ran == [(0, threading.current_thread()), (1, threading.current_thread())]


def test_a_failure_stops_the_later_tasks_and_lets_the_earlier_ones_finish() -> None:
    started = threading.Barrier(3, timeout=WAIT)
    seen: dict[str, bool] = {}

    def earlier(lane: Lane) -> str:
        started.wait()
        # Still running when the later task is stopped, and never stopped itself.
        assert later_stopped.wait(WAIT)
        seen["earlier stopped"] = lane.stop.is_set()
        return "done"

    def failing(lane: Lane) -> str:
        started.wait()
        raise ValueError("the bad layer")

    later_stopped = threading.Event()

    def later(lane: Lane) -> str:
        started.wait()
        seen["later stopped"] = lane.stop.wait(WAIT)
        later_stopped.set()
        raise RuntimeError("stopped: never reported")

    with pytest.raises(ValueError, match="the bad layer"):
        run([earlier, failing, later], jobs=3)
    assert seen == {"later stopped": True, "earlier stopped": False}


def test_the_first_failure_in_plan_order_is_raised_even_when_a_later_one_failed_first() -> None:
    later_failed = threading.Event()

    def earlier(lane: Lane) -> None:
        assert later_failed.wait(WAIT)
        time.sleep(0.05)  # the later failure has been seen by now (the result must not depend on it)
        raise ValueError("the earlier platform's error")

    def later(lane: Lane) -> None:
        later_failed.set()
        raise ValueError("the later platform's error")

    with pytest.raises(ValueError, match="the earlier platform's error"):
        run([earlier, later], jobs=2)


def test_a_task_queued_behind_a_failure_never_starts() -> None:
    # Two workers, three tasks: the third waits for a worker, and the one that ran the failing task
    # records the failure (stopping the later ones) before it takes another.
    third: list[bool] = []

    def failing(lane: Lane) -> None:
        raise ValueError("bad")

    def blocked(lane: Lane) -> None:
        assert lane.stop.wait(WAIT)

    def queued(lane: Lane) -> None:
        third.append(lane.stop.wait(WAIT))

    with pytest.raises(ValueError, match="bad"):
        run([failing, blocked, queued], jobs=2)
    assert third == []


def test_an_interrupt_stops_every_task_and_waits_for_their_cleanup(sigint_raises: None) -> None:
    cleaned: list[int] = []
    both_running = threading.Barrier(2, timeout=WAIT)

    def task(i: int) -> Callable[[Lane], None]:
        def body(lane: Lane) -> None:
            both_running.wait()
            if i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: lands in the waiting main thread
            try:
                assert lane.stop.wait(WAIT)
            finally:
                if i == 0:
                    os.kill(os.getpid(), signal.SIGINT)  # a second one, while the tasks unwind
                time.sleep(0.2)  # unmounting, detaching
                cleaned.append(i)

        return body

    with pytest.raises(KeyboardInterrupt):
        run([task(0), task(1)], jobs=2)
    assert sorted(cleaned) == [0, 1], "run returned before every task had cleaned up"


def test_an_interrupt_inside_a_task_stops_the_others_and_is_raised() -> None:
    other_stopped: list[bool] = []

    def interrupted(lane: Lane) -> None:
        raise KeyboardInterrupt

    def other(lane: Lane) -> None:
        other_stopped.append(lane.stop.wait(WAIT))

    with pytest.raises(KeyboardInterrupt):
        run([other, interrupted], jobs=2)
    assert other_stopped == [True]
