"""The peer network's settings: the ``[p2p]`` table of the config file (docs/p2p.md).

This dataclass *is* the table: `snapshotter.config` parses ``[p2p]`` into it (unknown keys and wrong
types refused), `damselfly config` prints it, `damselfly serve` hands it to the device daemon it starts
(`to_json`/`from_json`), and `p2p.node.BlobNode` runs with it. Its defaults are the one place of them.

With ``enabled = false`` (the default) or no peers at all, a node fetches every missing byte from the
registry itself, exactly as a node without the peer network does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: The node cache's fetch unit, 64 KiB: a cold 4 KiB read moves 3-7x less than with 1 MiB units, and the
#: background download still streams in ~4 MiB requests (scripts/bench_fetch.py, bench/results/fetch.md).
DEFAULT_UNIT_SIZE = 64 << 10
#: Seconds an upstream that failed is not asked again (except by one probe after it).
DEFAULT_COOLDOWN = 5.0

#: The peer server's port when `listen` names none, and the port of DNS A/AAAA answers.
DEFAULT_PORT = 8470


@dataclass(frozen=True)
class P2PSettings:
    #: Serve peers and fetch from them. Off: every missing byte comes from the registry.
    enabled: bool = False
    #: ``IP:PORT`` the peer server listens on (``0.0.0.0:8470`` for every address).
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    #: ``IP:PORT`` other nodes reach this one at: its id in every blob's tree (default: `listen`,
    #: which must then name a concrete address).
    advertise: str = ""
    #: Static members, ``IP:PORT`` each; this node's own address may be among them.
    peers: list[str] = field(default_factory=list)
    #: A DNS name whose SRV records (or else A/AAAA records, with `dns_port`) are members: a
    #: Kubernetes headless Service in front of a DaemonSet.
    dns: str = ""
    dns_port: int = 0  # 0: the port of `advertise`
    dns_server: str = ""  # ``IP:PORT`` of the resolver to ask (default: /etc/resolv.conf's)
    dns_interval: float = 30.0  # seconds between two DNS refreshes
    #: Children per node in a blob's tree (the parent of rank i is rank (i-1)//fanout). 2: measured at
    #: N = 8 (bench/results/p2p.md), 1.6x faster than 3 and 12% behind a chain (1), whose depth is N.
    fanout: int = 2
    #: Members preferred as roots of every tree (for example nodes next to the registry).
    seeds: list[str] = field(default_factory=list)
    #: The cluster secret (a file of at least 16 bytes, root's, mode 0600): every peer request is
    #: signed with it, and a request without a valid signature is refused before any work.
    secret_file: str = ""
    #: Registries (``host[:port]``) this node fetches from on a peer's behalf, besides those its own
    #: devices read from: a blob's root asks its registry for the whole tree. ``["*"]``: any host a
    #: peer names — only for fleets that share their registry credentials (docs/p2p.md, threat model).
    registries: list[str] = field(default_factory=list)
    #: Concurrent uploads to peers; past it a request gets 503 with Retry-After.
    upload_limit: int = 16
    #: Seconds one peer request may take (a read's own deadline cuts it shorter).
    timeout: float = 10.0
    #: Seconds a peer that failed (refused, timed out, errored, sent wrong bytes) is skipped.
    demote_seconds: float = 30.0
    #: Seconds between two health checks of each member (a member that fails one is routed around).
    health_interval: float = 5.0
    #: Seconds a signed request's timestamp may differ from this node's clock.
    clock_skew: float = 30.0
    #: TLS between peers (all three, or none): this node's certificate and key, and the CA that signs
    #: every member's certificate (peers are then verified both ways).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> P2PSettings:
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the p2p settings are a JSON object")
        return cls(**data)

    @property
    def node_id(self) -> str:
        """This node's address in every tree: `advertise`, else `listen`."""
        return self.advertise or self.listen

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty: nothing), each a sentence naming the key."""
        out: list[str] = []
        for key in ("listen", "advertise", *(f"peers[{i}]" for i in range(len(self.peers)))):
            value = self.listen if key == "listen" else self.advertise if key == "advertise" else None
            if value is None:
                value = self.peers[int(key[6:-1])]
            if value and split_address(value) is None:
                out.append(f"p2p.{key} must be IP:PORT (IPv6 as [addr]:port), not {value!r}")
        if self.enabled:
            host = split_address(self.node_id)
            if host is not None and host[0] in ("0.0.0.0", "::"):
                out.append("p2p.advertise must name this node's address when listen is a wildcard")
            if not self.secret_file:
                out.append("p2p.secret_file is required when p2p is enabled (peers sign every request)")
        if self.fanout < 1:
            out.append(f"p2p.fanout must be at least 1, not {self.fanout}")
        if self.upload_limit < 1:
            out.append(f"p2p.upload_limit must be at least 1, not {self.upload_limit}")
        for key in ("timeout", "demote_seconds", "health_interval", "dns_interval", "clock_skew"):
            if getattr(self, key) <= 0:
                out.append(f"p2p.{key} must be positive, not {getattr(self, key)!r}")
        if not 0 <= self.dns_port < 65536:
            out.append(f"p2p.dns_port must be a port number, not {self.dns_port}")
        tls = [bool(self.tls_cert), bool(self.tls_key), bool(self.tls_ca)]
        if any(tls) and not all(tls):
            out.append("p2p.tls_cert, tls_key and tls_ca go together (all three, or none)")
        return out


def split_address(address: str) -> tuple[str, int] | None:
    """``IP:PORT`` or ``[IPv6]:PORT`` -> (host, port); None if it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    return host, int(port)
