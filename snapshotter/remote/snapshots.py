"""Converted ("remote") layers: snapshots whose files are fetched lazily from a registry.

containerd's unpacker calls ``Prepare(key, parent, labels)`` for every layer. For a converted layer
(`snapshotter.remote.layers.candidate`) whose blob answers a HEAD (`snapshotter.remote.blobcheck`) we
record a *remote* committed snapshot named by the chain ID, with ``.../damselfly/source`` and
``.../damselfly/blob-size`` added to its labels, and answer AlreadyExists, so containerd never fetches
the layer. An active snapshot or view on such layers gets the chain's shared ext4 mount as its lowest
lowerdir (`snapshotter.remote.chains`).

Anything that stops the remote path — labels that do not parse, no source, an unreachable registry, a
parent that is not itself remote — is a *fallback*: a WARNING naming the layer and why, the counter
``damselfly_remote_fallbacks_total{reason}``, and a normal Prepare (containerd then unpacks the layer
itself). Never silent. (A block layer is not a tar: for an image with only converted layers the pull
then stops with the puller's error — `damselfly rpull` names the media type and points at this log —
rather than ever running a container on a half-made snapshot.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from blockformat.stack import MAX_LAYERS

from ..device.supervisor import DeviceDaemon
from ..errors import ImageError
from ..labels import LABEL_BLOB_SIZE, LABEL_LAYER_DIGEST, LABEL_SNAPSHOT_REF, LABEL_SOURCE
from ..metrics import REMOTE_FALLBACKS, REMOTE_LAYERS
from ..service.metadata import MetaStore
from ..service.overlay import OverlayDriver
from ..service.records import Kind, Layer, Snapshot
from ..service.transaction import Tx
from .blobcheck import BlobCheck, RemoteOptions
from .chains import ChainMounts
from .layers import Candidate, FallbackError, candidate, chain_of, is_converted, is_top_layer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Checked:
    key: str
    parent: str
    labels: Mapping[str, str]
    candidate: Candidate | None
    size: int | None
    fallback: FallbackError | None


class RemoteSnapshots:
    """`snapshotter.service.snapshots.RemoteLayers` for converted images (see the module docstring)."""

    def __init__(
        self,
        store: MetaStore,
        root: Path,
        daemon: DeviceDaemon,
        options: RemoteOptions | None = None,
        check: BlobCheck | None = None,
    ) -> None:
        self.store = store
        self.options = options or RemoteOptions()
        self.blobs = check or BlobCheck(self.options)
        self.chains = ChainMounts(
            store, root / "remote", daemon, self.options.plain_http, self.options.prefetch
        )
        self._checked = threading.local()
        self._top = threading.local()  # the claim just made was an image's top layer

    def close(self) -> None:
        self.chains.close()
        self.blobs.close()

    # -- Prepare: recording remote layers ----------------------------------------------------------

    def check(self, key: str, parent: str, labels: Mapping[str, str]) -> None:
        """Before Prepare's transaction: the slow part (a HEAD of the blob), kept for `claim`."""
        self._checked.value = self._inspect(key, parent, labels)

    def _inspect(self, key: str, parent: str, labels: Mapping[str, str]) -> _Checked:
        cand: Candidate | None = None
        size: int | None = None
        fallback: FallbackError | None = None
        try:
            if not self.options.enabled:
                if is_converted(labels) and LABEL_SNAPSHOT_REF in labels:
                    raise FallbackError("disabled", "remote layers are disabled ([remote] enabled = false)")
            else:
                cand = candidate(parent, labels)
                if cand is not None:
                    size = self.blobs.size(cand.registry, cand.repository, cand.digest)
        except FallbackError as f:
            fallback = f
        return _Checked(key, parent, labels, cand, size, fallback)

    def claim(self, tx: Tx, key: str, parent: str, labels: Mapping[str, str]) -> str | None:
        checked: _Checked | None = getattr(self._checked, "value", None)
        self._checked.value = None
        self._top.value = False
        if checked is None or (checked.key, checked.parent, checked.labels) != (key, parent, labels):
            checked = self._inspect(key, parent, labels)  # no `check` before: do it now
        cand = checked.candidate
        try:
            if checked.fallback is not None:
                raise checked.fallback
            if cand is None or checked.size is None:
                return None
            name = self._record(tx, cand, checked.size, parent, labels)
            self._top.value = name is not None and is_top_layer(cand, labels)
            return name
        except FallbackError as f:
            layer = cand.ref if cand is not None else labels.get(LABEL_SNAPSHOT_REF, key)
            digest = f" (blob {cand.digest})" if cand is not None else ""
            log.warning(
                "converted layer %s%s of prepare %s/%s falls back to a normal pull: %s",
                layer,
                digest,
                tx.namespace,
                key,
                f.why,
            )
            REMOTE_FALLBACKS.labels(reason=f.reason).inc()
            return None

    def _record(
        self, tx: Tx, cand: Candidate, size: int, parent: str, labels: Mapping[str, str]
    ) -> str | None:
        if parent:
            below = tx.find(parent)
            if below is None:
                return None  # the plain path reports the missing parent (NotFound)
            layers = [Layer(below.id, below.info.name, below.info.labels), *below.parents]
            try:
                chain = chain_of(layers) if below.info.kind is Kind.COMMITTED else None
            except ImageError as e:
                raise FallbackError("parent", str(e)) from None
            if chain is None or chain.plain:
                raise FallbackError(
                    "parent",
                    f"its parent {parent!r} is not a converted layer; a converted layer can only stack on "
                    "converted layers",
                )
            vsizes = {x.annotations.vsize for x in chain.remote}
            if vsizes != {cand.annotations.vsize}:
                raise FallbackError(
                    "parent", f"its device size {cand.annotations.vsize} differs from its parents' {vsizes}"
                )
            if len(chain.remote) + 1 > MAX_LAYERS:
                raise FallbackError("parent", f"a chain holds at most {MAX_LAYERS} converted layers")
        existing = tx.find(cand.ref)
        if existing is not None:
            mine = existing.info.kind is Kind.COMMITTED and LABEL_SOURCE in existing.info.labels
            if mine and existing.info.parent == parent:
                return cand.ref  # recorded by an earlier Prepare of the same layer
            what = "converted layer" if mine else f"{existing.info.kind.label} snapshot"
            raise FallbackError(
                "name-taken",
                f"snapshot {cand.ref!r} already exists as a {what} with parent {existing.info.parent!r}, "
                f"not {parent!r}",
            )
        recorded = {
            **labels,
            LABEL_LAYER_DIGEST: cand.digest,
            LABEL_SOURCE: cand.source,
            LABEL_BLOB_SIZE: str(size),
        }
        tx.create(Kind.COMMITTED, cand.ref, parent, recorded)
        REMOTE_LAYERS.inc()
        log.info(
            "converted layer %s (blob %s, %d bytes) recorded from %s",
            cand.ref,
            cand.digest,
            size,
            cand.source,
        )
        return cand.ref

    def claimed(self, namespace: str | None, name: str) -> None:
        """After an image's top converted layer is recorded (its pull is ending): attach the chain's
        device in the background, so that its indexes are learned and its trace replayed while the
        pull finishes and the container is created (`ChainMounts.warm`)."""
        top, self._top.value = getattr(self._top, "value", False), False
        if not top or not self.options.prefetch:
            return
        with self.store.read(namespace) as tx:
            snap = tx.find(name)
        if snap is None:
            return
        try:
            chain = chain_of([Layer(snap.id, snap.info.name, snap.info.labels), *snap.parents])
        except ImageError as e:
            log.warning("converted layer %s: %s", name, e)
            return
        if chain is not None:
            self.chains.warm(chain)

    # -- mounts and releases (`ChainMounts`) ----------------------------------------------------

    def lowerdirs(self, snapshot: Snapshot, driver: OverlayDriver) -> list[str] | None:
        chain = chain_of(snapshot.parents)
        if chain is None:
            return None
        lower = self.chains.ensure(chain)
        return [str(driver.fs_path(p.id)) for p in chain.plain] + [lower]

    def removed(self, snapshot: Snapshot) -> None:
        self.chains.removed(snapshot)

    def cleanup(self, live_ids: set[int]) -> None:
        self.chains.sweep()

    def mounted_chains(self) -> list[str]:
        return self.chains.mounted_chains()

    def reconcile(self) -> None:
        self.chains.reconcile()
