"""Per-blob trees by rendezvous hashing, their shape for a fanout, and temporary demotions."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2p.tree import Demotions, ancestors, children, rendezvous

MEMBERS = [f"10.0.0.{i}:7000" for i in range(1, 9)]
DIGESTS = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(200)]
TEN = [f"m{i}" for i in range(10)]


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_order_is_the_documented_score_and_ignores_input_order() -> None:
    digest = DIGESTS[0]

    def score(m: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{digest}\n{m}".encode()).digest()[:8], "big")

    expected = sorted(MEMBERS, key=score, reverse=True)
    assert rendezvous(digest, MEMBERS) == expected
    shuffled = MEMBERS[::-1] + MEMBERS[:3]  # another order, with duplicates
    random.Random(1).shuffle(shuffled)
    assert rendezvous(digest, shuffled) == expected


def test_roots_spread_over_every_member() -> None:
    roots = [rendezvous(d, MEMBERS)[0] for d in DIGESTS]
    assert set(roots) == set(MEMBERS)
    assert max(roots.count(m) for m in MEMBERS) < 60  # about 25 each; none is root of everything


def test_a_leaving_member_leaves_the_others_order_unchanged() -> None:
    for digest in DIGESTS[:50]:
        full = rendezvous(digest, MEMBERS)
        for gone in MEMBERS:
            assert rendezvous(digest, [m for m in MEMBERS if m != gone]) == [m for m in full if m != gone]


def test_seeds_that_are_members_come_first() -> None:
    digest = DIGESTS[3]
    plain = rendezvous(digest, MEMBERS)
    seeds = [plain[-1], plain[-3], "10.9.9.9:7000"]  # the last two of the order, and a stranger
    order = rendezvous(digest, MEMBERS, seeds)
    assert order[:2] == [plain[-3], plain[-1]]  # among themselves: by score
    assert order[2:] == [m for m in plain if m not in seeds]
    assert "10.9.9.9:7000" not in order


@pytest.mark.parametrize(
    ("fanout", "me", "expected"),
    [
        (1, "m0", []),
        (1, "m5", ["m4", "m3", "m2", "m1", "m0"]),
        (1, "m9", ["m8", "m7", "m6", "m5", "m4", "m3", "m2", "m1", "m0"]),
        (2, "m9", ["m4", "m1", "m0"]),
        (2, "m6", ["m2", "m0"]),
        (2, "m2", ["m0"]),
        (3, "m9", ["m2", "m0"]),
        (3, "m4", ["m1", "m0"]),
        (3, "m3", ["m0"]),
        (3, "m0", []),
    ],
)
def test_ancestors_of_a_ten_member_order(fanout: int, me: str, expected: list[str]) -> None:
    assert ancestors(TEN, me, fanout) == expected


def test_children_of_a_ten_member_order() -> None:
    assert children(TEN, "m0", 3) == ["m1", "m2", "m3"]
    assert children(TEN, "m2", 3) == ["m7", "m8", "m9"]
    assert children(TEN, "m3", 3) == []
    assert children(TEN, "m4", 2) == ["m9"]
    assert children(TEN, "m8", 1) == ["m9"]


@pytest.mark.parametrize("fanout", [1, 2, 3, 4, 9, 10])
def test_children_and_ancestors_agree(fanout: int) -> None:
    seen = []
    for m in TEN:
        for c in children(TEN, m, fanout):
            assert ancestors(TEN, c, fanout)[0] == m
            seen.append(c)
    assert sorted(seen) == TEN[1:]  # every member but the root has exactly one parent


def test_a_stranger_or_a_zero_fanout_is_an_error() -> None:
    with pytest.raises(ValueError, match="not in the tree"):
        ancestors(TEN, "m10", 2)
    with pytest.raises(ValueError, match="fanout"):
        ancestors(TEN, "m1", 0)
    with pytest.raises(ValueError, match="fanout"):
        children(TEN, "m1", 0)


def test_a_demotion_expires() -> None:
    clock = Clock()
    d = Demotions(clock)
    d.demote("a", 10.0, "slow")
    assert d.is_demoted("a") and not d.is_demoted("b")
    clock.now += 4.0
    ((left, why),) = d.active().values()
    assert left == pytest.approx(6.0) and why == "slow"
    clock.now += 6.0
    assert not d.is_demoted("a")
    assert d.active() == {}
    assert d.total == 1 and d.counts == {"a": 1}


def test_a_demotion_is_extended_but_never_shortened() -> None:
    clock = Clock()
    d = Demotions(clock)
    d.demote("a", 10.0, "wrong bytes")
    d.demote("a", 1.0, "slow")
    clock.now += 5.0
    assert d.is_demoted("a")
    assert d.active()["a"][0] == pytest.approx(5.0)
    d.demote("a", 20.0, "refused")
    clock.now += 19.0
    assert list(d.active()) == ["a"]
    assert d.active()["a"][0] == pytest.approx(1.0) and d.active()["a"][1] == "refused"
    assert d.total == 3 and d.counts["a"] == 3
    d.clear("a")
    assert not d.is_demoted("a")
