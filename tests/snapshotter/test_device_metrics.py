"""The device daemon's metrics as `damselfly serve` re-exposes them (`snapshotter.device.metrics`): the
control socket's JSON form gives back exactly what the daemon's own endpoint shows."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from snapshotter.config import ConfigError, parse
from snapshotter.device.client import DeviceClient
from snapshotter.device.metrics import DaemonMetrics, dump, load


class _Replay(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def test_metrics_sent_over_the_control_socket_read_back_exactly() -> None:
    daemon = CollectorRegistry()
    Counter("damselfly_read_bytes", "by source", ["source"], registry=daemon).labels("registry").inc(4096)
    Gauge("damselfly_blob_local_bytes", "local", ["blob"], registry=daemon).labels("sha256:ab").set(65536)
    h = Histogram("damselfly_fetch_seconds", "latency", ["source"], buckets=(0.1, 1), registry=daemon)
    h.labels("registry").observe(0.05)
    h.labels("registry").observe(3)
    serve = CollectorRegistry()
    serve.register(_Replay(load(dump(daemon))))
    assert generate_latest(serve) == generate_latest(daemon)


def test_without_a_daemon_serve_exposes_only_that_it_is_down(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(DaemonMetrics(DeviceClient(str(tmp_path / "nobody")), timeout=1))
    assert registry.get_sample_value("damselfly_device_daemon_up") == 0
    assert registry.get_sample_value("damselfly_read_bytes_total", {"source": "cache"}) is None


def test_the_daemons_metrics_address_is_checked_like_serves() -> None:
    assert parse("[device]\nmetrics_address = '127.0.0.1:9465'").device.metrics_address == "127.0.0.1:9465"
    assert parse("").device.metrics_address == ""
    try:
        parse("[device]\nmetrics_address = 'localhost'")
    except ConfigError as e:
        assert "device.metrics_address must be host:port" in str(e)
    else:
        raise AssertionError("a metrics address without a port was accepted")
