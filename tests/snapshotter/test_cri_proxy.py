"""The CRI image-service proxy against a stand-in for containerd's CRI socket (a gRPC server in this
process that records the bytes it gets): calls are forwarded byte for byte, answers and errors come
back as the upstream gave them, and a PullImage's credentials are kept for its repository before the
call goes on. The real containerd is tests/e2e/test_cri_credentials.py's."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from p2p.auth import Credentials
from p2p.keychain import Keychain
from snapshotter.api.runtime.v1 import api_pb2 as cri
from snapshotter.api.runtime.v1 import api_pb2_grpc as cri_grpc
from snapshotter.service.cri import CredentialKeeper, CriProxy, build_cri_server

IMAGE = "registry.example:5000/team/app:1.0"


@dataclass
class Upstream(grpc.GenericRpcHandler):
    """containerd's CRI socket as the proxy sees it: records (method, request bytes, metadata)."""

    seen: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    shared_before: list[bool] = field(default_factory=list)
    keychain: Keychain | None = None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = details.method
        if method.endswith("/StreamImages"):
            return grpc.unary_stream_rpc_method_handler(lambda raw, ctx: self._stream(method, raw, ctx))
        return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: self._unary(method, raw, ctx))

    def _record(self, method: str, raw: bytes, ctx: grpc.ServicerContext) -> None:
        self.seen.append((method, raw, {k: str(v) for k, v in ctx.invocation_metadata()}))
        if self.keychain is not None:
            self.shared_before.append(
                self.keychain.for_repository("registry.example:5000", "team/app") is not None
            )

    def _unary(self, method: str, raw: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._record(method, raw, ctx)
        if method.endswith("/RemoveImage"):
            ctx.abort(grpc.StatusCode.NOT_FOUND, "image not here")
        if method.endswith("/PullImage"):
            return cri.PullImageResponse(image_ref="sha256:" + "c" * 64).SerializeToString()
        return cri.ListImagesResponse(images=[cri.Image(id="sha256:x", size=7)]).SerializeToString()

    def _stream(self, method: str, raw: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        self._record(method, raw, ctx)
        for i in range(3):
            yield cri.StreamImagesResponse(images=[cri.Image(id=f"sha256:{i}")]).SerializeToString()


@dataclass
class Lab:
    upstream: Upstream
    keychain: Keychain
    shared: list[tuple[str, str]]
    stub: cri_grpc.ImageServiceStub
    channel: grpc.Channel


@pytest.fixture
def lab() -> Iterator[Lab]:
    directory = Path(tempfile.mkdtemp(prefix="dfly-cri-", dir="/tmp"))
    keychain = Keychain()
    upstream = Upstream(keychain=keychain)
    containerd = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    containerd.add_generic_rpc_handlers((upstream,))
    containerd.add_insecure_port(f"unix:{directory / 'containerd.sock'}")
    containerd.start()
    shared: list[tuple[str, str]] = []
    proxy = CriProxy(
        str(directory / "containerd.sock"),
        CredentialKeeper(keychain, lambda registry, repo: shared.append((registry, repo))),
    )
    server = build_cri_server(proxy, str(directory / "cri.sock"))
    server.start()
    channel = grpc.insecure_channel(f"unix:{directory / 'cri.sock'}")
    try:
        yield Lab(upstream, keychain, shared, cri_grpc.ImageServiceStub(channel), channel)
    finally:
        channel.close()
        server.stop(None).wait()
        proxy.close()
        containerd.stop(None).wait()
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


def test_pull_is_forwarded_byte_for_byte_after_its_credentials_are_kept(lab: Lab) -> None:
    request = cri.PullImageRequest(
        image=cri.ImageSpec(image=IMAGE, annotations={"a": "b"}),
        auth=cri.AuthConfig(username="alice", password="s3cret"),
        sandbox_config=cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name="p", uid="u")),
    )
    raw = request.SerializeToString() + b"\x4a\x02\x08\x01"  # field 9: one this proto does not declare
    pull = lab.channel.unary_unary("/runtime.v1.ImageService/PullImage")
    answer = pull(raw, timeout=10, metadata=(("x-kubelet", "1"),))
    assert cri.PullImageResponse.FromString(answer).image_ref == "sha256:" + "c" * 64
    [(method, got, metadata)] = lab.upstream.seen
    assert (method, got) == ("/runtime.v1.ImageService/PullImage", raw)  # unknown fields too
    assert metadata.get("x-kubelet") == "1"
    assert lab.upstream.shared_before == [True]  # kept before containerd pulled (and Prepared)
    assert lab.keychain.for_repository("registry.example:5000", "team/app") == Credentials("alice", "s3cret")
    assert lab.keychain.for_repository("registry.example:5000", "team/other") is None
    assert lab.shared == [("registry.example:5000", "team/app")]


def test_pull_without_credentials_keeps_what_an_earlier_pull_kept(lab: Lab) -> None:
    lab.keychain.put("registry.example:5000", "team/app", Credentials("alice", "1"))
    lab.stub.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE)), timeout=10)
    lab.stub.PullImage(
        cri.PullImageRequest(
            image=cri.ImageSpec(image=IMAGE), auth=cri.AuthConfig(server_address="other.example")
        ),
        timeout=10,
    )
    assert lab.keychain.for_repository("registry.example:5000", "team/app") == Credentials("alice", "1")
    assert len(lab.upstream.seen) == 2 and lab.shared == []


def test_a_malformed_auth_is_not_kept_and_the_pull_still_goes_to_containerd(lab: Lab) -> None:
    request = cri.PullImageRequest(image=cri.ImageSpec(image=IMAGE), auth=cri.AuthConfig(auth="!!"))
    lab.stub.PullImage(request, timeout=10)
    unparsable = b"\x0a\xff"  # a truncated field: not a PullImageRequest
    pull = lab.channel.unary_unary("/runtime.v1.ImageService/PullImage")
    pull(unparsable, timeout=10)
    assert len(lab.keychain) == 0
    assert [raw for _, raw, _ in lab.upstream.seen][-1] == unparsable


def test_errors_streams_and_other_calls_come_back_as_containerd_gave_them(lab: Lab) -> None:
    listed = lab.stub.ListImages(cri.ListImagesRequest(), timeout=10)
    assert [(i.id, i.size) for i in listed.images] == [("sha256:x", 7)]
    streamed = list(lab.stub.StreamImages(cri.StreamImagesRequest(), timeout=10))
    assert [s.images[0].id for s in streamed] == ["sha256:0", "sha256:1", "sha256:2"]
    with pytest.raises(grpc.RpcError) as e:
        lab.stub.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=IMAGE)), timeout=10)
    assert e.value.code() is grpc.StatusCode.NOT_FOUND and e.value.details() == "image not here"
    version = lab.channel.unary_unary("/runtime.v1.RuntimeService/Version")
    with pytest.raises(grpc.RpcError) as e:
        version(b"", timeout=10)
    assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED  # only the image service is ours to proxy


def test_containerd_unreachable_is_unavailable_and_named() -> None:
    directory = Path(tempfile.mkdtemp(prefix="dfly-cri-", dir="/tmp"))
    proxy = CriProxy(str(directory / "no-containerd.sock"), CredentialKeeper(Keychain()))
    server = build_cri_server(proxy, str(directory / "cri.sock"))
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{directory / 'cri.sock'}") as channel:
            stub = cri_grpc.ImageServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "cannot reach containerd at" in (e.value.details() or "")
    finally:
        server.stop(None).wait()
        proxy.close()
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()
