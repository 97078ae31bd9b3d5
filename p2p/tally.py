"""Where the bytes a thread waited for came from: a per-thread tally of fetched bytes by source.

A device read that has to wait for the network wants to say where its bytes came from (the ``source``
of ``damselfly_read_bytes_total``: `snapshotter.device.metrics`). It opens a `watch` around the read;
every byte a transport delivers on that thread (`add`, called by `p2p.treesource.TreeSource`) counts in
it. A read that instead waits for another thread's fetch of the same units (`p2p.flights`) adds that
fetch's own tally (`add_all`), which the fetching thread kept in a watch of its own. Watches nest: a
fetch's watch inside a read's counts into both.

Nothing is counted on a thread without a watch (the background download's fetches count in the
watches of their flights only), and nothing here takes a lock: a watch belongs to its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

_local = threading.local()


class watch:  # noqa: N801 - used like a function: ``with tally.watch() as fetched:``
    """Count the bytes fetched on this thread while the body runs: `counts` (source -> bytes)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __enter__(self) -> dict[str, int]:
        stack: list[dict[str, int]] | None = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self.counts)
        return self.counts

    def __exit__(self, *exc: object) -> None:
        _local.stack.pop()


def add(source: str, n: int) -> None:
    """`n` bytes from `source` (``registry``, ``peer``) arrived on this thread."""
    for counts in getattr(_local, "stack", ()):
        counts[source] = counts.get(source, 0) + n


def add_all(fetched: Mapping[str, int]) -> None:
    """This thread waited for a fetch whose tally is `fetched`."""
    for source, n in fetched.items():
        add(source, n)


def dominant(counts: Mapping[str, int]) -> str | None:
    """The source that delivered the most bytes (None: nothing was fetched)."""
    return max(counts, key=lambda k: counts[k]) if counts else None
