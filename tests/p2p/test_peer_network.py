"""The peer network between real device daemons on loopback: a node reads another's blocks, requests
are signed, a lying peer is caught, a hung one is cancelled at the read's deadline, DNS finds members,
TLS between peers. (Many nodes in network namespaces behind shaped links: test_fleet.py.)"""

from __future__ import annotations

import filecmp
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from p2p.peerauth import Signer
from p2p.peerwire import BlobRef, range_header
from tests.p2p.registry_server import LoopbackTLS, RegistryServer
from tests.snapshotter.devd import CountingProxy, DeviceDaemon, DeviceLab

from .dnsserver import DnsServer
from .peerlab import (
    SECRET,
    FakePeer,
    MiB,
    PushedImage,
    free_ports,
    node_config,
    push_big_image,
    signed_get,
    wait_for,
    write_secret,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> PushedImage:
    return push_big_image(tmp_path_factory.mktemp("peer-image"), registry.host, 24 * MiB)


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[CountingProxy]:
    """The registry behind a byte counter: nodes name it as the image's registry."""
    with CountingProxy(registry.host) as p:
        yield p


@pytest.fixture
def lab(tmp_path: Path, proxy: CountingProxy) -> Iterator[DeviceLab]:
    """The nodes' lab; made after the proxy so that the nodes stop while it still relays (a daemon told
    to stop while its registry vanished mid-download first waits out its registry retries)."""
    lab = DeviceLab(tmp_path / "lab")
    yield lab
    assert lab.close() == []


def ref_via(proxy: CountingProxy, image: PushedImage) -> str:
    return image.ref.replace(image.ref.split("/")[0], proxy.host, 1)


def start_node(
    lab: DeviceLab, tmp_path: Path, name: str, port: int, peers: list[str], **p2p: object
) -> DeviceDaemon:
    secret = tmp_path / "secret"
    if not secret.exists():
        write_secret(secret)
    read_timeout = float(p2p.pop("read_timeout", 20.0))  # type: ignore[arg-type]
    config = node_config(tmp_path / f"{name}.toml", f"127.0.0.1:{port}", peers, secret, **p2p)
    return lab.daemon(
        name, extra_args=("--config", str(config)), background_delay=0.0, read_timeout=read_timeout
    )


def converged(members: list[str], *nodes: DeviceDaemon) -> None:
    """Wait until every node counts every member up. A node started before the others finds them down
    at its first probe and leaves them out until the next one: a read in between would take the node for
    the only member and go to the registry itself."""
    for node in nodes:
        wait_for(lambda n=node: n.status()["p2p"]["members"] == sorted(members), 20, "the fleet to converge")


def layer(status: dict[str, object], image: PushedImage) -> dict[str, object]:
    blobs = status["blobs"]
    assert isinstance(blobs, dict)
    entry = blobs[image.layer_digest]
    assert isinstance(entry, dict)
    return entry


def test_a_node_reads_what_another_has_and_the_registry_serves_it_once(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    pa, pb = free_ports(2)
    members = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"]
    a = start_node(lab, tmp_path, "a", pa, members)
    b = start_node(lab, tmp_path, "b", pb, members)
    converged(members, a, b)
    ref = ref_via(proxy, image)
    ma, mb = lab.mount_point("ma"), lab.mount_point("mb")
    a.cli("mount", "--plain-http", ref, str(ma))
    first = layer(a.wait_complete(120), image)
    b.cli("mount", "--plain-http", ref, str(mb))
    second = layer(b.wait_complete(120), image)
    for m in (ma, mb):
        for f in ("big0.bin", "big1.bin", "big2.bin", "etc/motd"):
            assert filecmp.cmp(m / f, image.tree / f, shallow=False), f"{m}/{f}"
    # Whichever node is the blob's root fetched it from the registry, for both; the other from it.
    assert {first["registry_bytes"] == 0, second["registry_bytes"] == 0} == {True, False}
    assert second["peer_bytes"] + second["registry_bytes"] >= image.layer_size
    assert b.status()["p2p"]["fetched_bytes"]["registry"] == 0 or a.status()["p2p"]["upload_bytes"] == 0
    assert proxy.served < 1.1 * image.layer_size, (proxy.served, image.layer_size)


def test_requests_without_a_valid_signature_are_refused_before_any_work(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    (port,) = free_ports(1)
    node = start_node(lab, tmp_path, "n", port, [])
    ref = BlobRef(image.layer_digest, image.layer_size, image.index_digest, proxy.host, "big")  # type: ignore[arg-type]
    target = ref.target()
    rng = range_header(0, 4096)
    url = f"http://127.0.0.1:{port}{target}"
    good = Signer(SECRET)
    with httpx.Client(timeout=20) as http:
        assert http.get(url, headers={"range": rng}).status_code == 401  # unsigned
        me = f"127.0.0.1:{port}"
        wrong = signed_get(Signer(b"another-fleet-secret-0123456789"), target, rng, to=me)
        assert http.get(url, headers=wrong).status_code == 401
        stale = signed_get(Signer(SECRET, clock=lambda: time.time() - 120), target, rng, to=me)
        assert http.get(url, headers=stale).status_code == 401
        elsewhere = signed_get(good, target, rng, to="127.0.0.1:1")  # captured on its way to another
        assert http.get(url, headers=elsewhere).status_code == 401
        tampered = signed_get(good, target, rng, to=me)
        tampered["range"] = range_header(0, 8192)
        assert http.get(url, headers=tampered).status_code == 401
        status = node.status()["p2p"]
        assert status["fetched_bytes"] == {"peer": 0, "registry": 0} and status["served_blobs"] == 0
        assert proxy.connections == 0  # nothing was asked of the registry for them
        ok = signed_get(good, target, rng, to=me)
        reply = http.get(url, headers=ok)
        assert reply.status_code == 206, reply.text
        assert reply.content == (image.tree.parent / "img" / "layer.blob").read_bytes()[:4096]
        replayed = http.get(url, headers=ok)
        assert replayed.status_code == 401 and "replayed" in replayed.text
        health = http.get(f"http://127.0.0.1:{port}/v1/health")
        assert health.status_code == 401
        metrics = http.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'damselfly_peer_upload_refused_total{reason="auth-missing"}' in metrics
    assert 'damselfly_peer_upload_refused_total{reason="auth-replayed"} 1.0' in metrics


def test_a_peer_that_sends_wrong_bytes_is_caught_demoted_and_bypassed(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    (port,) = free_ports(1)
    with FakePeer("liar") as liar:
        me = f"127.0.0.1:{port}"
        node = start_node(lab, tmp_path, "n", port, [me, liar.address], seeds=[liar.address])
        m = lab.mount_point("m")
        node.cli("mount", "--plain-http", ref_via(proxy, image), str(m))
        for f in ("big0.bin", "big1.bin", "big2.bin", "etc/motd"):
            assert filecmp.cmp(m / f, image.tree / f, shallow=False), f
        st = node.wait_complete(120)
    assert liar.requests, "the liar, the blob's root by seed, was never asked"
    assert not any("authorization" in h for h in liar.headers), "registry credentials went to a peer"
    p2p = st["p2p"]
    assert p2p["bad_bytes"] >= 1 and p2p["demotions"] >= 1
    assert liar.address in p2p["demoted"] and "wrong bytes" in p2p["demoted"][liar.address]["why"]
    entry = layer(st, image)
    assert entry["peer_bytes"] == 0 and entry["registry_bytes"] >= image.layer_size
    assert entry["verified"] is True


def test_a_hung_peer_transfer_is_cancelled_at_the_reads_deadline(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    (port,) = free_ports(1)
    with FakePeer("hang") as hung:
        me = f"127.0.0.1:{port}"
        # The peer's own timeout (60 s) is far away: only the read's deadline (3 s) can end the transfer.
        node = start_node(
            lab, tmp_path, "n", port, [me, hung.address], seeds=[hung.address], timeout=60.0, read_timeout=3.0
        )
        m = lab.mount_point("m")
        t0 = time.monotonic()
        failed = node.cli("mount", "--plain-http", ref_via(proxy, image), str(m), check=False)
        took = time.monotonic() - t0
        assert failed.returncode != 0 and took < 15, (failed.stderr, took)
        p2p = node.status()["p2p"]
        assert p2p["cancelled_transfers"] == 1 and p2p["active_transfers"] == 0, p2p
        assert hung.address in p2p["demoted"]
        # Demoted, the hung peer is skipped: the next mount goes to the registry at once.
        node.cli("mount", "--plain-http", ref_via(proxy, image), str(m))
        assert filecmp.cmp(m / "big1.bin", image.tree / "big1.bin", shallow=False)


def test_members_come_from_dns_srv_records_and_a_node_that_leaves_is_dropped(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    pa, pb = free_ports(2)
    srv = "_p2p._tcp.fleet.test."
    records = {
        (srv, "SRV"): [f"0 0 {pa} a.fleet.test.", f"0 0 {pb} b.fleet.test."],
        ("a.fleet.test.", "A"): ["127.0.0.1"],
        ("b.fleet.test.", "A"): ["127.0.0.1"],
    }
    with DnsServer(records) as dns:
        keys = {"dns": srv, "dns_server": dns.address, "dns_interval": 0.5}
        a = start_node(lab, tmp_path, "a", pa, [], **keys)
        b = start_node(lab, tmp_path, "b", pb, [], **keys)
        both = sorted([f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"])
        wait_for(lambda: sorted(b.status()["p2p"]["members"]) == both, 10, "B learns both members")
        ref = ref_via(proxy, image)
        a.cli("mount", "--plain-http", ref, str(lab.mount_point("ma")))
        a.wait_complete(120)
        b.cli("mount", "--plain-http", ref, str(lab.mount_point("mb")))
        got = layer(b.wait_complete(120), image)
        gave = layer(a.status(), image)
        assert got["peer_bytes"] > 0 or gave["peer_bytes"] > 0  # one of them read from the other
        dns.records[(srv, "SRV")] = [f"0 0 {pa} a.fleet.test."]
        wait_for(lambda: a.status()["p2p"]["members"] == [f"127.0.0.1:{pa}"], 10, "A drops B")


def test_peers_talk_tls_with_the_fleet_ca(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    tls = LoopbackTLS.generate(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(tls.ca_pem)
    keys = {"tls_cert": str(tls.cert_path), "tls_key": str(tls.key_path), "tls_ca": str(ca)}
    pa, pb = free_ports(2)
    members = [f"127.0.0.1:{pa}", f"127.0.0.1:{pb}"]
    a = start_node(lab, tmp_path, "a", pa, members, **keys)
    b = start_node(lab, tmp_path, "b", pb, members, **keys)
    converged(members, a, b)
    ref = ref_via(proxy, image)
    a.cli("mount", "--plain-http", ref, str(lab.mount_point("ma")))
    b.cli("mount", "--plain-http", ref, str(lab.mount_point("mb")))
    got, gave = layer(b.wait_complete(120), image), layer(a.wait_complete(120), image)
    assert got["peer_bytes"] + gave["peer_bytes"] >= image.layer_size
    with httpx.Client(timeout=10) as http, pytest.raises(httpx.HTTPError):
        http.get(f"http://127.0.0.1:{pa}/metrics")  # plain HTTP is not spoken there


def test_past_the_upload_limit_a_peer_gets_503_with_retry_after(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    (port,) = free_ports(1)
    start_node(lab, tmp_path, "n", port, [], upload_limit=1)
    proxy.hang()  # the node's registry fetch for the first request waits: it holds the only upload slot
    ref = BlobRef(image.layer_digest, image.layer_size, image.index_digest, proxy.host, "big")  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}{ref.target()}"
    signer = Signer(SECRET)
    first: list[httpx.Response] = []

    def hold() -> None:
        headers = signed_get(
            signer, ref.target(), range_header(0, 4096), to=f"127.0.0.1:{port}", x_damselfly_deadline="4"
        )
        with httpx.Client(timeout=30) as http:
            first.append(http.get(url, headers=headers))

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        time.sleep(1.0)
        with httpx.Client(timeout=30) as http:
            busy = http.get(
                url,
                headers=signed_get(signer, ref.target(), range_header(4096, 4096), to=f"127.0.0.1:{port}"),
            )
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
    finally:
        holder.join(30)
    assert first and first[0].status_code in (502, 504), first  # the hung registry: no bytes, in time


def test_with_no_registries_for_peers_a_node_fetches_only_for_blobs_it_uses(
    lab: DeviceLab, tmp_path: Path, image: PushedImage, proxy: CountingProxy
) -> None:
    (port,) = free_ports(1)
    node = start_node(lab, tmp_path, "n", port, [], registries=[])
    ref = BlobRef(image.layer_digest, image.layer_size, image.index_digest, proxy.host, "big")  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}{ref.target()}"
    signer = Signer(SECRET)
    with httpx.Client(timeout=30) as http:
        me = f"127.0.0.1:{port}"
        refused = http.get(url, headers=signed_get(signer, ref.target(), range_header(0, 4096), to=me))
        assert refused.status_code == 403, refused.text
        assert proxy.connections == 0
        node.cli("mount", "--plain-http", ref_via(proxy, image), str(lab.mount_point("m")))
        served = http.get(url, headers=signed_get(signer, ref.target(), range_header(0, 4096), to=me))
        assert served.status_code == 206
