"""Fleet membership: static members, DNS discovery (SRV, A, AAAA) against a real UDP DNS server under
trio, keeping the last answer through DNS failures, and peers marked down and up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import dns.asyncbackend
import pytest
import trio

from p2p import membership
from p2p.membership import Membership
from tests.p2p.dnsserver import DnsServer

ME = "198.18.0.100:7000"  # sorts before the 198.18.0.1x members DNS lists
NAME = "nodes.test"


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as s:
        yield s


def fleet(server: DnsServer, **kwargs: object) -> Membership:
    return Membership(ME, dns_name=NAME, dns_server=server.address, **kwargs)  # type: ignore[arg-type]


def test_dnspython_runs_on_the_trio_backend(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10"]
    m = fleet(server)
    seen: list[str] = []

    async def main() -> None:
        seen.append(dns.asyncbackend.sniff())
        with trio.fail_after(5):  # a trio deadline, honoured because the queries are trio-native
            await m.refresh_dns()

    trio.run(main)
    assert seen == ["trio"]
    assert m.members() == [ME, "198.18.0.10:7000"]


def test_a_records_use_my_port_or_the_dns_port(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10", "198.18.0.11"]
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7000", "198.18.0.11:7000"]
    assert m.dns_refreshes == 1 and m.last_dns_error is None
    m = fleet(server, dns_port=7100)
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7100", "198.18.0.11:7100"]


def test_aaaa_records_are_bracketed(server: DnsServer) -> None:
    server.records[("nodes.test.", "AAAA")] = ["2001:db8::1"]
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "[2001:db8::1]:7000"]


def test_srv_targets_are_resolved_with_their_ports(server: DnsServer) -> None:
    server.records.update(
        {
            ("nodes.test.", "SRV"): ["0 0 7001 n1.test.", "0 0 7002 n2.test.", "0 0 7003 gone.test."],
            ("nodes.test.", "A"): ["203.0.113.99"],  # not used: SRV wins
            ("n1.test.", "A"): ["198.18.0.21"],
            ("n2.test.", "A"): ["198.18.0.22"],
            ("n2.test.", "AAAA"): ["2001:db8::22"],
        }
    )
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.members() == sorted([ME, "198.18.0.21:7001", "198.18.0.22:7002", "[2001:db8::22]:7002"])
    assert server.queries[0] == ("nodes.test.", "SRV")
    assert ("nodes.test.", "A") not in server.queries


def test_without_srv_records_the_name_s_addresses_are_used(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10"]  # the name exists: SRV is NOERROR, no answer
    m = fleet(server, dns_port=7100)
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7100"]
    assert server.queries == [("nodes.test.", "SRV"), ("nodes.test.", "A"), ("nodes.test.", "AAAA")]


def test_nxdomain_for_srv_falls_back_to_addresses_and_is_an_answer(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10"]
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7000"]
    server.records.clear()  # the name is gone: NXDOMAIN for every type
    server.queries.clear()
    trio.run(m.refresh_dns)
    assert server.queries == [("nodes.test.", "SRV"), ("nodes.test.", "A"), ("nodes.test.", "AAAA")]
    assert m.members() == [ME]  # NXDOMAIN says "nobody": not a failure, the last answer is replaced
    assert m.last_dns_error is None and m.dns_refreshes == 2


def test_servfail_keeps_the_last_answer(server: DnsServer, caplog: pytest.LogCaptureFixture) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10", "198.18.0.11"]
    m = fleet(server)
    trio.run(m.refresh_dns)
    server.fail = True
    with caplog.at_level(logging.WARNING, logger="p2p.membership"):
        trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7000", "198.18.0.11:7000"]
    assert m.dns_failures == 1
    error = m.last_dns_error
    assert error is not None and "NoNameservers" in error
    assert "keeping the last 2 member(s)" in caplog.text
    server.fail = False
    trio.run(m.refresh_dns)
    assert (m.last_dns_error, m.dns_refreshes) == (None, 2)


def test_a_failing_srv_target_keeps_the_last_answer(server: DnsServer) -> None:
    server.records.update({("nodes.test.", "SRV"): ["0 0 7001 n1.test."], ("n1.test.", "A"): ["198.18.0.21"]})
    m = fleet(server)
    trio.run(m.refresh_dns)
    original = server._answer

    def fail_targets(wire: bytes) -> bytes | None:
        server.fail = b"\x02n1\x04test" in wire  # SERVFAIL for n1.test only
        try:
            return original(wire)
        finally:
            server.fail = False

    server._answer = fail_targets  # type: ignore[method-assign]
    server.records[("nodes.test.", "SRV")] = ["0 0 7009 n1.test."]
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.21:7001"]
    assert m.last_dns_error is not None


def test_a_node_that_leaves_dns_is_gone_at_the_next_refresh(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10", "198.18.0.11"]
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.mark_down("198.18.0.11:7000", "refused")
    server.records[("nodes.test.", "A")] = ["198.18.0.10", "198.18.0.12"]
    trio.run(m.refresh_dns)
    assert m.all_members() == [ME, "198.18.0.10:7000", "198.18.0.12:7000"]
    assert m.down() == {}  # the mark of a member that left is dropped with it


def test_static_and_dns_members_are_united(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = ["198.18.0.10", "198.18.0.5"]
    m = fleet(server, static=["198.18.0.5:7000", "[2001:db8::9]:7000"])
    assert m.members() == [ME, "198.18.0.5:7000", "[2001:db8::9]:7000"]
    trio.run(m.refresh_dns)
    assert m.members() == [ME, "198.18.0.10:7000", "198.18.0.5:7000", "[2001:db8::9]:7000"]


def test_dns_members_beyond_the_bound_are_ignored(server: DnsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "MAX_DNS_MEMBERS", 3)
    server.records[("nodes.test.", "A")] = [f"198.18.0.{i}" for i in range(10, 15)]
    m = fleet(server)
    trio.run(m.refresh_dns)
    assert m.all_members() == [ME, "198.18.0.10:7000", "198.18.0.11:7000", "198.18.0.12:7000"]


def test_mark_down_and_up() -> None:
    m = Membership(ME, static=["198.18.0.5:7000", "198.18.0.6:7000"])
    assert m.mark_down("198.18.0.5:7000", "connection refused")
    assert not m.mark_down("198.18.0.5:7000", "still refused")  # already down
    assert m.members() == [ME, "198.18.0.6:7000"]
    assert m.all_members() == [ME, "198.18.0.5:7000", "198.18.0.6:7000"]
    assert m.down() == {"198.18.0.5:7000": "still refused"}
    assert m.mark_up("198.18.0.5:7000")
    assert not m.mark_up("198.18.0.5:7000")
    assert m.members() == [ME, "198.18.0.5:7000", "198.18.0.6:7000"]
    assert not m.mark_down("198.18.0.77:7000", "never a member")
    assert m.down() == {}


def test_me_is_always_present_and_never_down() -> None:
    m = Membership(ME)
    assert m.members() == [ME]
    assert not m.mark_down(ME, "confused caller")
    assert m.members() == [ME] and m.down() == {}
    trio.run(m.refresh_dns)  # no DNS name: nothing to do
    assert m.dns_refreshes == 0


def test_members_can_be_read_from_threads_during_refreshes(server: DnsServer) -> None:
    server.records[("nodes.test.", "A")] = [f"198.18.0.{i}" for i in range(10, 20)]
    m = fleet(server)
    stop = threading.Event()
    sizes: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            sizes.add(len(m.members()))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(5):
            trio.run(m.refresh_dns)
    finally:
        stop.set()
        t.join()
    assert sizes <= {1, 11}  # only whole answers are ever seen


@pytest.mark.parametrize("bad", ["nohost", "host:", "host:99999", "::1:7000", ":7000"])
def test_malformed_members_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        Membership(bad)
    with pytest.raises(ValueError, match="HOST:PORT"):
        Membership(ME, static=[bad])


def test_a_malformed_dns_server_is_refused() -> None:
    with pytest.raises(ValueError, match="DNS server"):
        Membership(ME, dns_name=NAME, dns_server="dns.example:53")
    Membership(ME, dns_name=NAME, dns_server="[::1]:5353")
    Membership(ME, dns_name=NAME, dns_server="127.0.0.1")
