"""Faults injected between the client and the real registry: every read returns exactly the right bytes
or fails with a clear error within a bounded time."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator

import pytest

from blockformat.chunkfile import ChunkReader, pack_file
from blockformat.digest import Digest
from blockformat.errors import CorruptBlobError
from p2p.blobsource import RegistryBlobSource
from p2p.errors import DigestMismatchError, RegistryUnavailableError
from p2p.manifest import OCI_MANIFEST
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts

from .conftest import ClientFactory
from .faultproxy import Fault, FaultProxy
from .images import make_image
from .registry_server import RegistryServer

TIMEOUTS = Timeouts(connect=1.0, read=0.5, write=2.0, pool=1.0, total=5.0)
RETRY = RetryPolicy(attempts=4, budget=10.0, base_delay=0.05, max_delay=0.2)


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def faulty(proxy: FaultProxy, make_client: ClientFactory) -> RegistryClient:
    return make_client(proxy.host, timeouts=TIMEOUTS, retry=RETRY)


@pytest.fixture
def blob(faulty: RegistryClient, repo: str) -> tuple[bytes, Digest]:
    data = os.urandom(400_000)
    return data, faulty.push_blob(repo, data).digest


def test_connection_reset_mid_body_is_retried(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    data, digest = blob
    proxy.add(Fault("reset", method="GET"), Fault("reset", method="GET"))
    assert faulty.get_blob(repo, digest) == data
    assert faulty.read_blob_range(repo, digest, 1000, 200_000) == data[1000:201_000]
    assert proxy.faults_applied("reset") == 2


def test_5xx_is_retried(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    data, digest = blob
    proxy.add(Fault("status", method="GET", status=500, times=2), Fault("status", method="GET", status=502))
    assert faulty.read_blob_range(repo, digest, 5, 10) == data[5:15]
    assert proxy.faults_applied("status") == 3


def test_429_waits_for_retry_after(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    data, digest = blob
    proxy.add(Fault("status", method="GET", status=429, retry_after="1"))
    start = time.monotonic()
    assert faulty.read_blob_range(repo, digest, 0, 100) == data[:100]
    assert 1.0 <= time.monotonic() - start < 3.0


def test_persistent_503_fails_within_the_budget(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    _, digest = blob
    proxy.add(Fault("status", method="GET", status=503, times=100))
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as e:
        faulty.read_blob_range(repo, digest, 0, 100)
    assert e.value.attempts == RETRY.attempts and e.value.status == 503
    assert time.monotonic() - start < 2.0


def test_stalled_response_times_out_and_the_retry_succeeds(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    data, digest = blob
    proxy.add(Fault("stall", method="GET", seconds=10))
    start = time.monotonic()
    assert faulty.get_blob(repo, digest) == data
    assert time.monotonic() - start < TIMEOUTS.read + 2.0
    assert proxy.faults_applied("stall") == 1


def test_wrong_bytes_in_a_whole_blob_are_rejected(
    faulty: RegistryClient, proxy: FaultProxy, repo: str, blob: tuple[bytes, Digest]
) -> None:
    _, digest = blob
    proxy.add(Fault("corrupt", method="GET"))
    with pytest.raises(DigestMismatchError) as e:
        faulty.get_blob(repo, digest)
    assert e.value.expected == digest


def test_wrong_bytes_in_a_range_never_reach_a_chunk_reader(
    faulty: RegistryClient, proxy: FaultProxy, repo: str
) -> None:
    data = os.urandom(50_000) * 8  # compressible: chunks are stored compressed
    out = io.BytesIO()
    pack_file(io.BytesIO(data), out, chunk_size=64 * 1024)
    pushed = faulty.push_blob(repo, out.getvalue())
    reader = ChunkReader(RegistryBlobSource(faulty, repo, pushed.digest, pushed.size), cache_chunks=0)
    assert reader.read(70_000, 1000) == data[70_000:71_000]

    proxy.add(Fault("corrupt", method="GET"))
    with pytest.raises(CorruptBlobError):
        reader.read(200_000, 1000)
    assert reader.read(200_000, 1000) == data[200_000:201_000]  # the next read fetches good bytes


def test_upload_cut_off_midway_is_not_replayed_and_a_new_push_succeeds(
    faulty: RegistryClient, proxy: FaultProxy, repo: str
) -> None:
    data = os.urandom(100_000)
    proxy.add(Fault("drop", path_contains="/blobs/uploads/", method="PATCH"))
    with pytest.raises(RegistryUnavailableError) as e:
        faulty.push_blob(repo, data, chunk_size=30_000)
    assert "not retried" in str(e.value)
    result = faulty.push_blob(repo, data, chunk_size=30_000)
    assert result.how == "uploaded" and faulty.get_blob(repo, result.digest) == data


def test_manifest_put_is_retried_after_a_500(faulty: RegistryClient, proxy: FaultProxy, repo: str) -> None:
    image = make_image([os.urandom(10)])
    faulty.push_blob(repo, image.config)
    faulty.push_blob(repo, image.layers[0])
    proxy.add(Fault("status", path_contains="/manifests/", method="PUT", status=500))
    assert faulty.push_manifest(repo, image.manifest, OCI_MANIFEST, "v1") == image.manifest_digest
    assert faulty.get_manifest(repo, "v1").raw == image.manifest
