"""The registry as a range source: blockformat's ChunkReader reading lazily from a real registry."""

from __future__ import annotations

import io
import os
import random

import pytest

from blockformat.chunkfile import ChunkReader, pack_file
from blockformat.digest import digest_of
from blockformat.errors import CorruptBlobError, SourceError
from blockformat.source import RangeSource
from p2p.blobsource import RegistryBlobSource
from p2p.errors import NotFoundError
from p2p.registry import RegistryClient

from .registry_server import RegistryServer

CHUNK = 64 * 1024


def _payload(size: int, seed: int) -> bytes:
    """Compressible but varied data, with an all-zero stretch (stored as nothing)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    out[size // 3 : size // 3 + 3 * CHUNK] = bytes(3 * CHUNK)
    return bytes(out[:size])


def _pack(data: bytes) -> bytes:
    out = io.BytesIO()
    pack_file(io.BytesIO(data), out, codec="lz4", chunk_size=CHUNK)
    return out.getvalue()


def test_chunk_reader_reads_ranges_lazily_from_the_registry(client: RegistryClient, repo: str) -> None:
    data = _payload(3 * 1024 * 1024 + 12345, seed=1)
    blob = _pack(data)
    pushed = client.push_blob(repo, blob)

    source = RegistryBlobSource(client, repo, pushed.digest, pushed.size)
    assert isinstance(source, RangeSource)
    reader = ChunkReader(source)
    assert source.requests <= 2  # the tail (trailer + index) in at most two ranged GETs
    opened, fetched = source.requests, source.bytes_fetched

    # Lazy: 100 bytes in the middle cost one ranged GET of that one chunk's stored bytes.
    middle = 2 * 1024 * 1024 + 7
    assert reader.read(middle, 100) == data[middle : middle + 100]
    assert source.requests == opened + 1
    assert source.bytes_fetched - fetched == reader.chunk_range(middle // CHUNK)[1] <= CHUNK

    rng = random.Random(2)
    for _ in range(30):
        offset = rng.randrange(len(data))
        length = rng.randint(1, 300_000)
        assert reader.read(offset, length) == data[offset : offset + length]
    assert reader.read(len(data) - 5, 100) == data[-5:]


def test_size_is_learned_with_a_head_request(client: RegistryClient, repo: str) -> None:
    blob = _pack(_payload(200_000, seed=3))
    digest = client.push_blob(repo, blob).digest
    source = RegistryBlobSource(client, repo, digest)
    assert source.size() == len(blob)
    assert source.name.endswith(f"{repo}@{digest}")
    assert source.read(len(blob) - 3, 10) == blob[-3:]  # short only at the end, as the protocol says
    assert source.read(len(blob) + 5, 10) == b""


def test_missing_blob_is_a_source_error_caused_by_not_found(client: RegistryClient, repo: str) -> None:
    source = RegistryBlobSource(client, repo, digest_of(b"not there"), 100)
    with pytest.raises(SourceError) as e:
        source.read(0, 10)
    assert isinstance(e.value.__cause__, NotFoundError)
    assert digest_of(b"not there") in str(e.value)


def test_corrupted_chunk_in_the_registry_is_never_returned(
    client: RegistryClient, registry: RegistryServer, repo: str
) -> None:
    data = _payload(1024 * 1024, seed=int.from_bytes(os.urandom(4), "big"))  # unique: corrupted below
    blob = _pack(data)
    pushed = client.push_blob(repo, blob)
    reader = ChunkReader(RegistryBlobSource(client, repo, pushed.digest, pushed.size))
    offset, _ = reader.chunk_range(1)
    path = registry.blob_data_path(pushed.digest)
    raw = bytearray(path.read_bytes())
    raw[offset + 7] ^= 0x01
    path.write_bytes(bytes(raw))

    assert reader.read(0, 100) == data[:100]  # chunk 0 is intact
    with pytest.raises(CorruptBlobError) as e:
        reader.read(CHUNK + 10, 100)
    assert "chunk 1" in str(e.value)
