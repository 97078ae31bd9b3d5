"""The peer protocol on the wire: what a node asks another for, and how (docs/p2p.md §Protocol).

One request shape, a signed HTTP ``GET`` of a byte range of a blob by digest::

    GET /v1/blobs/sha256:<hex>?size=N&index=sha256:<hex>&registry=HOST&repository=NAME
    Range: bytes=A-B
    x-damselfly-hops: 198.18.0.11:8470,198.18.0.12:8470      the nodes the request already passed
    x-damselfly-deadline: 12.500                               seconds the requester still waits
    x-damselfly-to: 198.18.0.13:8470                           the member it is for
    x-damselfly-date / -nonce / -signature                     p2p.peerauth

answered ``206`` with exactly those bytes (every unit of them verified on the answering node). With
``&document=1`` (an image config: at most 4 MiB, no Range) the whole blob is answered ``200``, checked
against its digest on every node it passes. Or:
``401`` signature missing, wrong, stale or replayed; ``400``/``416`` a malformed request or range;
``403`` the node does not fetch this blob's registry for peers; ``503`` + ``Retry-After`` too many
uploads at once; ``502`` its own upstreams failed; ``504`` the deadline came first.

``GET /v1/health`` (signed) answers ``200`` with the node's id: the health checks. ``GET /metrics`` is
the node's Prometheus metrics (unsigned, like any exporter: counters only, no blob names).

The blob's size, index digest and origin travel with each request so that a node that never saw the
blob can open it in its cache, fetch it from its own parent (or, at the root, from the registry) and
verify every chunk against the index before it passes a byte on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlencode

from blockformat.chunklayout import MAX_BLOB_SIZE
from blockformat.digest import Digest

BLOBS_PATH = "/v1/blobs/"
HEALTH_PATH = "/v1/health"
METRICS_PATH = "/metrics"
HOPS_HEADER = "x-damselfly-hops"
DEADLINE_HEADER = "x-damselfly-deadline"
NODE_HEADER = "x-damselfly-node"
#: The member a request is for (signed): a request captured on its way to one node is refused by
#: every other (a replay elsewhere within the clock window).
TO_HEADER = "x-damselfly-to"
#: The longest range one request may ask for (background downloads ask for ~4 MiB).
MAX_RANGE = 16 << 20
#: The longest hops list a request may carry (a tree deeper than this is a loop).
MAX_HOPS = 32

_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{1,19})$")


@dataclass(frozen=True)
class BlobRef:
    """A blob as the peer network names it: digest and size, the index digest its chunks are checked
    against, and where it comes from (the registry and repository a root fetches it from)."""

    digest: Digest
    size: int
    index_digest: str | None
    registry: str | None = None
    repository: str | None = None
    #: A small blob handed over whole (an image config), not a chunk container read by ranges: it is
    #: verified against its digest on every node it passes (`BlobNode.document`).
    document: bool = False

    @property
    def has_origin(self) -> bool:
        return self.registry is not None and self.repository is not None

    def target(self) -> str:
        """The request target (path and query) for this blob: what the signature covers."""
        query: dict[str, str] = {"size": str(self.size)}
        if self.index_digest is not None:
            query["index"] = self.index_digest
        if self.registry is not None and self.repository is not None:
            query["registry"] = self.registry
            query["repository"] = self.repository
        if self.document:
            query["document"] = "1"
        return f"{BLOBS_PATH}{self.digest}?{urlencode(query)}"


def range_header(offset: int, length: int) -> str:
    return f"bytes={offset}-{offset + length - 1}"


def parse_range(value: str, size: int) -> tuple[int, int]:
    """``bytes=A-B`` -> (offset, length) inside a blob of `size` bytes; ValueError otherwise."""
    m = _RANGE.match(value.strip())
    if m is None:
        raise ValueError(f"the Range must be one 'bytes=A-B', not {value[:80]!r}")
    first, last = int(m.group(1)), int(m.group(2))
    if last < first or last >= size:
        raise ValueError(f"range {first}-{last} is outside the blob's {size} bytes")
    if last - first + 1 > MAX_RANGE:
        raise ValueError(f"range {first}-{last} is longer than {MAX_RANGE} bytes")
    return first, last - first + 1


def parse_size(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) <= MAX_BLOB_SIZE:
        raise ValueError(f"size must be a number of bytes in 1..{MAX_BLOB_SIZE}, not {value[:40]!r}")
    return int(value)


def parse_hops(value: str) -> list[str]:
    hops = [h for h in value.split(",") if h] if value else []
    if len(hops) > MAX_HOPS:
        raise ValueError(f"the request passed {len(hops)} nodes (at most {MAX_HOPS}): a loop")
    return hops
