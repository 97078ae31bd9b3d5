"""A lab of network namespaces on one bridge: the nodes of the multi-node P2P tests, benchmarks and demo.

Why namespaces: peers that fetch from each other on loopback share one port space, one route and no
bandwidth limit, so neither "which peer served it" nor "how long on a slow link" can be asked. Here
every node is a network namespace with its own ``eth0``, address and ports, wired to a bridge in the
root namespace; `tbf` on both ends of its veth gives it a link of a chosen speed (netem does not
exist on the hosts we run on, so no delay or loss, only rate).

Layout (``<s>`` is the lab's subnet, ``<tag>`` its name, ``<i>`` the node's index)::

    root namespace                                       netns df<tag>n<i>
    bridge dfb<tag> 198.18.<s>.1/24 -- veth dfv<tag>h<i> ==== eth0 198.18.<s>.<10+i>/24
                                       (tbf: download)        (tbf: upload), lo up,
                                                               default via 198.18.<s>.1

- Addresses come from 198.18.0.0/15 (RFC 2544, benchmarking), never routed anywhere else. The subnet
  is the first ``198.18.<s>.0/24`` (s in 1..250) that no address or route on the host overlaps,
  picked and claimed (the bridge gets its address) under a lock: an abstract unix socket of the root
  namespace, which the kernel drops when its holder exits, so parallel labs (pytest-xdist, a demo
  next to the tests) never share a subnet and a crashed lab leaves no lock file behind.
- The bridge has 198.18.<s>.1, so processes of the root namespace (a registry, ``damselfly mount``)
  reach the nodes and the nodes reach them, without IP forwarding (it is the nodes' gateway for their
  own subnet only). Traffic between nodes is bridged; a host whose ``iptables`` FORWARD policy drops
  bridged packets (``br_netfilter`` with Docker installed) breaks node-to-node traffic, not ours.
- The default route only reaches the root namespace's own addresses: with forwarding off, anything
  else a node sends is dropped there without an answer. A node has no DNS, so a name (or reverse)
  lookup in it waits for the resolver's whole timeout (``python -m http.server`` does one at start):
  use addresses.
- Each namespace has its own port space, so nodes use fixed ports (a registry on 5000, a peer on 7001)
  instead of probing for free ones: nothing else listens there.
- A process joins a node with `NetNode.argv` (``nsenter --net=/run/netns/NAME -- CMD``), which keeps
  the host's mounts: ``ip netns exec`` would make a new mount namespace, and a mount made inside it (a
  FUSE filesystem) would be invisible to the test that checks it. The process is the command itself
  (nsenter execs it), so its pid is the one to stop.
- Names fit IFNAMSIZ (15 characters): the tag is the pid and a counter in base 36, and a tag whose
  bridge or namespaces exist already (a lab leaked by a dead process with the same pid) is skipped.
- `NetLab.close` removes exactly what the lab made, by name: each node's host veth (which removes
  its peer ``eth0`` in the same netlink call, where deleting the namespace first would leave the
  veth to the kernel's asynchronous namespace cleanup), then its namespace, then the bridge. It goes
  on past a failure and raises one `NetLabError` listing what could not be removed, and any process
  still inside a node (the lab does not kill what it did not start: stop it by pid first).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

#: All lab subnets are /24s of this range (RFC 2544's benchmarking block).
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
#: The third octets tried when no subnet is given.
SUBNETS = range(1, 251)
#: Node ``i`` gets host number ``FIRST_HOST + i``; the bridge has host number 1.
FIRST_HOST = 10
MAX_NODES = 254 - FIRST_HOST + 1
#: Abstract unix socket (root network namespace) held while a lab picks and claims its subnet.
SUBNET_LOCK = "\0damselfly-netlab-subnets"
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")
#: tbf's queue bound: at most this much delay before packets are dropped.
TBF_LATENCY = "50ms"
MIN_BURST = 32 * 1024

#: Tags of this process: the pid, then this counter (both in base 36).
_tag_numbers = itertools.count(1)


class NetLabError(OSError):
    """What the lab could not set up or remove; `problems` lists each (command and its error)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("network lab: " + "; ".join(self.problems))


def _run(argv: Sequence[str]) -> str:
    """Run an ``ip``/``tc`` command; its stdout, or a `NetLabError` naming it and its stderr."""
    r = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)
    if r.returncode != 0:
        why = r.stderr.strip() or f"exit status {r.returncode}"
        raise NetLabError([f"`{' '.join(argv)}` failed: {why}"])
    return r.stdout


