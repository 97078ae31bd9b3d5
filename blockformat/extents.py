"""A sorted, non-overlapping map from device ranges to where their bytes live.

Each segment is ``[start, end) -> (source, data_offset)``: the bytes of device offset ``x`` in the
segment are byte ``data_offset + (x - start)`` of ``source``. ``source`` is a small integer chosen by
the owner of the map (a layer's position in a stack, the writable upper), or `ZERO` for a range that
reads as zeros and hides whatever lies below it (a trim/discard). Ranges not in the map are holes:
the owner decides what a hole means (in a stack, "look lower"; at the bottom, zeros).

`paint` overwrites a range, splitting the segments it cuts and merging with a neighbour that continues
the same source contiguously, so sequential writes stay one segment. Painting layers bottom-up gives
the same map as merging them top-down; each call costs O(log n + k) plus a list splice.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

#: The source id of a zeroed (trimmed) range.
ZERO = -1


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    end: int
    source: int
    data_offset: int

    @property
    def length(self) -> int:
        return self.end - self.start


class ExtentMap:
    """Segments kept in three parallel lists, sorted by start."""

    __slots__ = ("_doffs", "_ends", "_srcs", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._srcs: list[int] = []
        self._doffs: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[Segment]:
        for i in range(len(self._starts)):
            yield Segment(self._starts[i], self._ends[i], self._srcs[i], self._doffs[i])

    def _split(self, at: int) -> None:
        """Make `at` a segment boundary if a segment strictly contains it."""
        i = bisect_right(self._starts, at) - 1
        if i < 0 or self._ends[i] <= at or self._starts[i] == at:
            return
        s, src, d = self._starts[i], self._srcs[i], self._doffs[i]
        right_doff = d + (at - s) if src != ZERO else 0
        self._starts.insert(i + 1, at)
        self._ends.insert(i + 1, self._ends[i])
        self._srcs.insert(i + 1, src)
        self._doffs.insert(i + 1, right_doff)
        self._ends[i] = at

    def paint(self, start: int, end: int, source: int, data_offset: int = 0) -> None:
        """Map [start, end) to `source` at `data_offset`, replacing whatever was there."""
        if end <= start:
            return
        if source == ZERO:
            data_offset = 0
        self._split(start)
        self._split(end)
        lo = bisect_right(self._starts, start - 1)  # first segment with start >= start
        hi = bisect_right(self._starts, end - 1)  # first segment with start >= end
        # Merge with the left neighbour if it continues the same source contiguously.
        if lo > 0 and self._ends[lo - 1] == start and self._continues(lo - 1, source, data_offset, start):
            lo -= 1
            start = self._starts[lo]
            data_offset = self._doffs[lo]
        if (
            hi < len(self._starts)
            and self._starts[hi] == end
            and self._continues_right(hi, source, data_offset, start, end)
        ):
            end = self._ends[hi]
            hi += 1
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._srcs[lo:hi] = [source]
        self._doffs[lo:hi] = [data_offset]

    def _continues(self, i: int, source: int, data_offset: int, at: int) -> bool:
        if self._srcs[i] != source:
            return False
        return source == ZERO or self._doffs[i] + (at - self._starts[i]) == data_offset

    def _continues_right(self, i: int, source: int, data_offset: int, start: int, end: int) -> bool:
        if self._srcs[i] != source:
            return False
        return source == ZERO or data_offset + (end - start) == self._doffs[i]

    def covering(self, start: int, end: int) -> Iterator[Segment]:
        """Segments intersecting [start, end), clipped to it, in order (holes are skipped)."""
        i = bisect_right(self._starts, start) - 1
        if i < 0 or self._ends[i] <= start:
            i += 1
        n = len(self._starts)
        while i < n and self._starts[i] < end:
            s, e, src, d = self._starts[i], self._ends[i], self._srcs[i], self._doffs[i]
            cs, ce = max(s, start), min(e, end)
            yield Segment(cs, ce, src, d + (cs - s) if src != ZERO else 0)
            i += 1

    def pieces(self, start: int, end: int) -> Iterator[Segment]:
        """Like `covering`, but holes come out too, as segments with source None-like `HOLE`."""
        pos = start
        for seg in self.covering(start, end):
            if seg.start > pos:
                yield Segment(pos, seg.start, HOLE, 0)
            yield seg
            pos = seg.end
        if pos < end:
            yield Segment(pos, end, HOLE, 0)


#: The pseudo source of a range that is not in the map (only produced by `ExtentMap.pieces`).
HOLE = -2
