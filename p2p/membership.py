"""Who is in the fleet: this node, a static list, and what DNS says, minus the peers that are down.

Members are ``"HOST:PORT"`` strings (IPv6 as ``"[addr]:port"``), the addresses of peer servers. Every
node computes its blob trees (`p2p.tree`) from this list, so two nodes agree on a tree exactly when they
agree on the members: the list is sorted, and when DNS offers more than `MAX_DNS_MEMBERS` the *same*
first ones (in sorted order) are kept on every node.

DNS discovery (`refresh_dns`), for a headless service or any name that lists the nodes:

1. ``SRV dns_name``: each target's A and AAAA addresses, with the port of its SRV record;
2. when there is no SRV (NXDOMAIN or no answer): ``A`` and ``AAAA`` of dns_name, with `dns_port`
   (or this node's own port when it is 0).

An answer, even an empty one, replaces the last: a node that left is gone at the next refresh. A
*failure* (timeout, SERVFAIL, no resolver configuration) keeps the last answer and is only logged and
recorded in `last_dns_error`: a DNS hiccup must not shrink the fleet to one node, which would send every
node to the registry at once. Each query has `DNS_LIFETIME` seconds.

The queries go through dnspython's async resolver with the backend of the running event loop, picked
per call by sniffio (dnspython's process-wide default would stick to whichever loop asked first); SRV
targets are resolved concurrently in a trio nursery, at most `TARGET_QUERIES` at a time.

Down members: a peer that failed (refused connections, no answer) is marked down by whoever noticed and
left out of `members` until marked up again. This node is never down. Marks of members that DNS no longer
lists are dropped, so the table stays bounded by the fleet.

`members` is called from worker threads while `refresh_dns` runs in the trio thread: state is behind a
lock and the DNS answer is swapped in whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.name
import dns.nameserver
import dns.rdtypes.IN.SRV
import dns.resolver
import trio

log = logging.getLogger(__name__)

#: Seconds one DNS query may take, retries included.
DNS_LIFETIME = 2.0
#: Members taken from DNS at most; more are ignored (the first in sorted order are kept).
MAX_DNS_MEMBERS = 4096
#: SRV targets resolved at once.
TARGET_QUERIES = 8


def split_member(member: str) -> tuple[str, int]:
    """("HOST", PORT) of ``"HOST:PORT"`` (the brackets of an IPv6 host kept); ValueError if malformed."""
    host, sep, port = member.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or (":" in host and not bracketed)
    ):
        raise ValueError(f"member {member!r} is not HOST:PORT (an IPv6 address in brackets: [addr]:port)")
    return host, int(port)


def join_member(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    """The nameserver of ``"IP:PORT"``, ``"[IPv6]:PORT"`` or a bare IP (port 53)."""
    if dns.inet.is_address(text):
        return dns.nameserver.Do53Nameserver(text, 53)
    try:
        host, port = split_member(text)
    except ValueError:
        host, port = "", 0
    host = host.removeprefix("[").removesuffix("]")
    if not dns.inet.is_address(host):
        raise ValueError(f"DNS server {text!r} is not IP:PORT (e.g. 10.96.0.10:53 or [fd00::a]:53)")
    return dns.nameserver.Do53Nameserver(host, port)


class Membership:
    def __init__(
        self,
        me: str,
        static: Sequence[str] = (),
        dns_name: str = "",
        dns_port: int = 0,
        dns_server: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _, self._my_port = split_member(me)
        for member in static:
            split_member(member)
        if not 0 <= dns_port < 65536:
            raise ValueError(f"DNS port {dns_port} is not a port number")
        self.me = me
        self.dns_name = dns_name
        self.dns_port = dns_port
        self._server = _nameserver(dns_server) if dns_server else None
        self._clock = clock
        self._lock = threading.Lock()
        self._static = frozenset(static) | {me}
        self._dns: frozenset[str] = frozenset()
        self._down: dict[str, str] = {}  # member -> why
        self.last_dns_error: str | None = None
        self.last_dns_answer: float | None = None  # clock time of the last answer
        self.dns_refreshes = 0  # answers taken
        self.dns_failures = 0  # refreshes that kept the last answer

    def all_members(self) -> list[str]:
        """Every known member, down or not, sorted."""
        with self._lock:
            return sorted(self._static | self._dns)

    def members(self) -> list[str]:
        """The members not marked down, sorted; always includes this node."""
        with self._lock:
            return sorted(m for m in self._static | self._dns if m not in self._down)

    def down(self) -> dict[str, str]:
        """member -> why, for every member marked down."""
        with self._lock:
            return dict(self._down)

    def mark_down(self, member: str, why: str) -> bool:
        """Leave `member` out of `members` until `mark_up`; True if it was up. Never this node."""
        with self._lock:
            if member == self.me or member not in self._static | self._dns:
                return False
            was_up = member not in self._down
            self._down[member] = why
        if was_up:
            log.warning("peer %s is down: %s; it is left out of the fleet until it answers", member, why)
        return was_up

    def mark_up(self, member: str) -> bool:
        """Count `member` again; True if it was down."""
        with self._lock:
            was_down = self._down.pop(member, None) is not None
        if was_down:
            log.info("peer %s answers again", member)
        return was_down

    async def refresh_dns(self) -> None:
        """Take the members DNS lists now, or keep the last ones if DNS fails (see the module docstring)."""
        if not self.dns_name:
            return
        try:
            found = await self._lookup()
        except (dns.exception.DNSException, OSError) as e:
            error = f"{type(e).__name__}: {e}"
            with self._lock:
                self.last_dns_error = error
                self.dns_failures += 1
                kept = len(self._dns)
            log.warning(
                "DNS lookup of %s failed (%s); keeping the last %d member(s)", self.dns_name, error, kept
            )
            return
        if len(found) > MAX_DNS_MEMBERS:
            log.warning(
                "DNS %s lists %d members; only the first %d (sorted) are used",
                self.dns_name,
                len(found),
                MAX_DNS_MEMBERS,
            )
        new = frozenset(sorted(found)[:MAX_DNS_MEMBERS])
        with self._lock:
            old, self._dns = self._dns, new
            known = self._static | new
            for member in [m for m in self._down if m not in known]:
                del self._down[member]
            recovered = self.last_dns_error is not None
            self.last_dns_error = None
            self.dns_refreshes += 1
            self.last_dns_answer = self._clock()
        if recovered:
            log.info("DNS lookup of %s works again", self.dns_name)
        if new != old:
            log.info(
                "DNS %s: %d joined, %d left, %d listed",
                self.dns_name,
                len(new - old),
                len(old - new),
                len(new),
            )
        if not new:
            log.warning("DNS %s lists no members: only this node and the static ones remain", self.dns_name)

    def _resolver(self) -> dns.asyncresolver.Resolver:
        resolver = dns.asyncresolver.Resolver(configure=self._server is None)
        if self._server is not None:
            resolver.nameservers = [self._server]
        resolver.timeout = DNS_LIFETIME
        resolver.lifetime = DNS_LIFETIME
        return resolver

    async def _lookup(self) -> set[str]:
        resolver = self._resolver()
        backend = dns.asyncbackend.get_backend(dns.asyncbackend.sniff())
        name = dns.name.from_text(self.dns_name)

        async def query(qname: dns.name.Name, rdtype: str) -> list[str]:
            """Rdata texts; [] for NXDOMAIN and no answer, which are answers, not failures."""
            try:
                answer = await resolver.resolve(
                    qname, rdtype, lifetime=DNS_LIFETIME, search=False, backend=backend
                )
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return []
            return [rdata.to_text() for rdata in answer]

        async def addresses(qname: dns.name.Name) -> list[str]:
            return await query(qname, "A") + await query(qname, "AAAA")

        try:
            srv = await resolver.resolve(name, "SRV", lifetime=DNS_LIFETIME, search=False, backend=backend)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            port = self.dns_port or self._my_port
            return {join_member(a, port) for a in await addresses(name)}
        records = [r for r in srv if isinstance(r, dns.rdtypes.IN.SRV.SRV) and r.target != dns.name.root]
        targets = sorted({r.target for r in records})[:MAX_DNS_MEMBERS]  # "." means "no service here"
        resolved: dict[dns.name.Name, list[str]] = {}
        failures: list[Exception] = []
        limiter = trio.CapacityLimiter(TARGET_QUERIES)

        async def resolve_target(target: dns.name.Name, cancel: trio.CancelScope) -> None:
            async with limiter:
                try:
                    resolved[target] = await addresses(target)
                except (dns.exception.DNSException, OSError) as e:
                    failures.append(e)
                    cancel.cancel()  # one failure fails the refresh: no need to finish the others

        async with trio.open_nursery() as nursery:
            for target in targets:
                nursery.start_soon(resolve_target, target, nursery.cancel_scope)
        if failures:
            raise failures[0]
        return {join_member(a, r.port) for r in records for a in resolved.get(r.target, [])}
