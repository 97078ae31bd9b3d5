"""The node's Prometheus counters (`p2p.node.BlobNode.metrics`), in a registry of the node's own that
the peer server exposes at ``/metrics`` (docs/p2p.md §7 lists them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, Metric
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


class NodeMetrics:
    """The node's counters, in its own registry (exposed at the peer server's ``/metrics``)."""

    def __init__(self, cache_reads: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_CacheReads(cache_reads))
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
