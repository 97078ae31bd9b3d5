"""scripts/demolib/netlab.py: namespaces on a bridge that reach each other and the root namespace, links
that tbf really slows down (both directions), a registry inside a node, and a teardown that leaves none
of the lab's namespaces or links behind — also after a node that failed half-way.

Root only, and never skipped: CI runs these as root. Every server is started by a fixture and stopped
by pid before its lab is closed (a fixture's teardown runs before those it depends on), so a failed
assertion leaves nothing behind; the lab's own `close` then reports any process still in a node.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.demolib.netlab import NetLab, NetLabError, NetNode
from scripts.demolib.procs import alive, spawn, stop_popen, wait_ready
from scripts.demolib.registry import NETNS_PORT, REGISTRY_BIN, Registry

MIB = 1024 * 1024
HTTP_PORT = 8000  # the same in every node: each namespace has a port space of its own
#: urllib without the environment's proxies: lab addresses are reached directly.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: network namespaces, veth pairs, a bridge and tc")  # never a skip


@pytest.fixture
def lab() -> Iterator[NetLab]:
    _need_root()
    with NetLab() as net:
        yield net


def _answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with DIRECT.open(url, timeout=1):
                return True
        except OSError:
            return False

    return check


#: ``python -m http.server PORT --bind IP --directory DIR`` without the reverse lookup of IP that
#: `HTTPServer.server_bind` makes (`socket.getfqdn`): a node has no DNS server, and its default route
#: ends in the root namespace, which drops the query, so the lookup takes the resolver's whole timeout.
HTTP_SERVER = """
import functools, http.server, socketserver, sys
class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
port, ip, directory = sys.argv[1:]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
Server((ip, int(port)), handler).serve_forever()
"""


@contextlib.contextmanager
def http_server(node: NetNode, directory: Path, log: Path) -> Iterator[str]:
    """An HTTP server in `node` (`HTTP_SERVER`), serving `directory`; yields its URL; stopped by pid."""
    argv = [sys.executable, "-c", HTTP_SERVER, str(HTTP_PORT), node.ip, str(directory)]
    proc = spawn(node.argv(argv), log)
    try:
        url = f"http://{node.ip}:{HTTP_PORT}"
        why = wait_ready(proc, _answers(url + "/"), timeout=20)
        assert why is None, f"http.server in {node.netns}: {why}\n{log.read_text(errors='replace')}"
        yield url
    finally:
        stop_popen(proc, timeout=5)


def fetch(node: NetNode, url: str, out: Path) -> float:
    """`curl` `url` to `out` from inside `node`; the seconds it took."""
    start = time.monotonic()
    node.run(["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", "60", "-o", str(out), url])
    return time.monotonic() - start


def lab_names(net: NetLab) -> list[str]:
    return [net.bridge] + [n for node in net.nodes for n in (node.netns, node.host_veth)]


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {ns["name"] for ns in json.loads(out or "[]")}


def link_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out or "[]")}


def test_nodes_reach_each_other_and_the_root_namespace(lab: NetLab, tmp_path: Path) -> None:
    a, b = lab.add_node("a"), lab.add_node("b")
    assert a.ip != b.ip and a.netns != b.netns
    served = tmp_path / "served"
    served.mkdir()
    data = os.urandom(4 * MIB)
    (served / "blob").write_bytes(data)
    with http_server(a, served, tmp_path / "http.log") as url:
        sent_before = a.rx_bytes()
        fetch(b, f"{url}/blob", tmp_path / "in-b")  # B's output file: the host's mounts are visible
        assert (tmp_path / "in-b").read_bytes() == data
        assert a.rx_bytes() - sent_before >= len(data)  # the host veth counts what A sent
        with DIRECT.open(f"{url}/blob", timeout=30) as r:  # from the root namespace, over the bridge
            assert r.read() == data
    # The nodes reach the root namespace too, at the bridge's address.
    with socket.create_server((lab.gateway, 0)) as listener:
        port = listener.getsockname()[1]
        connect = f"import socket; socket.create_connection(({lab.gateway!r}, {port}), 5)"
        b.run([sys.executable, "-c", connect])
        listener.settimeout(5)
        conn, (peer, _) = listener.accept()
        conn.close()
    assert peer == b.ip


def test_tbf_shapes_both_directions_of_a_node(lab: NetLab, tmp_path: Path) -> None:
    """8 MiB at 40 Mbit/s is ~1.7 s; unshaped, a veth moves it in a few tens of milliseconds."""
    a, b = lab.add_node("a", rate_mbit=40), lab.add_node("b")
    served = tmp_path / "served"
    served.mkdir()
    data = os.urandom(8 * MIB)
    (served / "blob").write_bytes(data)
    with (
        http_server(a, served, tmp_path / "a.log") as from_a,
        http_server(b, served, tmp_path / "b.log") as from_b,
    ):
        upload = fetch(b, f"{from_a}/blob", tmp_path / "up")  # A sends: eth0's tbf in A
        download = fetch(a, f"{from_b}/blob", tmp_path / "down")  # A receives: the host veth's tbf
        a.set_rate(None)
        free_up = fetch(b, f"{from_a}/blob", tmp_path / "free-up")
        free_down = fetch(a, f"{from_b}/blob", tmp_path / "free-down")
    for name in ("up", "down", "free-up", "free-down"):
        assert (tmp_path / name).read_bytes() == data, name
    assert upload > 1.0 and download > 1.0, (upload, download)
    assert upload > 2 * free_up and download > 2 * free_down, (upload, free_up, download, free_down)
    qdiscs = a.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" not in qdiscs, qdiscs


def test_registry_runs_inside_a_node(lab: NetLab, tmp_path: Path) -> None:
    assert os.access(REGISTRY_BIN, os.X_OK), f"{REGISTRY_BIN} is missing: apt-get install docker-registry"
    nodes = [lab.add_node("a"), lab.add_node("b")]
    registries = [
        Registry(tmp_path / f"r{i}", tmp_path / f"r{i}.log", bind=node.ip, wrap=node.argv)
        for i, node in enumerate(nodes)
    ]
    try:
        for node, registry in zip(nodes, registries, strict=True):
            offset = registry.log_offset()
            registry.start()
            # The same port in both nodes: each namespace has its own.
            assert registry.host == f"{node.ip}:{NETNS_PORT}"
            assert registry.pid is not None and registry.pid in node.pids()
            with DIRECT.open(f"{registry.url}/v2/", timeout=5) as r:  # from the root namespace
                assert r.status == 200
            deadline = time.monotonic() + 5  # the access log line may land a moment after the reply
            while registry.served_since(offset)[1] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert registry.served_since(offset)[1] >= 2  # the readiness check's GET, then ours
        pids = [r.pid for r in registries]
    finally:
        for registry in registries:
            registry.stop()
    assert all(pid is not None and not alive(pid) for pid in pids)
    assert all(not node.pids() for node in nodes)


def test_close_removes_every_namespace_and_link_and_is_idempotent(tmp_path: Path) -> None:
    _need_root()
    net = NetLab()
    try:
        net.add_node("a", rate_mbit=10)
        net.add_node("b")
        names = lab_names(net)
        assert set(names) <= netns_names() | link_names()
    finally:
        net.close()
    assert not netns_names() & set(names)
    assert not link_names() & set(names)
    net.close()  # a second close does nothing


def test_a_node_that_fails_half_way_is_removed(tmp_path: Path) -> None:
    _need_root()
    with NetLab() as net:
        with pytest.raises(NetLabError, match="rate must be positive"):
            net.add_node("bad", rate_mbit=0)  # fails at shaping: namespace and veth exist
        failed = [f"df{net.tag}n0", f"dfv{net.tag}h0"]
        assert not (netns_names() | link_names()) & set(failed)
        good = net.add_node("good")
        assert good.netns == f"df{net.tag}n1"  # a failed node's names are not reused
        names = lab_names(net)
    assert not (netns_names() | link_names()) & set(names)


def test_parallel_labs_get_distinct_subnets() -> None:
    _need_root()
    with NetLab() as one, NetLab() as two:
        assert one.subnet != two.subnet
        assert one.bridge != two.bridge
        with pytest.raises(NetLabError, match="overlaps"):
            NetLab(subnet=one.subnet)


def test_close_reports_a_process_left_in_a_node(tmp_path: Path) -> None:
    _need_root()
    net = NetLab()
    proc = None
    try:
        node = net.add_node("a")
        proc = spawn(node.argv(["sleep", "60"]), tmp_path / "sleep.log")
        deadline = time.monotonic() + 5
        while proc.pid not in node.pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(NetLabError, match=rf"processes \[{proc.pid}\] still run in netns {node.netns}"):
            net.close()
        # The links and the namespace's name are gone all the same.
        assert not (netns_names() | link_names()) & set(lab_names(net))
    finally:
        if proc is not None:
            stop_popen(proc, timeout=5)
        with contextlib.suppress(NetLabError):
            net.close()