def _base36(n: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(width):
        n, d = divmod(n, 36)
        out = digits[d] + out
    return out


def link_exists(name: str) -> bool:
    """Whether the root namespace has a link called `name` (this process lives there)."""
    return (SYS_NET / name).exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of 198.18.0.0/15 that an address or a route of the host covers."""
    found: list[ipaddress.IPv4Network] = []
    for link in json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for a in link.get("addr_info", []):
            net = ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
            if isinstance(net, ipaddress.IPv4Network) and net.overlaps(LAB_RANGE):
                found.append(net)
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show"]) or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        net = ipaddress.ip_network(dst, strict=False)
        if isinstance(net, ipaddress.IPv4Network) and net.overlaps(LAB_RANGE):
            found.append(net)
    return found


def subnet_network(subnet: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"198.18.{subnet}.0/24")


@contextlib.contextmanager
def _subnet_lock(timeout: float = 30.0) -> Iterator[None]:
    """Hold `SUBNET_LOCK` (see the module docstring): one lab at a time picks and claims a subnet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.bind(SUBNET_LOCK)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise NetLabError([f"another lab held the subnet lock for {timeout:.0f}s"]) from e
                time.sleep(0.02)
        yield
    finally:
        sock.close()


def _tbf(rate_mbit: float, burst_kb: int | None) -> list[str]:
    """tbf arguments for `rate_mbit`. The default burst, max(32 KiB, 4 ms of the rate), holds a few
    full-size packets (tbf drops a packet larger than its bucket) and what the rate sends between two
    timer ticks at HZ=250, below which tbf would fall short of its rate."""
    if not rate_mbit > 0:
        raise NetLabError([f"rate {rate_mbit} Mbit/s: a rate must be positive (None for no shaping)"])
    burst = burst_kb * 1024 if burst_kb is not None else max(MIN_BURST, int(rate_mbit * 1e6 / 8 / 250))
    if burst <= 0:
        raise NetLabError([f"burst {burst_kb} KiB: a burst must be positive"])
    return ["root", "tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", TBF_LATENCY]


def _root_qdisc(tc_prefix: Sequence[str], dev: str) -> str | None:
    """The kind of `dev`'s root qdisc (None for a veth's default, noqueue)."""
    for q in json.loads(_run([*tc_prefix, "-j", "qdisc", "show", "dev", dev]) or "[]"):
        if q.get("root"):
            kind: str = q["kind"]
            return None if kind == "noqueue" else kind
    return None


@dataclass
class NetNode:
    """One node of a `NetLab`: namespace `netns` whose ``eth0`` has `ip`, wired to the lab's bridge by
    the veth `host_veth` (root namespace). `label` names it in messages only."""

    label: str
    netns: str
    ip: str
    host_veth: str
    gateway: str
    rate_mbit: float | None = None
    burst_kb: int | None = None

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` run inside the node's network namespace, with the host's mounts (module docstring)."""
        return ["nsenter", f"--net={self.netns_path}", "--", *cmd]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float | None = 120.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """`subprocess.run` of `cmd` in the node: checked, output captured (unless `kw` redirects
        stdout or stderr) as text, a 120 s timeout; `kw` goes to `subprocess.run`."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        result: subprocess.CompletedProcess[str] = subprocess.run(
            self.argv(cmd), check=check, timeout=timeout, **kw
        )
        return result

    def set_rate(self, rate_mbit: float | None, burst_kb: int | None = None) -> None:
        """Shape both directions to `rate_mbit` (tbf on the host veth's egress, the node's download, and
        on ``eth0``'s egress in the node, its upload), or remove the shaping with None."""
        ends: list[tuple[list[str], str]] = [(["tc"], self.host_veth), (["tc", "-n", self.netns], "eth0")]
        if rate_mbit is None:
            for prefix, dev in ends:
                if _root_qdisc(prefix, dev) is not None:
                    _run([*prefix, "qdisc", "del", "dev", dev, "root"])
        else:
            args = _tbf(rate_mbit, burst_kb)
            for prefix, dev in ends:
                _run([*prefix, "qdisc", "replace", "dev", dev, *args])
        self.rate_mbit, self.burst_kb = rate_mbit, burst_kb

    def _counter(self, name: str) -> int:
        return int((SYS_NET / self.host_veth / "statistics" / name).read_text())

    def tx_bytes(self) -> int:
        """Bytes the host side of the veth sent: what the node received (its download)."""
        return self._counter("tx_bytes")

    def rx_bytes(self) -> int:
        """Bytes the host side of the veth received: what the node sent (its upload)."""
        return self._counter("rx_bytes")

    def pids(self) -> list[int]:
        """Live processes in the node's network namespace (by the namespace's inode, not by name)."""
        return pids_in_netns(self.netns_path)


def pids_in_netns(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{name}/ns/net")
        except OSError:  # gone, or a kernel thread
            continue
        if (ns.st_dev, ns.st_ino) == (st.st_dev, st.st_ino):
            found.append(int(name))
    return sorted(found)


class NetLab:
    """A bridge and the nodes on it (see the module docstring). ``with NetLab() as lab:`` or call
    `close`, which is idempotent."""

    def __init__(self, subnet: int | None = None) -> None:
        self.tag = ""
        self.bridge = ""
        self.nodes: list[NetNode] = []
        # (netns, host veth) of every node, each recorded once created (None before): `close` undoes a
        # half-built node too, and never a name that existed before the lab tried it.
        self._made: list[tuple[str | None, str | None]] = []
        self._bridge_made = False
        self._closed = False
        try:
            with _subnet_lock():
                self.subnet = self._pick_subnet(subnet)
                self._claim()
        except BaseException as e:
            try:
                self.close()
            except NetLabError as left:
                e.add_note(str(left))
            raise

    @property
    def network(self) -> ipaddress.IPv4Network:
        return subnet_network(self.subnet)

    @property
    def gateway(self) -> str:
        """The bridge's address: where root-namespace services are reached from the nodes."""
        return f"198.18.{self.subnet}.1"

    @staticmethod
    def _pick_subnet(subnet: int | None) -> int:
        used = used_networks()
        if subnet is not None:
            if not 0 <= subnet <= 255:
                raise NetLabError([f"subnet {subnet}: the third octet of 198.18.<s>.0/24 is 0..255"])
            clash = [str(n) for n in used if n.overlaps(subnet_network(subnet))]
            if clash:
                raise NetLabError([f"198.18.{subnet}.0/24 overlaps {', '.join(clash)} on this host"])
            return subnet
        for s in SUBNETS:
            if not any(n.overlaps(subnet_network(s)) for n in used):
                return s
        raise NetLabError([f"every 198.18.<s>.0/24 for s in 1..250 overlaps a network here: {used}"])

    def _claim(self) -> None:
        """Pick a free tag and create the bridge with the gateway address, up."""
        for _ in range(36 * 36):
            tag = _base36(os.getpid(), 5) + _base36(next(_tag_numbers), 2)
            bridge = f"dfb{tag}"
            if link_exists(bridge) or any(NETNS_DIR.glob(f"df{tag}n*")):
                continue
            try:
                _run(["ip", "link", "add", bridge, "type", "bridge"])
            except NetLabError:
                if link_exists(bridge):  # made by someone else just now: not ours to touch
                    continue
                raise
            self.tag, self.bridge = tag, bridge
            self._bridge_made = True
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", bridge])
            _run(["ip", "link", "set", bridge, "up"])
            return
        raise NetLabError(["no free lab name for this process"])

    def add_node(self, name: str, rate_mbit: float | None = None, burst_kb: int | None = None) -> NetNode:
        """A new namespace on the bridge, with address 198.18.<s>.<10+i>; shaped to `rate_mbit` in both
        directions if given (burst: see `_tbf`). `name` is a label for messages."""
        if self._closed:
            raise NetLabError([f"node {name!r}: the lab {self.bridge} is closed"])
        i = len(self._made)
        if i >= MAX_NODES:
            raise NetLabError([f"node {name!r}: a lab holds at most {MAX_NODES} nodes"])
        netns, veth = f"df{self.tag}n{i}", f"dfv{self.tag}h{i}"
        node = NetNode(name, netns, f"198.18.{self.subnet}.{FIRST_HOST + i}", veth, self.gateway)
        self._made.append((None, None))
        try:
            _run(["ip", "netns", "add", netns])
            self._made[i] = (netns, None)
            # The peer is created inside the namespace: the root namespace has an eth0 of its own.
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
            self._made[i] = (netns, veth)
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            _run(["ip", "-n", netns, "addr", "add", f"{node.ip}/24", "dev", "eth0"])
            _run(["ip", "-n", netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", netns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", netns, "route", "add", "default", "via", self.gateway])
            if rate_mbit is not None:
                node.set_rate(rate_mbit, burst_kb)
        except NetLabError as e:
            problems = _remove_node(*self._made[i])
            self._made[i] = (None, None)
            raise NetLabError([f"node {name!r} ({netns})", *e.problems, *problems]) from e
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """Remove the nodes (host veth, then namespace) and the bridge, by the names the lab made.
        Raises one `NetLabError` with whatever could not be removed; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        problems: list[str] = []
        for netns, veth in reversed(self._made):
            problems += _remove_node(netns, veth)
        if self._bridge_made:
            problems += _remove_link(self.bridge)
        if problems:
            raise NetLabError(problems)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _remove_link(name: str) -> list[str]:
    """Delete link `name` of the root namespace if it is there; what went wrong, if anything."""
    if not link_exists(name):
        return []
    try:
        _run(["ip", "link", "del", name])
    except NetLabError as e:
        if link_exists(name):
            return e.problems
    return []


def _remove_node(netns: str | None, veth: str | None) -> list[str]:
    """Undo one node, as far as it was built: its veth pair, its namespace (see the module docstring)."""
    problems = []
    if netns is not None:
        left = pids_in_netns(str(NETNS_DIR / netns))
        if left:
            problems.append(f"processes {left} still run in netns {netns}: stop them by pid before close()")
    if veth is not None:
        problems += _remove_link(veth)
    if netns is not None and netns_exists(netns):
        try:
            _run(["ip", "netns", "del", netns])
        except NetLabError as e:
            if netns_exists(netns):
                problems += e.problems
    return problems
