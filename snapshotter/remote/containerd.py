"""A small client of containerd's gRPC API: what `damselfly rpull` needs of leases, content, snapshots,
diff and images (containerd 1.6, ``containerd.services.*.v1``; stubs in `snapshotter.api`).

Every call carries the ``containerd-namespace`` metadata, and ``containerd-lease`` once a lease is
set (`ContainerdClient.lease`): containerd then adds whatever the call creates (content, ingests,
snapshots) to that lease, so its garbage collector keeps them until the lease is deleted or expires
(containerd's ``leases/grpc.go``, ``metadata/leases.go``).

A failed call raises `ContainerdError` with the call, the gRPC status name (containerd's ``errdefs``:
NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT, UNAVAILABLE, ...), containerd's message and a remedy.
Callers that expect a code (AlreadyExists from a remote snapshotter's Prepare) look at `.code`.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import field_mask_pb2

from ..api.containerd.services.content.v1 import content_pb2 as content_pb
from ..api.containerd.services.content.v1 import content_pb2_grpc as content_grpc
from ..api.containerd.services.diff.v1 import diff_pb2 as diff_pb
from ..api.containerd.services.diff.v1 import diff_pb2_grpc as diff_grpc
from ..api.containerd.services.images.v1 import images_pb2 as images_pb
from ..api.containerd.services.images.v1 import images_pb2_grpc as images_grpc
from ..api.containerd.services.leases.v1 import leases_pb2 as leases_pb
from ..api.containerd.services.leases.v1 import leases_pb2_grpc as leases_grpc
from ..api.containerd.services.snapshots.v1 import snapshots_pb2 as snapshots_pb
from ..api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as snapshots_grpc
from ..api.containerd.types import descriptor_pb2, mount_pb2
from ..errors import ContainerdError
from ..labels import LABEL_GC_EXPIRE

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"

#: Bytes per content Write message (containerd's gRPC server takes up to 16 MiB per message).
WRITE_CHUNK = 1 << 20
#: Seconds for quick metadata calls; the slow ones (Prepare of a remote layer, Apply) get more.
CALL_TIMEOUT = 60.0
SLOW_CALL_TIMEOUT = 1800.0

T = TypeVar("T")

Descriptor = descriptor_pb2.Descriptor
Mount = mount_pb2.Mount
SnapshotInfo = snapshots_pb.Info


def _remedy(code: grpc.StatusCode, address: str) -> str:
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"check that containerd is running and serving {address} (--address, $CONTAINERD_ADDRESS)"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "containerd did not answer in time; check its log (journalctl -u containerd)"
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return f"run as root, or as a user allowed on {address}"
    return "check containerd's log (journalctl -u containerd)"


def _stub(cls: object) -> Callable[[grpc.Channel], Any]:
    return cast(Callable[[grpc.Channel], Any], cls)


def _status(e: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a failed call (a `grpc.Call` too, though not typed so)."""
    code = getattr(e, "code", None)
    details = getattr(e, "details", None)
    status = code() if callable(code) else None
    message = details() if callable(details) else None
    return (
        status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        message if isinstance(message, str) and message else str(e),
    )


