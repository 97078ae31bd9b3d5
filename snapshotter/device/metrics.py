"""The device daemon's Prometheus metrics, and the two ways out of the process.

The daemon has one registry: its node's (`p2p.nodemetrics.NodeMetrics`: fetches, their latency and
failures, verification failures, peers). `register` adds to it what the devices and the node cache
know — read when scraped, from the counters and accounting they keep anyway (`DeviceCollector`) —
and the daemon's process metrics. That registry is served

- at ``[device] metrics_address`` (``http://host:port/metrics``, off when empty) by the daemon itself,
  so it can be scraped while `damselfly serve` restarts (the daemon outlives it), and at the peer
  server's ``/metrics`` when the peer network is on;
- through the control socket (``{"op": "metrics"}`` → `dump`), which `damselfly serve` uses to add the
  daemon's metrics to its own ``[metrics] address`` endpoint (`DaemonMetrics`): one scrape target.

docs/observability.md lists every metric. The ones collected here (a read's
``source`` is ``cache`` when it needed no fetch, else the source that delivered most of the bytes it
waited for: `p2p.tally`):

| metric | type | labels | meaning |
|---|---|---|---|
| ``damselfly_read_bytes_total`` | counter | ``source``: cache, registry, peer | bytes of reads answered |
| ``damselfly_reads_total`` | counter | ``source`` | device reads answered with data |
| ``damselfly_read_failures_total`` | counter | ``kind``: timeout, error, cooldown | reads failed (EIO) |
| ``damselfly_read_wait_seconds`` | histogram | | seconds reads that needed the network took |
| ``damselfly_slow_reads_total`` | counter | | reads answered more than 10 s after they arrived |
| ``damselfly_reads_waiting_long`` | gauge | | reads waiting now, for more than 10 s |
| ``damselfly_devices`` | gauge | | devices attached |
| ``damselfly_blob_size_bytes`` | gauge | ``blob`` | size of each blob the devices read |
| ``damselfly_blob_local_bytes`` | gauge | ``blob`` | bytes of it verified in the node cache |
| ``damselfly_blob_complete`` | gauge | ``blob`` | 1 once the whole blob is in the cache and verified |
| ``damselfly_background_download`` | gauge | ``blob``, ``state`` | 1 for its background download's state |
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from p2p.background import State

from .fuse import READ_SOURCES

if TYPE_CHECKING:
    from .client import DeviceClient
    from .manager import DeviceManager

log = logging.getLogger(__name__)

#: The daemon's process metrics are ``damselfly_device_daemon_process_*`` (serve's are ``process_*``).
PROCESS_NAMESPACE = "damselfly_device_daemon"


class DeviceCollector(Collector):
    """The metrics of the devices and the node cache, read from `manager` when scraped."""

    def __init__(self, manager: DeviceManager) -> None:
        self.manager = manager

    def collect(self) -> Iterable[Metric]:
        m = self.manager
        fs = m.fs
        read_bytes = CounterMetricFamily(
            "damselfly_read_bytes",
            "Bytes of device reads answered, by source (cache: no wait; else who sent what it waited for)",
            labels=["source"],
        )
        reads = CounterMetricFamily(
            "damselfly_reads", "Device reads answered with data, by source", labels=["source"]
        )
        for source in READ_SOURCES:
            read_bytes.add_metric([source], fs.read_bytes[source])
            reads.add_metric([source], fs.reads[source])
        yield read_bytes
        yield reads
        failures = CounterMetricFamily(
            "damselfly_read_failures", "Device reads answered with EIO, by kind", labels=["kind"]
        )
        failures.add_metric(["timeout"], fs.timeouts)
        failures.add_metric(["error"], fs.errors)
        failures.add_metric(["cooldown"], fs.fast_failures)
        yield failures
        yield from fs.wait_seconds.collect()
        yield CounterMetricFamily(
            "damselfly_slow_reads",
            "Device reads answered more than 10 s after they arrived",
            value=fs.slow_reads,
        )
        yield GaugeMetricFamily(
            "damselfly_reads_waiting_long",
            "Device reads waiting now that arrived more than 10 s ago",
            value=fs.waiting_long(),
        )
        yield GaugeMetricFamily("damselfly_devices", "Devices attached", value=len(fs.devices()))
        yield from self._blobs()
        # The node cache's size, limit and evictions: ``damselfly_cache_*`` of the node's own
        # metrics (`p2p.nodemetrics`), in the same registry.

    def _blobs(self) -> Iterable[Metric]:
        size = GaugeMetricFamily(
            "damselfly_blob_size_bytes", "Size of a blob the devices read", labels=["blob"]
        )
        local = GaugeMetricFamily(
            "damselfly_blob_local_bytes", "Bytes of a blob verified in the node cache", labels=["blob"]
        )
        complete = GaugeMetricFamily(
            "damselfly_blob_complete", "1 once the whole blob is in the node cache, verified", labels=["blob"]
        )
        background = GaugeMetricFamily(
            "damselfly_background_download",
            "1 for the state a blob's background download is in",
            labels=["blob", "state"],
        )
        for b in self.manager.blob_states():
            size.add_metric([b.digest], b.size)
            if b.progress is None:  # a local file: all of it is here
                local.add_metric([b.digest], b.size)
                complete.add_metric([b.digest], 1)
            else:
                local.add_metric([b.digest], b.progress.present_bytes)
                complete.add_metric([b.digest], 1 if b.progress.complete else 0)
            if b.background is not None:
                for state in State:
                    background.add_metric([b.digest, state.value], 1 if b.background.state is state else 0)
        yield from (size, local, complete, background)


def register(manager: DeviceManager) -> CollectorRegistry:
    """Add the devices' and the process's metrics to the daemon's registry (its node's); return it."""
    registry = manager.node.metrics.registry
    registry.register(DeviceCollector(manager))
    ProcessCollector(namespace=PROCESS_NAMESPACE, registry=registry)
    return registry


# -- through the control socket --------------------------------------------------------------------


def dump(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """Every metric family of `registry`, as JSON-able dicts (the control socket's ``metrics`` reply)."""
    out = []
    for family in registry.collect():
        out.append(
            {
                "name": family.name,
                "documentation": family.documentation,
                "type": family.type,
                "unit": family.unit,
                "samples": [[s.name, s.labels, s.value] for s in family.samples],
            }
        )
    return out


def load(families: list[dict[str, Any]]) -> list[Metric]:
    """`dump`'s output as metric families again (exposed exactly as the daemon exposes them)."""
    out = []
    for f in families:
        metric = Metric(str(f["name"]), str(f["documentation"]), str(f["type"]), str(f.get("unit", "")))
        metric.samples = [
            Sample(str(n), {str(k): str(v) for k, v in labels.items()}, float(value))
            for n, labels, value in f["samples"]
        ]
        out.append(metric)
    return out


class DaemonMetrics(Collector):
    """The device daemon's metrics, asked over its control socket at every scrape of `damselfly serve`'s
    endpoint, plus ``damselfly_device_daemon_up`` (0 while no daemon answers: then nothing else)."""

    def __init__(self, client: DeviceClient, timeout: float = 5.0) -> None:
        self.client = client
        self.timeout = timeout

    def describe(self) -> Iterable[Metric]:
        """Nothing: the names are the daemon's (else registering would ask it, perhaps before it runs)."""
        return []

    def collect(self) -> Iterable[Metric]:
        families: list[Metric] = []
        try:
            reply = self.client.call({"op": "metrics"}, timeout=self.timeout)
            families = load(reply["metrics"])
        except Exception as e:  # no daemon (yet), or one that does not know the op: not a scrape error
            log.debug("no metrics from the device daemon: %s", e)
            up = 0
        else:
            up = 1
        yield GaugeMetricFamily(
            "damselfly_device_daemon_up", "1 when the device daemon answered this scrape", value=up
        )
        yield from families
