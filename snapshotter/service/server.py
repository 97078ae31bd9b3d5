"""The gRPC face of the snapshotter: ``containerd.services.snapshots.v1.Snapshots`` on a unix socket.

`SnapshotsServicer` turns each RPC into one call of `snapshotter.service.snapshots.Snapshots` and maps our
exceptions to status codes through one table, `GRPC_CODES`; containerd's ``errdefs.FromGRPC`` turns
those codes back into its own errors (``errdefs.IsNotFound`` ...), so the codes are the contract.

The namespace comes from the ``containerd-namespace`` request metadata (the first value, which is the
latest one containerd set). It is validated like containerd's identifiers (InvalidArgument). Absent,
the request is about every namespace: containerd's garbage collector walks, removes and cleans up
without one (its keys embed the namespace); Prepare, View and Commit then fail with
FailedPrecondition, as containerd's ``namespaces.NamespaceRequired`` does — except for keys in
containerd's backend format, below.

containerd 1.6 sends no header to a proxy snapshotter for clients of its socket (its server's namespace
interceptors, ``services/server/namespace.go``, are not installed in 1.6.20, so the metadata layer's
outgoing calls carry none); its in-process CRI plugin's calls do carry one (``k8s.io``: the plugin's
own context). Its backend keys embed the namespace: ``<namespace>/<sequence>/<key>`` for Prepare, View
and Commit. Such a request — without a header, or with the header its key embeds — is recorded in
`CONTAINERD_NAMESPACE`, one flat space for every key containerd's metadata layer makes (its keys are
unique across its namespaces; a converted layer's chain ID recorded there is shared by all of them, as
containerd's garbage collector, which counts references across namespaces, expects), which every
namespace's lookups also see (`snapshotter.service.transaction`): a CRI pull and a later ``ctr run``
meet the same snapshots.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import NoReturn, TypeVar, cast

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from ..api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from ..api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ..api.containerd.types import mount_pb2
from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidRequestError,
    NotFoundError,
    SnapshotterError,
    UnavailableError,
)
from ..host.sockets import bind_privately
from .overlay import Mount
from .records import Info, Kind
from .snapshots import Snapshots
from .transaction import CONTAINERD_NAMESPACE

log = logging.getLogger(__name__)

NAMESPACE_HEADER = "containerd-namespace"

#: Exception class -> gRPC status code, most specific first. Anything else is UNKNOWN (and logged).
GRPC_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (SnapshotterError, grpc.StatusCode.UNKNOWN),  # mounts, devices, images: the message says which
    (OSError, grpc.StatusCode.UNKNOWN),  # the snapshot root: disk full, permissions
)

#: Infos per List response message (containerd's own service batches too).
LIST_BATCH = 100

# containerd's identifiers.Validate: alphanumeric components joined by '.', '_' or '-'; at most 76.
_IDENTIFIER = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_MAX_IDENTIFIER = 76

_BACKEND_KEY = re.compile(r"([A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*)/[0-9]+/.")

_KIND_TO_PB = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in GRPC_CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def namespace_of(context: grpc.ServicerContext) -> str | None:
    """The request's containerd namespace, validated; None when the request carries none."""
    values = [v for k, v in context.invocation_metadata() if k == NAMESPACE_HEADER]
    if not values:
        return None
    ns = values[0]
    if isinstance(ns, bytes):
        ns = ns.decode(errors="replace")
    if not ns:
        raise FailedPreconditionError("namespace is required: the containerd-namespace header is empty")
    if len(ns) > _MAX_IDENTIFIER or not _IDENTIFIER.fullmatch(ns):
        raise InvalidRequestError(
            f"namespace {ns[:80]!r} is not a valid containerd identifier (alphanumerics joined by "
            f"'.', '_' or '-', at most {_MAX_IDENTIFIER} characters)"
        )
    return ns


