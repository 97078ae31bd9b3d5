"""The per-upstream circuit breaker: closed, open for a cool-down, one probe at a time after it."""

from __future__ import annotations

import pytest

from p2p.errors import CoolingDownError
from p2p.health import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_fails_every_fetch_at_once_for_the_cooldown() -> None:
    clock = Clock()
    b = Breaker("registry r", cooldown=5.0, clock=clock)
    first = b.admit("blob")
    assert not first.probe
    b.failed(first, "timed out waiting for data")
    assert b.is_open and b.trips == 1
    clock.now += 4.9
    with pytest.raises(CoolingDownError) as caught:
        b.admit("blob")
    assert "timed out waiting for data" in str(caught.value)
    assert caught.value.seconds == pytest.approx(0.1)
    assert b.refused == 1


def _tripped(cooldown: float) -> tuple[Breaker, Clock]:
    """A breaker that failed once, its cool-down just over."""
    clock = Clock()
    b = Breaker("registry r", cooldown=cooldown, clock=clock)
    b.failed(b.admit("x"), "refused")
    clock.now += cooldown
    return b, clock


def test_after_the_cooldown_one_probe_goes_and_decides() -> None:
    b, clock = _tripped(5.0)
    probe = b.admit("x")
    assert probe.probe
    with pytest.raises(CoolingDownError, match="a probe is in flight"):
        b.admit("x")  # everyone else still fails at once while the probe waits
    b.failed(probe, "still refused")  # a failed probe: another cool-down
    with pytest.raises(CoolingDownError):
        b.admit("x")
    clock.now += 5.0
    probe = b.admit("x")
    b.succeeded(probe)
    assert not b.is_open
    assert not b.admit("x").probe  # closed: everything goes


def test_an_answer_closes_it_and_a_neutral_end_frees_the_probe() -> None:
    b, _clock = _tripped(1.0)
    probe = b.admit("x")
    b.done(probe)  # ended for a reason of our own (our deadline): the next caller probes
    assert b.is_open
    again = b.admit("x")
    assert again.probe
    b.succeeded(again)
    assert not b.is_open