def lease_expiry(now: datetime.datetime, ttl: datetime.timedelta) -> str:
    """The ``containerd.io/gc.expire`` value for a lease of `ttl` from `now` (RFC 3339, as containerd's
    ``leases.WithExpiration`` writes it)."""
    return (now + ttl).astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerdClient:
    """One connection to containerd's socket `address`, for namespace `namespace`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = "default") -> None:
        self.address = address
        self.namespace = namespace
        self.lease: str | None = None
        self._channel = grpc.insecure_channel(
            f"unix:{address}",
            options=[
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20),
            ],
        )
        # The generated *_pb2_grpc stubs are untyped; requests and responses are typed by the .pyi.
        self._leases: Any = _stub(leases_grpc.LeasesStub)(self._channel)
        self._content: Any = _stub(content_grpc.ContentStub)(self._channel)
        self._snapshots: Any = _stub(snapshots_grpc.SnapshotsStub)(self._channel)
        self._diff: Any = _stub(diff_grpc.DiffStub)(self._channel)
        self._images: Any = _stub(images_grpc.ImagesStub)(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --

    def _metadata(self) -> list[tuple[str, str]]:
        md = [(NAMESPACE_HEADER, self.namespace)]
        if self.lease is not None:
            md.append((LEASE_HEADER, self.lease))
        return md

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as e:
            code, detail = _status(e)
            raise ContainerdError(what, code.name, detail, _remedy(code, self.address)) from None

    def _lookup(self, what: str, fn: Callable[[], T]) -> T | None:
        """`_call`, with containerd's NOT_FOUND as None."""
        try:
            return self._call(what, fn)
        except ContainerdError as e:
            if e.code == "NOT_FOUND":
                return None
            raise

    # -- leases --

    def create_lease(self, lease_id: str, ttl: datetime.timedelta) -> str:
        """Create a lease that expires after `ttl` (if never deleted) and use it for every later call."""
        labels = {LABEL_GC_EXPIRE: lease_expiry(datetime.datetime.now(datetime.UTC), ttl)}
        req = leases_pb.CreateRequest(id=lease_id, labels=labels)
        resp: leases_pb.CreateResponse = self._call(
            f"Leases.Create {lease_id}",
            lambda: self._leases.Create(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )
        self.lease = resp.lease.id
        return self.lease

    def delete_lease(self) -> None:
        """Delete the current lease (what it alone held becomes garbage) and stop using it."""
        lease, self.lease = self.lease, None
        if lease is None:
            return
        req = leases_pb.DeleteRequest(id=lease)
        self._call(
            f"Leases.Delete {lease}",
            lambda: self._leases.Delete(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )

    def lease_resource(self, resource_id: str, resource_type: str) -> None:
        """Add an existing resource to the current lease: ``content`` (a digest) or ``snapshots/<name>``
        (a snapshot key), so the GC cannot take it before the image refers to it."""
        if self.lease is None:
            return
        req = leases_pb.AddResourceRequest(
            id=self.lease, resource=leases_pb.Resource(id=resource_id, type=resource_type)
        )
        self._call(
            f"Leases.AddResource {resource_type} {resource_id}",
            lambda: self._leases.AddResource(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )

    # -- content --

    def content_info(self, digest: str) -> content_pb.Info | None:
        """The content store's record of `digest` in this namespace, or None."""
        req = content_pb.InfoRequest(digest=digest)
        resp: content_pb.InfoResponse | None = self._lookup(
            f"Content.Info {digest}",
            lambda: self._content.Info(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )
        return resp.info if resp is not None else None

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set `labels` on the blob `digest`, leaving its other labels alone."""
        if not labels:
            return
        req = content_pb.UpdateRequest(
            info=content_pb.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        self._call(
            f"Content.Update {digest}",
            lambda: self._content.Update(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )

    def write_content(
        self, ref: str, digest: str, size: int, chunks: Iterable[bytes], labels: Mapping[str, str]
    ) -> bool:
        """Store a blob through the Write stream: STAT (take the ingest `ref`), WRITE from offset 0
        (containerd truncates a partial ingest left under `ref`), COMMIT with the expected digest, size
        and `labels`; containerd hashes what it received and refuses a mismatch. False when the blob
        was already there (ALREADY_EXISTS; `labels` are then not applied)."""

        def requests() -> Iterator[content_pb.WriteContentRequest]:
            yield content_pb.WriteContentRequest(action=content_pb.STAT, ref=ref, total=size)
            offset = 0
            for chunk in chunks:
                yield content_pb.WriteContentRequest(
                    action=content_pb.WRITE, ref=ref, offset=offset, data=chunk
                )
                offset += len(chunk)
            yield content_pb.WriteContentRequest(
                action=content_pb.COMMIT, ref=ref, offset=offset, total=size, expected=digest, labels=labels
            )

        def run() -> content_pb.WriteContentResponse | None:
            last = None
            for resp in self._content.Write(requests(), metadata=self._metadata(), timeout=SLOW_CALL_TIMEOUT):
                last = resp
            return last

        try:
            last = self._call(f"Content.Write {digest} (ingest {ref})", run)
        except ContainerdError as e:
            if e.code == "ALREADY_EXISTS":
                return False
            self.abort_content(ref)
            raise
        if last is None or last.action != content_pb.COMMIT or last.digest != digest or last.offset != size:
            got = "nothing" if last is None else f"{last.digest} ({last.offset} bytes)"
            raise ContainerdError(
                f"Content.Write {digest}",
                "UNKNOWN",
                f"commit answered {got}, expected {digest} ({size} bytes)",
                "check containerd's log",
            )
        return True

    def abort_content(self, ref: str) -> None:
        """Drop the ingest `ref` (best effort: an unknown ref is fine)."""
        req = content_pb.AbortRequest(ref=ref)
        with contextlib.suppress(ContainerdError):
            self._call(
                f"Content.Abort {ref}",
                lambda: self._content.Abort(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
            )

    # -- snapshots --

    def snapshot_stat(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        """The snapshot `key` of `snapshotter`, or None if there is none."""
        req = snapshots_pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        resp: snapshots_pb.StatSnapshotResponse | None = self._lookup(
            f"Snapshots.Stat {key} (snapshotter {snapshotter})",
            lambda: self._snapshots.Stat(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )
        return resp.info if resp is not None else None

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        req = snapshots_pb.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=labels
        )
        resp: snapshots_pb.PrepareSnapshotResponse = self._call(
            f"Snapshots.Prepare {key} (snapshotter {snapshotter})",
            lambda: self._snapshots.Prepare(req, metadata=self._metadata(), timeout=SLOW_CALL_TIMEOUT),
        )
        return list(resp.mounts)

    def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        req = snapshots_pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels)
        self._call(
            f"Snapshots.Commit {key} as {name} (snapshotter {snapshotter})",
            lambda: self._snapshots.Commit(req, metadata=self._metadata(), timeout=SLOW_CALL_TIMEOUT),
        )

    def remove(self, snapshotter: str, key: str) -> None:
        req = snapshots_pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self._call(
            f"Snapshots.Remove {key} (snapshotter {snapshotter})",
            lambda: self._snapshots.Remove(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )

    # -- diff --

    def apply(self, layer: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Extract the layer blob `layer` (in the content store) onto `mounts`; returns the descriptor of
        what was applied: the uncompressed tar, whose digest is the layer's diffID."""
        req = diff_pb.ApplyRequest(diff=layer, mounts=list(mounts))
        resp: diff_pb.ApplyResponse = self._call(
            f"Diff.Apply {layer.digest}",
            lambda: self._diff.Apply(req, metadata=self._metadata(), timeout=SLOW_CALL_TIMEOUT),
        )
        return resp.applied

    # -- images --

    def put_image(self, name: str, target: Descriptor) -> str:
        """Create the image record `name` → `target`, or point an existing one at `target` (its labels
        stay); returns "created" or "updated"."""
        image = images_pb.Image(name=name, target=target)
        try:
            self._call(
                f"Images.Create {name}",
                lambda: self._images.Create(
                    images_pb.CreateImageRequest(image=image), metadata=self._metadata(), timeout=CALL_TIMEOUT
                ),
            )
            return "created"
        except ContainerdError as e:
            if e.code != "ALREADY_EXISTS":
                raise
        req = images_pb.UpdateImageRequest(
            image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])
        )
        self._call(
            f"Images.Update {name}",
            lambda: self._images.Update(req, metadata=self._metadata(), timeout=CALL_TIMEOUT),
        )
        return "updated"
