"""The node's Prometheus metrics (`p2p.node.BlobNode.metrics`), in a registry of the node's own that
the peer server exposes at ``/metrics`` (docs/p2p.md §7 lists them) and the device daemon at
``[device] metrics_address`` (docs/observability.md), and the node's last fetch errors (`RecentErrors`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Where bytes come from (the ``source`` label of the fetch metrics).
FETCH_SOURCES = ("registry", "peer")
#: Where a chunk that failed its check came from: a transport, or the node cache's own disk.
CORRUPT_SOURCES = ("registry", "peer", "cache")
#: Fetch latency buckets (seconds): a 64 KiB unit on loopback takes ~1 ms, 4 MiB over a WAN seconds.
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Errors `RecentErrors` keeps (the oldest go first).
RECENT_ERRORS = 32


@dataclass(frozen=True)
class ErrorEvent:
    """One failure, as `damselfly status` shows it."""

    time: float  # seconds since the epoch
    source: str  # registry, peer, read (a device read failed), read-timeout, document
    what: str  # the blob digest, or the device read (offset+length)
    message: str


class RecentErrors:
    """The last `size` fetch and read failures of the node, oldest first (a bounded ring)."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        self._ring: deque[ErrorEvent] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, source: str, what: str, message: str) -> None:
        with self._lock:
            self._ring.append(ErrorEvent(time.time(), source, what, message))

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(e) for e in self._ring]


class _CacheReads(Collector):
    """``damselfly_cache_read_bytes_total``: bytes read out of the node cache (by devices, and for
    uploads), summed from the open blobs' counters when scraped."""

    def __init__(self, total: Callable[[], float]) -> None:
        self.total = total

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("damselfly_cache_read_bytes", "Bytes read out of the node cache")
        family.add_metric([], self.total())
        yield family


class _CacheState(Collector):
    """The node cache within its limit (`p2p.cache.BlobCache.stats`), read when scraped:
    ``damselfly_cache_usage_bytes`` and ``damselfly_cache_limit_bytes`` (gauges), the blobs the limit
    keeps partial now (``damselfly_cache_limit_partial_blobs``) and ever
    (``damselfly_cache_limit_partial_total``), evictions, and the bytes reads got that the cache had
    no room to keep (``damselfly_cache_uncached_read_bytes_total``)."""

    def __init__(self, stats: Callable[[], Mapping[str, object]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        st = self.stats()

        def number(key: str) -> float:
            value = st.get(key, 0)
            return float(value) if isinstance(value, int | float) else 0.0

        partial = st.get("limit_partial_blobs", [])
        for name, doc, value in (
            ("damselfly_cache_usage_bytes", "Bytes the node cache takes on disk", number("usage_bytes")),
            ("damselfly_cache_limit_bytes", "The node cache's limit (0: none)", number("limit_bytes")),
            (
                "damselfly_cache_limit_partial_blobs",
                "Open blobs the cache limit keeps partial",
                float(len(partial)) if isinstance(partial, list) else 0.0,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge
        for name, doc, key in (
            ("damselfly_cache_limit_partial", "Blobs the cache limit kept partial", "limit_partial_total"),
            ("damselfly_cache_evictions", "Blobs evicted from the node cache", "evictions"),
            ("damselfly_cache_evicted_bytes", "Bytes evicted from the node cache", "evicted_bytes"),
            (
                "damselfly_cache_uncached_reads",
                "Reads served with units the cache could not keep",
                "uncached_reads",
            ),
            ("damselfly_cache_uncached_read_bytes", "Bytes of those units", "uncached_bytes"),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], number(key))
            yield counter


class _Corrupt(Collector):
    """``damselfly_corrupt_chunks_total``: structures (chunks, an index, a header) that failed their
    check, by where they came from — a transport (counted here, `inc`) or the node cache's disk (its
    repairs, read when scraped)."""

    def __init__(self, cache_repairs: Callable[[], int]) -> None:
        self.cache_repairs = cache_repairs
        self._counts = dict.fromkeys(FETCH_SOURCES, 0)
        self._lock = threading.Lock()

    def inc(self, source: str) -> None:
        with self._lock:
            self._counts[source] = self._counts.get(source, 0) + 1

    def value(self, source: str) -> int:
        if source == "cache":
            return self.cache_repairs()
        with self._lock:
            return self._counts.get(source, 0)

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "damselfly_corrupt_chunks",
            "Structures (chunks, index, header) that failed verification, by where they came from",
            labels=["source"],
        )
        for source in CORRUPT_SOURCES:
            family.add_metric([source], self.value(source))
        yield family


class NodeMetrics:
    """The node's counters, in its own registry (exposed at the peer server's ``/metrics``)."""

    def __init__(
        self,
        cache_reads: Callable[[], float] = lambda: 0.0,
        cache_stats: Callable[[], Mapping[str, object]] | None = None,
        cache_repairs: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_CacheReads(cache_reads))
        if cache_stats is not None:
            r.register(_CacheState(cache_stats))
        self.fetched = Counter(
            "damselfly_fetched_bytes", "Bytes fetched into the node cache, by source", ["source"], registry=r
        )
        self.uploaded = Counter("damselfly_peer_upload_bytes", "Bytes served to peers", registry=r)
        self.upload_refused = Counter(
            "damselfly_peer_upload_refused", "Peer requests refused, by reason", ["reason"], registry=r
        )
        self.peer_errors = Counter(
            "damselfly_peer_errors", "Failed fetches from peers, by kind", ["kind"], registry=r
        )
        self.for_peers = Counter(
            "damselfly_fetched_for_peers_bytes",
            "Bytes fetched into the node cache to answer a peer, by source",
            ["source"],
            registry=r,
        )
        self.demotions = Counter("damselfly_peer_demotions", "Peers demoted", registry=r)
        self.bad_bytes = Counter(
            "damselfly_peer_bad_bytes", "Fetches from peers whose bytes failed verification", registry=r
        )
        self.fetch_seconds = Histogram(
            "damselfly_fetch_seconds",
            "Seconds one successful fetch of a range took, by source",
            ["source"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.fetch_failures = Counter(
            "damselfly_fetch_failures",
            "Fetches of a range or document that failed, by source",
            ["source"],
            registry=r,
        )
        self.corrupt = _Corrupt(cache_repairs)
        r.register(self.corrupt)
        for source in FETCH_SOURCES:  # every series exists from the start, at 0
            self.fetched.labels(source)
            self.fetch_seconds.labels(source)
            self.fetch_failures.labels(source)
        self.errors = RecentErrors()

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name + "_total", labels)
        return 0.0 if v is None else v
