"""Shared fixtures: small chunk containers built by code, never checked-in binaries."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import pytest

from blockformat.chunkfile import BlobInfo, ChunkWriter


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
