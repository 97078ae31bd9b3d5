"""Independent platforms converted side by side, with the outcome of converting them one by one.

`run(tasks, jobs)` runs `tasks` (one per platform, in plan order) on up to `jobs` threads. Whatever
order they finish in, the outcome is the one a sequential run (``jobs=1``, in the calling thread)
would have, so ``--jobs`` changes how long a conversion takes, not what it publishes nor the error it
fails with:

- **Results** come back in task order.
- **A failure** of task k stops every task after k: a sequential run would never have reached them.
  The tasks before k run to their end, because a sequential run would have finished them before
  starting k — and if one of them fails, its error is the one a sequential run would have raised. So
  the error raised is always that of the first failing task in plan order, the same message whatever
  `jobs` is (and the layers those earlier tasks built are in the layer cache for the next try).
- **An interrupt** (KeyboardInterrupt in the calling thread — Ctrl-C, or SIGTERM through
  `ext4layer.interrupt` — or raised by a task) stops every task, waits for all of them, and is raised
  again. Waiting is not optional: each task unmounts its filesystem and detaches its loop device on its
  way out, and the caller removes the work directory only after that. A second interrupt while they
  unwind is therefore held off (they were told to stop and do so at their next read; SIGKILL remains).

"Stopped" is cooperative: a task gets a `Lane` whose ``stop`` event it checks between steps and at
every read of its input; a task stopped before it started never starts. The lane's ``slot`` is unique
among the tasks running at once (0 to jobs-1): the converter pins each slot's applier to its own CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

T = TypeVar("T")


@dataclass(frozen=True)
class Lane:
    """What a task runs in: its `slot` (0 to jobs-1, unique among running tasks) and its `stop` event."""

    slot: int
    stop: threading.Event


def run(tasks: Sequence[Callable[[Lane], T]], jobs: int) -> list[T]:
    """Run `tasks` on up to `jobs` threads; their results in order, or the first failure in order."""
    if jobs <= 1 or len(tasks) <= 1:
        # In the calling thread, as a sequential conversion always ran: an interrupt lands in the task
        # itself, wherever it is.
        lane = Lane(0, threading.Event())
        return [task(lane) for task in tasks]
    return _Fanout(tasks, jobs).run()


class _Fanout(Generic[T]):
    """`jobs` worker threads taking tasks in order. Every decision — which task is next, which are
    stopped after a failure — is made under one condition by the worker that finished a task, so no
    task starts once it is stopped and the caller only waits for ``running`` to drop to zero.

    Waiting is on that condition, never with ``Thread.join``: a join interrupted by KeyboardInterrupt
    marks a thread that is still running as stopped (CPython's bpo-45274 handling in
    ``_wait_for_tstate_lock``), and every later join of it returns at once."""

    def __init__(self, tasks: Sequence[Callable[[Lane], T]], jobs: int) -> None:
        self.tasks = tasks
        self.jobs = jobs
        self.stops = [threading.Event() for _ in tasks]
        self.results: list[T | None] = [None] * len(tasks)
        self.errors: dict[int, BaseException] = {}
        self.cond = threading.Condition()
        self.next = 0  # the next task to start
        self.running = 0  # tasks started and not ended
        self.first_failed = len(tasks)
        self.interrupt: BaseException | None = None

    def _stop_after(self, index: int) -> None:
        """Stop every task after `index` (-1: all of them). Called under the condition."""
        for event in self.stops[index + 1 :]:
            event.set()

    def _take(self) -> int | None:
        with self.cond:
            while self.next < len(self.tasks) and self.stops[self.next].is_set():
                self.next += 1  # stopped before it started: it never will
            if self.next == len(self.tasks):
                self.cond.notify_all()
                return None
            i, self.next = self.next, self.next + 1
            self.running += 1
            return i

    def _worker(self, slot: int) -> None:
        while (i := self._take()) is not None:
            error: BaseException | None = None
            try:
                result = self.tasks[i](Lane(slot, self.stops[i]))
            except BaseException as e:  # the caller raises it (or the first failure) once all ended
                error = e
            with self.cond:
                self.running -= 1
                if error is None:
                    self.results[i] = result
                else:
                    self.errors[i] = error
                    if not isinstance(error, Exception):  # an interrupt inside a task: all stop
                        self.interrupt = self.interrupt or error
                        self._stop_after(-1)
                    elif i < self.first_failed:
                        self.first_failed = i
                        self._stop_after(i)
                self.cond.notify_all()

    def _ended(self) -> bool:
        return self.next == len(self.tasks) and self.running == 0

    def run(self) -> list[T]:
        try:
            for slot in range(min(self.jobs, len(self.tasks))):
                name = f"damselfly-platform-{slot}"
                threading.Thread(target=self._worker, args=(slot,), name=name, daemon=True).start()
            with self.cond:
                self.cond.wait_for(self._ended)
        except BaseException:
            with self.cond:
                self._stop_after(-1)
            self._wait_out()
            raise
        if self.interrupt is not None:
            raise self.interrupt
        if self.first_failed < len(self.tasks):
            raise self.errors[self.first_failed]
        return [cast(T, r) for r in self.results]

    def _wait_out(self) -> None:
        """Wait until every started task has ended, through further interrupts (module docstring)."""
        while True:
            try:
                with self.cond:
                    self.cond.wait_for(lambda: self.running == 0)
                return
            except KeyboardInterrupt:
                continue
