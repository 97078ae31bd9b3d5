"""The node's Prometheus counters (`p2p.node.BlobNode.metrics`), in a registry of the node's own that
the peer server exposes at ``/metrics`` (docs/p2p.md §7 lists them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


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


class NodeMetrics:
    """The node's counters, in its own registry (exposed at the peer server's ``/metrics``)."""

    def __init__(
        self,
        cache_reads: Callable[[], float] = lambda: 0.0,
        cache_stats: Callable[[], Mapping[str, object]] | None = None,
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

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name + "_total", labels)
        return 0.0 if v is None else v
