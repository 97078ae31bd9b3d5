"""An access trace of a block device: which ranges a container read, in the order it first read them.

A trace is recorded on one node (`damselfly record-trace`) or computed at conversion from a list of
paths (`damselfly convert --prefetch-files`), stored with the image as an OCI referrer of its manifest
(docs/format.md §9), and replayed on other nodes when they mount the image: the ranges are fetched
ahead of the container's own reads. It is a hint, never data: a node that cannot get or parse it
mounts the image as it would without one.

The encoding is canonical JSON (sorted keys, no spaces), so the same trace has the same digest::

    {"layers": ["sha256:...", ...],   the chain it was recorded on, bottom to top (the layer blobs)
     "ranges": [[offset, length], ...],  device bytes, first access first, not overlapping
     "source": "recorded" | "files",
     "version": 1,
     "vsize": 68719476736}            the device's size
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .digest import Digest, parse_digest
from .errors import InvalidArgumentError, InvalidDigestError

#: The media type of a trace blob, and the artifactType of the referrer manifest that carries it.
TRACE_MEDIA_TYPE = "application/vnd.damselfly.trace.v1+json"
TRACE_VERSION = 1
#: At most this many ranges (a trace of a large start-up is some thousands).
MAX_RANGES = 100_000
#: At most this many bytes of encoded trace (it is fetched whole before a replay starts).
MAX_TRACE_BYTES = 4 * 1024 * 1024
#: Blocks a recorder tracks: reads are rounded out to this (the kernel's page).
BLOCK = 4096
SOURCES = ("recorded", "files")


@dataclass(frozen=True)
class Trace:
    layers: tuple[Digest, ...]
    vsize: int
    ranges: tuple[tuple[int, int], ...] = field(default=())
    source: str = "recorded"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidArgumentError(f"trace source {self.source!r} is not one of {', '.join(SOURCES)}")
        if not 0 < self.vsize <= 1 << 50:
            raise InvalidArgumentError(f"trace device size {self.vsize} is out of range")
        if len(self.ranges) > MAX_RANGES:
            raise InvalidArgumentError(f"a trace holds at most {MAX_RANGES} ranges, not {len(self.ranges)}")
        for offset, length in self.ranges:
            if offset < 0 or length <= 0 or offset + length > self.vsize:
                raise InvalidArgumentError(
                    f"trace range {offset}+{length} is not within the {self.vsize}-byte device"
                )

    @property
    def total(self) -> int:
        """Bytes of device the ranges cover."""
        return sum(n for _, n in self.ranges)

    def to_json(self) -> bytes:
        doc = {
            "layers": list(self.layers),
            "ranges": [[o, n] for o, n in self.ranges],
            "source": self.source,
            "version": TRACE_VERSION,
            "vsize": self.vsize,
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(raw) > MAX_TRACE_BYTES:
            raise InvalidArgumentError(f"the trace encodes to {len(raw)} bytes, more than {MAX_TRACE_BYTES}")
        return raw

    @classmethod
    def from_json(cls, raw: bytes, where: str = "trace") -> Trace:
        """Parse and check a trace; `InvalidArgumentError` saying what is wrong with it."""
        if len(raw) > MAX_TRACE_BYTES:
            raise InvalidArgumentError(f"{where}: {len(raw)} bytes, more than {MAX_TRACE_BYTES}")
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise InvalidArgumentError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise InvalidArgumentError(f"{where}: not a JSON object")
        if doc.get("version") != TRACE_VERSION:
            version = doc.get("version")
            raise InvalidArgumentError(f"{where}: version {version!r}, this node reads {TRACE_VERSION}")
        layers, ranges = doc.get("layers"), doc.get("ranges")
        vsize, source = doc.get("vsize"), doc.get("source")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise InvalidArgumentError(f"{where}: 'layers' is not a list of digests")
        if not isinstance(ranges, list) or not isinstance(vsize, int) or not isinstance(source, str):
            raise InvalidArgumentError(f"{where}: 'ranges', 'vsize' or 'source' missing or of the wrong type")
        pairs: list[tuple[int, int]] = []
        for r in ranges[: MAX_RANGES + 1]:
            if not (isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)):
                raise InvalidArgumentError(f"{where}: a range is not [offset, length]: {r!r:.80}")
            pairs.append((r[0], r[1]))
        try:
            digests = tuple(parse_digest(x) for x in layers)
            return cls(digests, vsize, tuple(pairs), source)
        except (InvalidArgumentError, InvalidDigestError) as e:
            raise InvalidArgumentError(f"{where}: {e}") from None


class RangeSet:
    """The device blocks seen so far, and the new runs each access adds, in first-access order."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self.runs: list[tuple[int, int]] = []

    def add(self, offset: int, length: int) -> None:
        """Record an access of [offset, offset+length): blocks not seen before become new ranges, merged
        into the last range when they continue it."""
        if length <= 0:
            return
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        run_start = -1
        for b in range(first, last + 1):
            if b in self._seen:
                if run_start >= 0:
                    self._append(run_start, b)
                    run_start = -1
                continue
            self._seen.add(b)
            if run_start < 0:
                run_start = b
        if run_start >= 0:
            self._append(run_start, last + 1)

    def _append(self, first: int, end: int) -> None:
        if self.runs:
            o, n = self.runs[-1]
            if o + n == first * BLOCK:
                self.runs[-1] = (o, n + (end - first) * BLOCK)
                return
        self.runs.append((first * BLOCK, (end - first) * BLOCK))

    def __len__(self) -> int:
        return len(self.runs)


def clip(ranges: Iterable[tuple[int, int]], vsize: int) -> list[tuple[int, int]]:
    """`ranges` cut to the device (a recorder rounds the last block out)."""
    out = []
    for o, n in ranges:
        cut = min(n, vsize - o)
        if cut > 0:
            out.append((o, cut))
    return out


def same_chain(trace: Trace, layers: Sequence[str]) -> bool:
    return list(trace.layers) == list(layers)
