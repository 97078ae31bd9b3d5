"""The per-thread tally of fetched bytes by source (`p2p.tally`): what a device read's ``source`` is."""

from __future__ import annotations

import threading

from p2p import tally


def test_bytes_count_in_every_open_watch_of_the_thread_only() -> None:
    tally.add("registry", 5)  # no watch: counted nowhere
    with tally.watch() as outer:
        tally.add("registry", 10)
        with tally.watch() as inner:
            tally.add("peer", 30)
        other: dict[str, int] = {}

        def elsewhere() -> None:
            with tally.watch() as theirs:
                tally.add("registry", 99)
            other.update(theirs)

        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        tally.add_all(other)  # this thread waited for that fetch
    assert inner == {"peer": 30}
    assert outer == {"registry": 109, "peer": 30}
    assert tally.dominant(outer) == "registry"
    assert tally.dominant(inner) == "peer"
    assert tally.dominant({}) is None
