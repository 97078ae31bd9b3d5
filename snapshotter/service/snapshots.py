"""The snapshotter itself: containerd's Snapshots operations over the metadata store and the driver.

`Snapshots` holds the containerd semantics of every call, free of gRPC (`snapshotter.service.server` adapts
it to the wire). Each call is one metadata transaction; the order of effects is the one containerd's
overlayfs snapshotter uses, so a crash at any point leaves at worst an orphan directory that
`cleanup` removes, never a record without its directory:

- Prepare/View: inside the write transaction, insert the record, build the directory under a
  temporary name and rename it to its id; then commit. Any failure rolls the record back and removes
  what was built.
- Commit: measure the upper's disk usage and turn the record into a committed one (same id, so the
  directory stays where it is).
- Remove: delete the record and commit first; then remove the directory, best effort (a failure is
  logged and the directory becomes an orphan for Cleanup).
- Cleanup: list, under the write lock, the directories that belong to no record; remove them after.

Converted ("remote") layers plug in through `RemoteLayers` (the default, `NoRemoteLayers`, knows none);
see that class for where each call consults it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ..errors import AlreadyExistsError
from .filters import parse_all
from .metadata import MetaStore
from .overlay import Mount, OverlayDriver
from .records import Info, Kind, Snapshot, Usage
from .transaction import Tx

log = logging.getLogger(__name__)


class RemoteLayers(Protocol):
    """The hook for converted layers: what `Snapshots` asks before and after its plain work.

    An implementation recognises its snapshots by their labels (the ``containerd.io/snapshot/damselfly/``
    annotations containerd passes to Prepare) or by its own table keyed by snapshot id.
    """

    def check(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        """Prepare (active snapshots only), before its write transaction: the slow part of deciding
        (e.g. asking a registry whether the blob is there), so that no network round trip holds the
        database's write lock. The same thread then calls `claim` with the same arguments."""
        ...

    def claim(self, tx: Tx, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        """Prepare (active snapshots only), inside Prepare's write transaction, before anything exists.

        To take the layer over, record the committed snapshot in `tx` (``tx.create(Kind.COMMITTED,
        name, parent, labels)``, name = ``labels["containerd.io/snapshot.ref"]``) and return its name:
        Prepare then commits and answers AlreadyExists, and containerd skips fetching the layer.
        Return None for a plain Prepare (also when the remote path fails: log and count the fallback).
        """
        ...

    def claimed(self, namespace: str | None, name: str) -> None:
        """Prepare, after the transaction that recorded the committed snapshot `name` (`claim`): work
        that may start now, off the caller's path (e.g. getting the image's device ready). Best effort."""
        ...

    def lowerdirs(self, snapshot: Snapshot, driver: OverlayDriver) -> list[str] | None:
        """Prepare, View and Mounts, after the transaction: the lowerdirs for `snapshot`'s parents.

        Return None when no parent is remote (the driver then uses each parent's ``fs``); otherwise the
        full list, nearest first, e.g. the plain parents' ``fs`` above one read-only ext4 mount of the
        converted chain below them, attaching and mounting what is missing (idempotent: Mounts calls
        it again, and so does a restarted service). A failure here undoes a Prepare/View.
        """
        ...

    def removed(self, snapshot: Snapshot) -> None:
        """Remove (after the record is gone) and Commit (after an active snapshot became a committed
        one, which mounts nothing): release what only `snapshot` used (e.g. detach the device of a
        chain when its last user goes). Best effort: log failures, raise nothing."""
        ...

    def cleanup(self, live_ids: set[int]) -> None:
        """Cleanup: release whatever belongs to no live snapshot id (devices, mounts). Best effort."""
        ...


class NoRemoteLayers:
    """Plain images only: every layer is pulled and unpacked by containerd."""

    def check(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        return None

    def claim(self, tx: Tx, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        return None

    def claimed(self, namespace: str | None, name: str) -> None:
        return None

    def lowerdirs(self, snapshot: Snapshot, driver: OverlayDriver) -> list[str] | None:
        return None

    def removed(self, snapshot: Snapshot) -> None:
        return None

    def cleanup(self, live_ids: set[int]) -> None:
        return None


class Snapshots:
    """containerd's Snapshotter interface (1.6) on a `MetaStore` and an `OverlayDriver`.

    `namespace` None means "any namespace" (containerd's garbage collector sends none); Prepare, View
    and Commit need one (`metadata.Tx` refuses otherwise).
    """

    def __init__(self, store: MetaStore, driver: OverlayDriver, remote: RemoteLayers | None = None) -> None:
        self.store = store
        self.driver = driver
        self.remote: RemoteLayers = remote if remote is not None else NoRemoteLayers()

    # -- creating ----------------------------------------------------------------------------------

    def prepare(self, namespace: str | None, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(namespace, Kind.ACTIVE, key, parent, labels)

    def view(self, namespace: str | None, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(namespace, Kind.VIEW, key, parent, labels)

    def _create(
        self, namespace: str | None, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        temp: Path | None = None
        final: Path | None = None
        claimed: str | None = None
        if kind is Kind.ACTIVE:
            self.remote.check(key, parent, labels)
        try:
            with self.store.write(namespace) as tx:
                if kind is Kind.ACTIVE:
                    claimed = self.remote.claim(tx, key, parent, labels)
                if claimed is None:
                    snap = tx.create(kind, key, parent, labels)
                    temp = self.driver.build(snap)
                    final = self.driver.install(temp, snap.id)
                    temp = None
        except BaseException:
            for path in (temp, final):
                if path is not None:
                    self.driver.discard(path)
            raise
        if claimed is not None:
            log.info("prepare %s/%s: remote layer %s is ready", namespace, key, claimed)
            self.remote.claimed(namespace, claimed)
            raise AlreadyExistsError(
                f"target snapshot {claimed!r}: already exists (a converted layer, nothing to unpack)",
                namespace=namespace,
                key=claimed,
            )
        try:
            mounts = self._mounts(snap)
        except BaseException:
            # The remote hook could not provide the lower layers: leave nothing behind.
            self._undo_create(namespace, key)
            raise
        log.info("%s %s/%s (id %d, parent %r)", kind.label, namespace, key, snap.id, parent)
        return mounts

    def _undo_create(self, namespace: str | None, key: str) -> None:
        try:
            self.remove(namespace, key)
        except Exception as e:
            log.warning("cannot undo the creation of %s/%s: %s", namespace, key, e)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        lowerdirs = self.remote.lowerdirs(snap, self.driver) if snap.parents else None
        return self.driver.mounts(snap, lowerdirs)

    def commit(self, namespace: str | None, name: str, key: str, labels: Mapping[str, str]) -> None:
        with self.store.write(namespace) as tx:
            active = tx.find(key)
            # Measured under the write lock, as containerd does: nothing can change the record
            # between the measurement and the commit. `tx.commit` checks name, key and kind.
            usage = Usage()
            if active is not None and active.info.kind is Kind.ACTIVE:
                usage = self.driver.usage(active.id)
            snap = tx.commit(key, name, labels, usage)
        log.info("commit %s/%s as %s (id %d, %d bytes)", namespace, key, name, snap.id, usage.size)
        self.remote.removed(snap)  # a committed snapshot mounts nothing: its lower layers lost a user

    # -- reading -----------------------------------------------------------------------------------

    def mounts(self, namespace: str | None, key: str) -> list[Mount]:
        with self.store.read(namespace) as tx:
            snap = tx.get_mountable(key)
        return self._mounts(snap)

    def stat(self, namespace: str | None, key: str) -> Info:
        with self.store.read(namespace) as tx:
            return tx.stat(key)

    def walk(self, namespace: str | None, filters: Iterable[str]) -> list[Info]:
        flt = parse_all(filters)  # a bad filter fails before any work
        with self.store.read(namespace) as tx:
            return tx.walk(flt)

    def usage(self, namespace: str | None, key: str) -> Usage:
        """Active snapshots: measured now (du of the upper); others: recorded at commit (views: 0)."""
        with self.store.read(namespace) as tx:
            snap = tx.get(key)
        if snap.info.kind is Kind.ACTIVE:
            return self.driver.usage(snap.id)
        return snap.usage

    # -- changing ----------------------------------------------------------------------------------

    def update(
        self, namespace: str | None, name: str, labels: Mapping[str, str], paths: Sequence[str]
    ) -> Info:
        with self.store.write(namespace) as tx:
            return tx.update(name, labels, paths)

    def remove(self, namespace: str | None, key: str) -> None:
        with self.store.write(namespace) as tx:
            snap = tx.remove(key)
        # After the commit point: the key is gone for every caller; files go best effort.
        self.remote.removed(snap)
        self.driver.remove(snap.id)
        log.info("remove %s/%s (id %d)", snap.namespace, key, snap.id)

    def cleanup(self) -> list[Path]:
        """Remove the directories that belong to no snapshot (in any namespace); returns them."""
        with self.store.write(None) as tx:
            live = tx.all_ids()
            # Listed under the write lock: no Prepare is between building and recording a directory.
            orphans = self.driver.orphans(live)
        self.remote.cleanup(live)
        for path in orphans:
            self.driver.discard(path)
        if orphans:
            log.info("cleanup removed %d orphan directories", len(orphans))
        return orphans
