"""The CRI image-service proxy of `damselfly serve` (``[cri]``): Kubernetes pull secrets for lazy reads.

A kubelet sends a pod's image pull secret with each CRI ``PullImage`` call to the container runtime;
containerd's CRI plugin uses it for the manifest and config, but a snapshotter never sees it — so a
converted image from a private registry would pass containerd's pull and then fail damselfly's Prepare
check and every block read. The kubelet is therefore pointed at this proxy
(``--image-service-endpoint=unix:///run/damselfly/cri.sock``), which serves ``runtime.v1.ImageService``
on its own socket and forwards every call to containerd's CRI socket **as the bytes it received**
(`FORWARDED`): requests and answers are never re-encoded, status codes and messages come back as
containerd gave them, deadlines and cancellations carry over. From a ``PullImage`` it only reads the
image and its ``AuthConfig``, before forwarding (containerd's unpack calls Prepare during the pull):

- the credentials (`p2p.keychain.credentials_from_cri`, containerd's rules) are kept in memory for the
  image's registry and repository (`CredentialKeeper` → the `Keychain` the Prepare checks ask first);
- and handed to the device daemon (its control socket, root's alone), whose registry clients ask them
  first for block reads and background downloads of that repository (`DeviceDaemon.share_credentials`;
  a daemon started later gets them all at its start).

Never on disk, never in a log line (only the kind of credentials and the repository), never in an
error message. A ``PullImage`` without credentials leaves what an earlier one kept. A request this
proxy cannot read is still forwarded (and logged, without its content): the pull is containerd's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Literal, NoReturn

import grpc
from google.protobuf.message import DecodeError

from p2p.errors import P2PError
from p2p.keychain import Keychain, credentials_from_cri
from p2p.reference import parse_reference

from ..api.runtime.v1 import api_pb2
from ..errors import SnapshotterError
from ..host.sockets import bind_privately

log = logging.getLogger(__name__)

SERVICE = "runtime.v1.ImageService"
#: Every method forwarded, and its shape (k8s.io/cri-api ``pkg/apis/runtime/v1/api.proto``).
FORWARDED: dict[str, Literal["unary", "stream"]] = {
    f"/{SERVICE}/ListImages": "unary",
    f"/{SERVICE}/StreamImages": "stream",
    f"/{SERVICE}/ImageStatus": "unary",
    f"/{SERVICE}/PullImage": "unary",
    f"/{SERVICE}/RemoveImage": "unary",
    f"/{SERVICE}/ImageFsInfo": "unary",
}
PULL_IMAGE = f"/{SERVICE}/PullImage"
#: Request metadata that is the transport's, not the caller's: not forwarded.
_TRANSPORT_METADATA = ("user-agent", "grpc-", ":")


class CredentialKeeper:
    """What the proxy does with a ``PullImage``'s ``AuthConfig``: keep it for the image's repository
    (in `keychain`) and hand it to `share` (the device daemon), before containerd pulls."""

    def __init__(self, keychain: Keychain, share: Callable[[str, str], None] | None = None) -> None:
        self.keychain = keychain
        self._share = share

    def pulled(self, request: api_pb2.PullImageRequest) -> None:
        image = request.image.image
        if not request.HasField("auth"):
            return
        a = request.auth
        try:
            ref = parse_reference(image)
            creds = credentials_from_cri(
                ref.registry,
                username=a.username,
                password=a.password,
                auth=a.auth,
                server_address=a.server_address,
                identity_token=a.identity_token,
                registry_token=a.registry_token,
            )
        except P2PError as e:  # no secret in these messages
            log.warning("PullImage %.200s: its credentials are not kept: %s", image, e)
            return
        if creds is None:
            if a.server_address:
                log.info(
                    "PullImage %.200s: its credentials are for %.200s, not %s: not kept",
                    image,
                    a.server_address,
                    ref.registry,
                )
            return
        if self.keychain.put(ref.registry, ref.repository, creds):
            log.info(
                "PullImage %s: credentials for %s/%s (%s) kept in memory",
                image,
                ref.registry,
                ref.repository,
                creds.kind,
            )
        if self._share is not None:
            try:
                self._share(ref.registry, ref.repository)
            except Exception as e:  # the pull goes on; the daemon gets them at its next (re)start
                log.warning(
                    "PullImage %s: cannot hand the credentials to the device daemon yet: %s", image, e
                )


class CriProxy(grpc.GenericRpcHandler):
    """``runtime.v1.ImageService`` forwarded to containerd's CRI socket (see the module docstring)."""

    def __init__(self, containerd: str, keeper: CredentialKeeper) -> None:
        self.containerd = containerd
        self.keeper = keeper
        self._channel = grpc.insecure_channel(f"unix:{containerd}")

    def close(self) -> None:
        self._channel.close()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        shape = FORWARDED.get(method)
        if shape == "unary":
            return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: self._unary(method, raw, ctx))
        if shape == "stream":
            return grpc.unary_stream_rpc_method_handler(lambda raw, ctx: self._stream(method, raw, ctx))
        return None  # UNIMPLEMENTED: the runtime service is containerd's own socket's

    # -- forwarding -----------------------------------------------------------------------------------

    def _unary(self, method: str, raw: bytes, context: grpc.ServicerContext) -> bytes:
        if method == PULL_IMAGE:
            self._keep(raw)
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(method)
        future = call.future(raw, timeout=context.time_remaining(), metadata=_forwarded(context))

        def cancel() -> None:  # the kubelet gave up: so does containerd's pull
            future.cancel()

        context.add_callback(cancel)
        try:
            answer: bytes = future.result()
        except grpc.RpcError as e:
            self._abort(context, method, e)
        except grpc.FutureCancelledError:
            context.abort(grpc.StatusCode.CANCELLED, f"{method}: cancelled")
        return answer

    def _stream(self, method: str, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        call: grpc.UnaryStreamMultiCallable[bytes, bytes] = self._channel.unary_stream(method)
        answers = call(raw, timeout=context.time_remaining(), metadata=_forwarded(context))

        def cancel() -> None:
            answers.cancel()

        context.add_callback(cancel)
        try:
            yield from answers
        except grpc.RpcError as e:
            self._abort(context, method, e)

    def _keep(self, raw: bytes) -> None:
        try:
            request = api_pb2.PullImageRequest.FromString(raw)
        except DecodeError:
            log.warning(
                "a PullImage request does not parse as runtime.v1: forwarded, its credentials not kept"
            )
            return
        self.keeper.pulled(request)

    def _abort(self, context: grpc.ServicerContext, method: str, e: grpc.RpcError) -> NoReturn:
        # What grpcio raises for a failed call is an RpcError that is also a grpc.Call (the typing stubs
        # cannot say so): its code and details are containerd's answer.
        code_of, details_of = getattr(e, "code", None), getattr(e, "details", None)
        code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
        details = str((details_of() if callable(details_of) else str(e)) or "")
        # grpcio's own words when the channel cannot connect; anything else is containerd's answer,
        # passed on as it is (containerd's UNAVAILABLE for a snapshotter it cannot reach, say).
        if code is grpc.StatusCode.UNAVAILABLE and "failed to connect to all addresses" in details:
            details = f"damselfly's CRI proxy cannot reach containerd at {self.containerd}: {details}"
            log.error("%s: %s", method, details)
        context.abort(code, details)


def _forwarded(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    metadata = context.invocation_metadata()
    return tuple((k, v) for k, v in metadata if not k.lower().startswith(_TRANSPORT_METADATA))


def build_cri_server(proxy: CriProxy, address: str, workers: int = 8) -> grpc.Server:
    """A gRPC server (not yet started) for `proxy`, bound to the unix socket `address`, mode 0600 from
    the start: the kubelet runs as root, and nobody else may pull images or see what is pulled."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri"))
    server.add_generic_rpc_handlers((proxy,))
    try:
        with bind_privately(address) as private:
            port = server.add_insecure_port(f"unix:{private}")
            if port == 0:
                raise RuntimeError("bind failed")
    except (RuntimeError, OSError) as e:
        port, why = 0, str(e)
    if port == 0:
        raise SnapshotterError(
            f"cannot listen on the CRI socket {address} ([cri] listen): {why}; check that its directory "
            "exists and is writable"
        )
    return server
