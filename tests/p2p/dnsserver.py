"""A tiny authoritative DNS server on loopback UDP, for membership tests.

`DnsServer(records)` answers from a mutable table keyed by (absolute name, type) -> rdata texts::

    {("nodes.test.", "A"): ["198.18.0.10"], ("_p2p._tcp.nodes.test.", "SRV"): ["0 0 7001 n1.test."]}

- a name absent from every key: NXDOMAIN;
- a known name, a type it has no records of: NOERROR with no answer (the resolver's NoAnswer);
- `fail = True`: SERVFAIL for everything;
- `queries` records every (name, type) asked, in order.

Use it as a context manager: the thread is stopped and the socket closed on exit. Answers that do not
fit in the client's UDP payload are not supported (there is no TCP): keep test tables small.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None, ttl: int = 0) -> None:
        self.records: dict[tuple[str, str], list[str]] = dict(records or {})
        self.ttl = ttl
        self.fail = False
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        """ "IP:PORT", as `Membership(dns_server=...)` takes it."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer(wire)
            if answer is not None:
                self._sock.sendto(answer, peer)

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # not DNS: ignore, like a real server would
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.fail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        for question in query.question:
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            texts = self.records.get((name, rdtype))
            if texts:
                response.answer.append(
                    dns.rrset.from_text_list(question.name, self.ttl, dns.rdataclass.IN, rdtype, texts)
                )
            elif not any(known.lower() == name for known, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
