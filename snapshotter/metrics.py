"""Prometheus metrics of `damselfly serve`, and the optional HTTP endpoint that exposes them.

One registry for the process (`REGISTRY`), so tests and embedders never collide with the default
one. The endpoint is off unless the config names an address (``[metrics] address = "host:port"``);
it serves ``/metrics`` in the text exposition format from a daemon thread.

| metric | type | labels | meaning |
|---|---|---|---|
| ``damselfly_remote_layers_total`` | counter | | converted layers recorded as remote snapshots |
| ``damselfly_remote_fallbacks_total`` | counter | ``reason`` | converted layers left to a normal pull |
| ``damselfly_chain_mounts`` | gauge | | read-only ext4 mounts of converted chains that exist now |
| ``damselfly_chain_mount_seconds`` | histogram | | attach + loop + mount of one chain |
| ``damselfly_chain_releases_total`` | counter | ``result`` | chain mounts released (unmounted and detached) |

`damselfly serve` adds the device daemon's metrics to this endpoint, asked over its control socket at
each scrape (`snapshotter.device.metrics.DaemonMetrics`; docs/observability.md lists them).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from .errors import SnapshotterError

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: Why a converted layer fell back to a normal pull (the ``reason`` label of the fallback counter).
FALLBACK_REASONS = ("labels", "source", "unreachable", "parent", "name-taken", "disabled")

REMOTE_LAYERS = Counter(
    "damselfly_remote_layers",
    "Converted layers recorded as remote snapshots (containerd skips fetching them).",
    registry=REGISTRY,
)
REMOTE_FALLBACKS = Counter(
    "damselfly_remote_fallbacks",
    "Converted layers that fell back to containerd's normal pull, by reason.",
    ["reason"],
    registry=REGISTRY,
)
for _reason in FALLBACK_REASONS:
    REMOTE_FALLBACKS.labels(reason=_reason)  # every series exists from the start, at 0

CHAIN_MOUNTS = Gauge(
    "damselfly_chain_mounts",
    "Read-only ext4 mounts of converted layer chains (one shared by every container of a chain).",
    registry=REGISTRY,
)
CHAIN_MOUNT_SECONDS = Histogram(
    "damselfly_chain_mount_seconds",
    "Seconds to attach a chain's device and mount its ext4 read-only.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
CHAIN_RELEASES = Counter(
    "damselfly_chain_releases",
    "Chain mounts released after their last user went (result: ok or failed).",
    ["result"],
    registry=REGISTRY,
)


class MetricsServer:
    """The ``/metrics`` endpoint of `registry` on a TCP address; `close` stops it. `key` names the
    config key of the address in messages."""

    def __init__(
        self, address: str, registry: CollectorRegistry = REGISTRY, key: str = "[metrics] address"
    ) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            self._server, self._thread = start_http_server(int(port), host, registry)
        except (OSError, ValueError) as e:
            raise SnapshotterError(
                f"cannot serve metrics on {address}: {e}; choose a free host:port for {key}"
            ) from None
        self.address = address

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        server: WSGIServer = self._server
        server.shutdown()
        server.server_close()
        thread: threading.Thread = self._thread
        thread.join(5)
