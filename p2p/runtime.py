"""The node's trio loop: one thread that runs the peer network, and the portal other threads call in by.

The device daemon is threaded (FUSE request threads, an I/O pool, background downloads); the peer
network — the peer server, transfers from peers, health checks, DNS — runs on trio in one thread of its
own, under one nursery (`TrioLoop.start` runs the node's ``main`` in it). A worker thread that needs a
peer transfer calls `TrioLoop.call`: trio's thread portal (``trio.from_thread.run``) runs the coroutine in
the loop and hands back its result or exception. The transfer runs in a cancel scope at the read's
deadline (`p2p.deadline`, converted to trio's clock by `trio_deadline`), so when the read's time is up
the transfer is cancelled — its connection closed — rather than left running on a thread.

`stop` cancels the nursery and joins the thread: nothing of the loop outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopNotRunningError(RuntimeError):
    """The trio loop is not running (not started yet, stopped, or it failed)."""


class TrioLoop:
    """A trio loop in a thread (see the module docstring)."""

    def __init__(self, name: str = "p2p") -> None:
        self.name = name
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, main: Callable[[trio.Nursery], Awaitable[None]], timeout: float = 10.0) -> None:
        """Run ``main(nursery)`` in the loop's thread; return once it has started (``main`` must return
        after starting its services as tasks in the nursery) or raise what it raised."""

        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as cancel:
                self._cancel = cancel
                async with trio.open_nursery() as nursery:
                    try:
                        await main(nursery)
                    finally:
                        self._ready.set()

        def thread() -> None:
            try:
                trio.run(run)
            except BaseException as e:  # a service died: report it, and refuse calls from now on
                self._error = e
                log.error("the %s loop failed: %r", self.name, e)
            finally:
                self._token = None
                self._ready.set()

        self._thread = threading.Thread(target=thread, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise LoopNotRunningError(f"the {self.name} loop did not start within {timeout:.0f}s")
        if self._error is not None:
            raise self._error

    @property
    def running(self) -> bool:
        return self._token is not None

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the loop from another thread; its result or its exception."""
        token = self._token
        if token is None:
            raise LoopNotRunningError(f"the {self.name} loop is not running")
        try:
            return trio.from_thread.run(fn, *args, trio_token=token)
        except trio.RunFinishedError:
            raise LoopNotRunningError(f"the {self.name} loop stopped") from None

    def stop(self, timeout: float = 10.0) -> None:
        token, cancel = self._token, self._cancel
        if token is not None and cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(cancel.cancel, trio_token=token)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def trio_deadline(at: float | None) -> float:
    """A `time.monotonic()` deadline (None: none) on trio's clock (``inf``: none). Call it in the loop."""
    if at is None:
        return float("inf")
    return trio.current_time() + (at - time.monotonic())
