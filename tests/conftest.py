"""Fixtures and builders every test package shares.

- Chunk containers and layers built by code, never checked-in binaries: `text_bytes`, `sample_blob`,
  `layer_blob` / `layer_reader` (a layer of data extents and zeroed ranges).
- Real docker-registry processes on loopback (`tests.p2p.registry_server.RegistryServer`, the demo's
  harness): `registry` (no auth) and `basic_registry` (htpasswd: alice and bob), one per test module,
  each stopped by pid and its directory removed when the module is done.
- Registry clients with short test bounds and no ambient credentials (`fast_client`): `pusher` (one per
  module, for `registry`), `make_client` (``make_client(host, **kwargs)``, closed after the test) and
  `client` (for `registry`).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from blockformat.chunkfile import BlobInfo, ChunkWriter
from blockformat.layer import LayerReader, LayerWriter
from blockformat.source import BytesSource
from p2p.auth import CredentialProvider, Credentials, static_credentials
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts
from tests.p2p.registry_server import RegistryServer, htpasswd_line

ALICE = Credentials("alice", "wonderland")  # may pull and push everywhere
BOB = Credentials("bob", "builder")  # may only pull

#: Short bounds so a failing test fails fast instead of waiting for production budgets.
FAST_RETRY = RetryPolicy(attempts=3, budget=10.0, base_delay=0.05, max_delay=0.5)
FAST_TIMEOUTS = Timeouts(connect=2.0, read=5.0, write=5.0, pool=2.0, total=20.0)

NO_CREDENTIALS: CredentialProvider = static_credentials({})


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible but not trivial bytes: pseudo-random words from a small vocabulary."""
    rng = random.Random(seed)
    words = [b"damselfly", b"chunk", b"layer", b"snapshot", b"index", b"trailer", b"zero", b"lz4"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" " + str(rng.randrange(100000)).encode() + b"\n"
    return bytes(out[:n])


@dataclass(frozen=True)
class SampleBlob:
    """A multi-chunk blob with every chunk kind: compressed, raw, zero, and a short last chunk."""

    data: bytes
    blob: bytes
    metadata: bytes
    chunk_size: int
    info: BlobInfo


def build_sample_blob() -> SampleBlob:
    cs = 4096
    data = b"".join(
        [
            text_bytes(cs, 1),  # chunk 0: compressed
            text_bytes(cs, 2),  # chunk 1: compressed
            random.Random(3).randbytes(cs),  # chunk 2: incompressible, stored raw
            bytes(cs),  # chunk 3: all zero, not stored
            text_bytes(cs, 4),  # chunk 4: compressed
            text_bytes(1000, 5),  # chunk 5: short last chunk, compressed
        ]
    )
    metadata = b'{"layer": "sample", "note": "metadata travels in the index"}'
    out = io.BytesIO()
    w = ChunkWriter(out, "lz4", cs)
    w.write(data)
    info = w.close(metadata)
    return SampleBlob(data, out.getvalue(), metadata, cs, info)


@pytest.fixture(scope="session")
def sample_blob() -> SampleBlob:
    return build_sample_blob()


# -- layers ---------------------------------------------------------------------------------------

#: (offset, data) for data, (offset, length) for a zeroed range; offsets increasing.
Extents = list[tuple[int, bytes | int]]


def layer_blob(extents: Extents, vsize: int, chunk_size: int = 4096, codec: str = "lz4") -> tuple[bytes, str]:
    """A layer blob of a `vsize`-byte device with `extents`, and its index digest."""
    out = io.BytesIO()
    w = LayerWriter(out, vsize, codec, chunk_size)
    for off, what in extents:
        if isinstance(what, int):
            w.add_zero(off, what)
        else:
            w.add_data(off, what)
    info = w.close()
    return out.getvalue(), info.index_digest


def layer_reader(extents: Extents, vsize: int, chunk_size: int = 4096, name: str = "layer") -> LayerReader:
    """`layer_blob`, opened from memory."""
    blob, index_digest = layer_blob(extents, vsize, chunk_size)
    return LayerReader(BytesSource(blob, name), index_digest)


# -- registries and clients -----------------------------------------------------------------------


def _module_name(request: pytest.FixtureRequest) -> str:
    name: str = request.module.__name__
    return name.rsplit(".", 1)[-1]


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest) -> Iterator[RegistryServer]:
    """A registry without authentication, shared by the tests of a module."""
    with RegistryServer(name=_module_name(request)) as server:
        yield server


@pytest.fixture(scope="module")
def basic_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """A registry with htpasswd (bcrypt) basic auth for alice and bob, shared by the tests of a module."""
    path = tmp_path_factory.mktemp("htpasswd") / "htpasswd"
    path.write_text(htpasswd_line(ALICE.username, ALICE.password) + htpasswd_line(BOB.username, BOB.password))
    auth = {"htpasswd": {"realm": "damselfly-test", "path": str(path)}}
    with RegistryServer(auth=auth, name=f"basic-{_module_name(request)}") as server:
        yield server


def fast_client(host: str, **kwargs: Any) -> RegistryClient:
    """A RegistryClient with the fast test bounds and no ambient credentials (`kwargs` override)."""
    kwargs.setdefault("plain_http", True)
    kwargs.setdefault("retry", FAST_RETRY)
    kwargs.setdefault("timeouts", FAST_TIMEOUTS)
    kwargs.setdefault("credentials", NO_CREDENTIALS)
    return RegistryClient(host, **kwargs)


@pytest.fixture(scope="module")
def pusher(registry: RegistryServer) -> Iterator[RegistryClient]:
    """A client for `registry`, shared by the tests of a module (to push their images)."""
    with fast_client(registry.host) as client:
        yield client


ClientFactory = Callable[..., RegistryClient]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """``make_client(host, **kwargs)``: a `fast_client`, closed after the test."""
    made: list[RegistryClient] = []

    def factory(host: str, **kwargs: Any) -> RegistryClient:
        client = fast_client(host, **kwargs)
        made.append(client)
        return client

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def client(registry: RegistryServer, make_client: ClientFactory) -> RegistryClient:
    """A client for the no-auth registry."""
    return make_client(registry.host)
