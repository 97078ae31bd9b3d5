"""Where a node's missing bytes come from (`p2p.treesource.TreeSource`), with fake transports: the order of
the route, fallback past a failing or lying peer, demotion, counting, and the errors when all fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockformat.digest import Digest
from blockformat.errors import CorruptBlobError, SourceError
from p2p import treesource
from p2p.errors import RegistryUnavailableError
from p2p.node import BlobNode, CacheSettings
from p2p.peerclient import PeerError
from p2p.peerwire import BlobRef
from p2p.transport import BlobTransport
from p2p.treesource import TreeSource

DIGEST = Digest("sha256:" + "ab" * 32)
GOOD = bytes(range(256)) * 16


class Fake:
    def __init__(self, name: str, kind: str, answer: bytes | Exception, member: str | None = None) -> None:
        self.name, self.kind, self.answer, self.member = name, kind, answer, member
        self.calls = 0

    def fetch(self, ref: BlobRef, offset: int, length: int) -> bytes:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer[offset : offset + length]


class FakePeer(Fake):
    pass


@pytest.fixture
def node(tmp_path: Path) -> BlobNode:
    n = BlobNode(str(tmp_path / "cache"), CacheSettings(unit_size=4096))
    yield n
    n.close()


def source(node: BlobNode, route: list[Fake], monkeypatch: pytest.MonkeyPatch) -> TreeSource:
    src = TreeSource(node, BlobRef(DIGEST, len(GOOD), None, "registry.test", "repo"), None)
    transports: list[BlobTransport] = list(route)
    monkeypatch.setattr(src, "route", lambda: transports)
    monkeypatch.setattr(treesource, "PeerTransport", FakePeer)  # isinstance checks see our fakes
    return src


def check(offset: int, data: bytes) -> None:
    if data != GOOD[offset : offset + len(data)]:
        raise CorruptBlobError("blob", offset, "chunk", "the right bytes", "others")


def test_a_failing_peer_is_demoted_and_the_next_source_serves(
    node: BlobNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer = FakePeer("peer a", "peer", PeerError("a:1", "timeout", "no answer"), member="a:1")
    registry = Fake("registry", "registry", GOOD)
    src = source(node, [peer, registry], monkeypatch)
    got: list[bytes] = []
    src.fetch_checked(100, 200, lambda d: (check(100, d), got.append(d)))
    assert got == [GOOD[100:300]] and peer.calls == registry.calls == 1
    assert src.registry_bytes == 200 and src.peer_bytes == 0
    assert node.demotions.is_demoted("a:1")
    assert node.metrics.value("damselfly_peer_errors", kind="timeout") == 1


def test_a_peer_whose_bytes_fail_the_check_is_counted_demoted_and_bypassed(
    node: BlobNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    liar = FakePeer("peer b", "peer", bytes(len(GOOD)), member="b:1")
    honest = FakePeer("peer c", "peer", GOOD, member="c:1")
    src = source(node, [liar, honest], monkeypatch)
    src.fetch_checked(0, 512, lambda d: check(0, d))
    assert src.bad_peers == 1 and src.peer_bytes == 512
    assert node.demotions.is_demoted("b:1") and not node.demotions.is_demoted("c:1")
    assert node.metrics.value("damselfly_peer_bad_bytes") == 1


def test_a_refusing_peer_is_skipped_but_not_demoted(node: BlobNode, monkeypatch: pytest.MonkeyPatch) -> None:
    peer = FakePeer("peer d", "peer", PeerError("d:1", "refused", "HTTP 403"), member="d:1")
    src = source(node, [peer, Fake("registry", "registry", GOOD)], monkeypatch)
    src.fetch_checked(0, 64, lambda d: check(0, d))
    assert not node.demotions.is_demoted("d:1")


def test_when_every_source_fails_the_error_holds_each_ones_as_an_exception_group(
    node: BlobNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors = [
        PeerError("a:1", "error", "connection refused"),
        PeerError("b:1", "busy", "HTTP 503", retry_after=2.0),
        RegistryUnavailableError("http://registry.test/v2/", "connection refused", 3, 1.0),
    ]
    route = [FakePeer("peer a", "peer", errors[0], "a:1"), FakePeer("peer b", "peer", errors[1], "b:1")]
    src = source(node, [*route, Fake("registry", "registry", errors[2])], monkeypatch)
    with pytest.raises(SourceError) as caught:
        src.fetch_checked(0, 64, lambda d: check(0, d))
    group = caught.value.__cause__
    assert isinstance(group, ExceptionGroup) and list(group.exceptions) == errors
    assert node.demotions.active()["b:1"][0] <= 2.0  # busy: demoted for its Retry-After only


def test_wrong_bytes_from_the_registry_are_an_error_not_a_retry(
    node: BlobNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Fake("registry", "registry", bytes(len(GOOD)))
    later = Fake("mirror", "registry", GOOD)
    src = source(node, [registry, later], monkeypatch)
    with pytest.raises(SourceError, match="registry sent wrong bytes"):
        src.fetch_checked(0, 64, lambda d: check(0, d))
    assert later.calls == 0


def test_unchecked_bytes_blamed_later_are_uncounted_and_their_peer_demoted(
    node: BlobNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    liar = FakePeer("peer e", "peer", bytes(len(GOOD)), member="e:1")
    src = source(node, [liar], monkeypatch)
    assert src.read(0, 128) == bytes(128)
    assert src.peer_bytes == 128
    src.distrust_unchecked()
    assert src.peer_bytes == 0 and src.bad_peers == 1 and node.demotions.is_demoted("e:1")


def test_no_route_at_all_says_so(node: BlobNode, monkeypatch: pytest.MonkeyPatch) -> None:
    src = source(node, [], monkeypatch)
    with pytest.raises(SourceError, match="no upstream"):
        src.fetch_checked(0, 64, lambda d: None)
