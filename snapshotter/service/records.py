"""What the metadata store holds of a snapshot, in containerd's vocabulary, and its label rules.

- `Kind`: ``view`` (read-only, named by its *key*), ``active`` (writable, by its key) or ``committed``
  (immutable, by its *name*), numbered as in containerd's Snapshots API;
- `Info`: what containerd sees (``snapshots.Info``): name, parent, kind, labels, times in ns;
- `Snapshot`: one snapshot with its numeric id (its directory's name) and its ancestors (`Layer`),
  nearest parent first; `Usage`: bytes and inodes on disk.

Labels follow containerd: a label whose key and value exceed `snapshotter.labels.MAX_LABEL_SIZE` bytes
is refused (InvalidArgument), and a label set to "" is not stored (setting "" deletes it).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import InvalidRequestError
from ..labels import MAX_LABEL_SIZE


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as in containerd's Snapshots API (`Kind` enum)."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The name filters use: ``kind==active``."""
        return self.name.lower()


@dataclass(frozen=True)
class Info:
    """What containerd sees of a snapshot (``snapshots.Info``)."""

    name: str  # the key of an active or view snapshot, the name of a committed one
    parent: str  # the parent's name, "" for none
    kind: Kind
    labels: Mapping[str, str]
    created_ns: int
    updated_ns: int


@dataclass(frozen=True)
class Usage:
    size: int = 0  # bytes on disk (allocated blocks)
    inodes: int = 0


@dataclass(frozen=True)
class Layer:
    """A committed ancestor of a snapshot, as a driver (or a remote-layer hook) needs it."""

    id: int
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Snapshot:
    """One snapshot with its id and its chain of ancestors, nearest parent first."""

    id: int
    namespace: str
    info: Info
    usage: Usage = Usage()
    parents: tuple[Layer, ...] = field(default=())

    @property
    def parent_ids(self) -> tuple[int, ...]:
        return tuple(p.id for p in self.parents)


def now_ns() -> int:
    return time.time_ns()


def check_labels(labels: Mapping[str, str], *, namespace: str, key: str) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidRequestError(
                f"label {k[:40]!r} of snapshot {key!r} in namespace {namespace!r}: key and value exceed "
                f"{MAX_LABEL_SIZE} bytes; shorten the label",
                namespace=namespace,
                key=key,
            )


def stored_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """containerd does not store a label whose value is empty: setting "" deletes it."""
    return {k: v for k, v in labels.items() if v != ""}
