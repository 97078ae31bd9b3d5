"""One distribution tree per blob, computed by every node alone, with no coordination.

When a thousand nodes start the same image, none of them should ask the registry for a blob except
one: the others fetch it from a peer, which fetched it from its parent, and so on up to the tree's
root. The tree must be the same on every node (so that asks flow up, not in circles), must spread the
load (so that one node is not the root of every blob), and must barely move when a node joins or
leaves (so that caches built along the tree stay useful). Rendezvous hashing gives all three:

- `rendezvous` ranks the members by ``sha256(digest "\\n" member)``. Every node that knows the same
  members computes the same order. Each blob has its own order, so roots spread evenly. Removing a
  member removes it from the order and leaves the relative order of the others unchanged; adding one
  inserts it and moves nobody else.
- The order is laid out as a complete `fanout`-ary tree, rank 0 its root: the parent of rank ``i`` is
  rank ``(i - 1) // fanout`` (`ancestors`, `children`). A node asks its parent, and if the parent
  cannot answer in time its grandparent, ... then the root, then the registry.
- Seeds (nodes that hold blobs already, e.g. a pre-warmed cache) are put first, so they form the top
  of every tree.

`Demotions` holds members that failed a moment ago (slow, wrong bytes, refused): callers skip them for
a while. Deliberately not part of the order: a demotion is one node's local opinion, and folding it into
the order would make nodes disagree about the tree.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence


def _score(digest: str, member: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{digest}\n{member}".encode()).digest()[:8], "big")


def rendezvous(digest: str, members: Iterable[str], seeds: Iterable[str] = ()) -> list[str]:
    """The unique `members` by descending score for `digest`; the seeds among them first."""
    unique = set(members)
    seeded = unique.intersection(seeds)

    def key(member: str) -> tuple[bool, int, str]:
        return (member not in seeded, -_score(digest, member), member)

    return sorted(unique, key=key)


def _rank(order: Sequence[str], me: str, fanout: int) -> int:
    if fanout < 1:
        raise ValueError(f"fanout must be at least 1, not {fanout}")
    try:
        return order.index(me)
    except ValueError:
        raise ValueError(f"{me!r} is not in the tree's order of {len(order)} members") from None


def ancestors(order: Sequence[str], me: str, fanout: int) -> list[str]:
    """`me`'s parent, grandparent, ... up to the root (rank 0); [] for the root itself."""
    i = _rank(order, me, fanout)
    up = []
    while i > 0:
        i = (i - 1) // fanout
        up.append(order[i])
    return up


def children(order: Sequence[str], me: str, fanout: int) -> list[str]:
    """The members whose parent is `me`."""
    i = _rank(order, me, fanout)
    first = i * fanout + 1
    return list(order[first : first + fanout])


class Demotions:
    """Members skipped for a while after they failed. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._until: dict[str, tuple[float, str]] = {}  # member -> (until, why)
        self.total = 0  # demotions ever made (metrics)
        self.counts: dict[str, int] = {}  # member -> demotions ever made

    def demote(self, member: str, seconds: float, why: str) -> None:
        """Skip `member` for `seconds` (or longer, if already demoted for longer)."""
        with self._lock:
            until = self._clock() + seconds
            current = self._until.get(member)
            if current is not None and current[0] >= until:
                until = current[0]
            self._until[member] = (until, why)
            self.total += 1
            self.counts[member] = self.counts.get(member, 0) + 1

    def is_demoted(self, member: str) -> bool:
        with self._lock:
            entry = self._until.get(member)
            if entry is None:
                return False
            if entry[0] > self._clock():
                return True
            del self._until[member]
            return False

    def active(self) -> dict[str, tuple[float, str]]:
        """member -> (seconds left, why) for every member demoted now."""
        with self._lock:
            now = self._clock()
            for member in [m for m, (until, _) in self._until.items() if until <= now]:
                del self._until[member]
            return {m: (until - now, why) for m, (until, why) in self._until.items()}

    def clear(self, member: str) -> None:
        with self._lock:
            self._until.pop(member, None)
