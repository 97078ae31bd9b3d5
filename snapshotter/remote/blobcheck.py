"""Is a converted layer's blob there? A HEAD request with a short timeout, before the layer is recorded.

A pull of a converted image records each layer as a remote snapshot only once its blob answered a HEAD
(`BlobCheck.size`), so an unreachable registry is found at pull time, not when a container starts. A
positive answer is kept (a digest names immutable bytes); a failure marks the registry down for
`RemoteOptions.unreachable_cooldown` seconds, so a pull of a many-layer image from a dead registry
costs one timeout, not one per layer. Every failure is a `FallbackError` (the layer falls back).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from blockformat.digest import Digest
from p2p.auth import CredentialProvider
from p2p.errors import AuthError, P2PError, RegistryUnavailableError
from p2p.hosts import RegistrySettings, Resolver
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts

from .layers import FallbackError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteOptions:
    enabled: bool = True
    plain_http: bool = False  # HTTP for every registry; otherwise HTTP for loopback ones only
    check_timeout: float = 5.0
    unreachable_cooldown: float = 30.0
    prefetch: bool = True  # replay the image's access trace at the chain mount, if it has one
    registry: RegistrySettings = field(default_factory=RegistrySettings)  # mirrors, TLS, proxies


class BlobCheck:
    """HEAD a layer blob (its size) with a short timeout; a registry that failed is skipped for a while.

    A positive answer is kept (a digest names immutable bytes); a failure marks the registry down for
    `cooldown` seconds, so a pull of a many-layer image from a dead registry costs one timeout, not
    one per layer. `credentials`: the clients' provider (default: Docker's config.json; `serve` puts the
    credentials of CRI pulls first).
    """

    def __init__(self, options: RemoteOptions, credentials: CredentialProvider | None = None) -> None:
        self.options = options
        self.credentials = credentials
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}
        self._sizes: dict[tuple[str, str, str], int] = {}
        self._down: dict[str, tuple[float, str]] = {}  # registry -> (until, why)

    def _client(self, registry: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(registry)
            if client is None:
                t = self.options.check_timeout
                # The check goes where the device daemon's reads will: the same hosts.toml endpoints.
                client = Resolver(self.options.registry).client(
                    registry,
                    True if self.options.plain_http else None,
                    retry=RetryPolicy(attempts=2, budget=t, base_delay=0.1, max_delay=0.5),
                    timeouts=Timeouts(connect=t, read=t, write=t, pool=t, total=t),
                    credentials=self.credentials,
                )
                self._clients[registry] = client
            return client

    def size(self, registry: str, repository: str, digest: str) -> int:
        key = (registry, repository, digest)
        now = time.monotonic()
        with self._lock:
            if key in self._sizes:
                return self._sizes[key]
            down = self._down.get(registry)
            if down is not None and down[0] > now:
                raise FallbackError(
                    "unreachable",
                    f"registry {registry} failed a moment ago ({down[1]}); it is not asked again for "
                    f"{down[0] - now:.0f}s ([remote] unreachable_cooldown)",
                )
        try:
            size = self._client(registry).blob_size(repository, Digest(digest))
        except RegistryUnavailableError as e:
            with self._lock:
                self._down[registry] = (time.monotonic() + self.options.unreachable_cooldown, str(e))
            raise FallbackError("unreachable", f"registry {registry} is unreachable: {e}") from None
        except AuthError as e:  # no, wrong or insufficient credentials: the message says which
            raise FallbackError("auth", f"blob {digest} in {registry}/{repository}: {e}") from None
        except P2PError as e:
            raise FallbackError("source", f"blob {digest} in {registry}/{repository}: {e}") from None
        except Exception as e:  # a bug or an unmapped error must not fail the pull: fall back, loudly
            log.exception("checking blob %s in %s/%s failed unexpectedly", digest, registry, repository)
            raise FallbackError("unreachable", f"checking the blob failed unexpectedly: {e!r}") from None
        with self._lock:
            self._sizes[key] = size
            self._down.pop(registry, None)
        return size

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