def namespace_to_create(context: grpc.ServicerContext, key: str) -> str | None:
    """`namespace_of`, or for a request whose key is a containerd backend key
    (``<namespace>/<sequence>/<key>``: containerd 1.6) without a header or with that namespace's,
    `CONTAINERD_NAMESPACE`."""
    ns = namespace_of(context)
    backend = _BACKEND_KEY.match(key)
    if backend is not None and ns in (None, backend.group(1)):
        return CONTAINERD_NAMESPACE
    return ns


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=_KIND_TO_PB[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


S = TypeVar("S", bound="SnapshotsServicer")
Q = TypeVar("Q")
R = TypeVar("R")


def _rpc(
    fn: Callable[[S, Q, grpc.ServicerContext], R],
) -> Callable[[S, Q, grpc.ServicerContext], R]:
    """Run a unary handler; our errors become the table's status code with the error's message."""

    @functools.wraps(fn)
    def handler(self: S, request: Q, context: grpc.ServicerContext) -> R:
        try:
            return fn(self, request, context)
        except Exception as e:
            _abort(context, fn.__name__, e)

    return handler


def _abort(context: grpc.ServicerContext, method: str, e: Exception) -> NoReturn:
    code = status_code_for(e)
    if code is grpc.StatusCode.UNKNOWN:
        log.error("%s failed: %s", method, e, exc_info=not isinstance(e, SnapshotterError | OSError))
    else:
        log.debug("%s: %s: %s", method, code.name, e)
    context.abort(code, str(e))


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    """``containerd.services.snapshots.v1.Snapshots`` over `Snapshots`."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    @_rpc
    def Prepare(  # noqa: N802  (gRPC method names)
        self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSnapshotResponse:
        mounts = self.snapshots.prepare(
            namespace_to_create(context, request.key), request.key, request.parent, dict(request.labels)
        )
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def View(  # noqa: N802
        self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.ViewSnapshotResponse:
        mounts = self.snapshots.view(
            namespace_to_create(context, request.key), request.key, request.parent, dict(request.labels)
        )
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @_rpc
    def Mounts(  # noqa: N802
        self, request: pb.MountsRequest, context: grpc.ServicerContext
    ) -> pb.MountsResponse:
        return pb.MountsResponse(
            mounts=mounts_to_pb(self.snapshots.mounts(namespace_of(context), request.key))
        )

    @_rpc
    def Commit(  # noqa: N802
        self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.snapshots.commit(
            namespace_to_create(context, request.key), request.name, request.key, dict(request.labels)
        )
        return empty_pb2.Empty()

    @_rpc
    def Remove(  # noqa: N802
        self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.snapshots.remove(namespace_of(context), request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(  # noqa: N802
        self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(
            info=info_to_pb(self.snapshots.stat(namespace_of(context), request.key))
        )

    @_rpc
    def Update(  # noqa: N802
        self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.snapshots.update(
            namespace_of(context), request.info.name, dict(request.info.labels), paths
        )
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    def List(  # noqa: N802
        self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListSnapshotsResponse]:
        try:
            infos = self.snapshots.walk(namespace_of(context), list(request.filters))
        except Exception as e:
            _abort(context, "List", e)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    @_rpc
    def Usage(  # noqa: N802
        self, request: pb.UsageRequest, context: grpc.ServicerContext
    ) -> pb.UsageResponse:
        usage = self.snapshots.usage(namespace_of(context), request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @_rpc
    def Cleanup(  # noqa: N802
        self, request: pb.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        namespace_of(context)  # validated if present; Cleanup concerns every namespace's directories
        self.snapshots.cleanup()
        return empty_pb2.Empty()


_add_servicer = cast(
    Callable[[SnapshotsServicer, grpc.Server], None], pb_grpc.add_SnapshotsServicer_to_server
)


def build_server(snapshots: Snapshots, address: str, workers: int = 16) -> grpc.Server:
    """A gRPC server (not yet started) for `snapshots`, bound to the unix socket `address` (a path),
    mode 0600 from the start (`host.sockets.bind_privately`)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"))
    _add_servicer(SnapshotsServicer(snapshots), server)
    try:
        # Bound 0600 before it is reachable: containerd runs as root, nobody else may drive our mounts.
        with bind_privately(address) as private:
            port = server.add_insecure_port(f"unix:{private}")
            if port == 0:
                raise RuntimeError("bind failed")
    except (RuntimeError, OSError) as e:  # grpcio raises RuntimeError when it cannot bind
        port, why = 0, str(e)
    if port == 0:
        raise SnapshotterError(
            f"cannot listen on unix socket {address}: {why}; check that its directory exists and is writable"
        )
    return server
