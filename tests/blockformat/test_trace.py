"""The access-trace format (`blockformat.trace`): first-access order, merging, bounds, hostile input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockformat.errors import InvalidArgumentError
from blockformat.trace import BLOCK, MAX_RANGES, RangeSet, Trace, clip

LAYER = "sha256:" + "ab" * 32
VSIZE = 1 << 30


def test_ranges_keep_first_access_order_and_merge_what_continues() -> None:
    r = RangeSet()
    r.add(8 * BLOCK, 2 * BLOCK)  # blocks 8, 9
    r.add(10 * BLOCK, BLOCK)  # continues the last range
    r.add(0, 100)  # block 0 (rounded out)
    r.add(7 * BLOCK, 4 * BLOCK)  # 7 is new; 8..10 were seen
    assert r.runs == [(8 * BLOCK, 3 * BLOCK), (0, BLOCK), (7 * BLOCK, BLOCK)]


def test_a_read_over_seen_blocks_adds_only_the_new_runs_between_them() -> None:
    r = RangeSet()
    r.add(2 * BLOCK, BLOCK)
    r.add(5 * BLOCK, BLOCK)
    r.add(0, 8 * BLOCK)
    assert r.runs == [
        (2 * BLOCK, BLOCK),
        (5 * BLOCK, BLOCK),
        (0, 2 * BLOCK),
        (3 * BLOCK, 2 * BLOCK),
        (6 * BLOCK, 2 * BLOCK),
    ]


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=40))
def test_the_runs_cover_every_block_read_exactly_once(reads: list[tuple[int, int]]) -> None:
    r = RangeSet()
    for block, n in reads:
        r.add(block * BLOCK + 17, n * BLOCK - 17)
    covered = [b for o, n in r.runs for b in range(o // BLOCK, (o + n) // BLOCK)]
    assert len(covered) == len(set(covered))
    want = {b for block, n in reads for b in range(block, block + n)}
    assert set(covered) == want


def test_json_round_trip_is_canonical() -> None:
    t = Trace((LAYER,), VSIZE, ((4096, 8192), (0, 4096)), "recorded")
    raw = t.to_json()
    assert Trace.from_json(raw) == t
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert t.total == 12288


def test_clip_cuts_ranges_to_the_device() -> None:
    assert clip([(0, 10), (VSIZE - 5, 4096), (VSIZE, 10)], VSIZE) == [(0, 10), (VSIZE - 5, 5)]


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"version": 2}).encode(), "version 2"),
        (json.dumps({"version": 1, "layers": "x"}).encode(), "'layers'"),
        (
            json.dumps(
                {"version": 1, "layers": ["sha256:x"], "ranges": [], "vsize": 4096, "source": "recorded"}
            ).encode(),
            "sha256:x",
        ),
        (
            json.dumps(
                {"version": 1, "layers": [LAYER], "ranges": [[0]], "vsize": 4096, "source": "recorded"}
            ).encode(),
            "[offset, length]",
        ),
        (
            json.dumps(
                {"version": 1, "layers": [LAYER], "ranges": [[0, 1.5]], "vsize": 4096, "source": "recorded"}
            ).encode(),
            "[offset, length]",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "layers": [LAYER],
                    "ranges": [[4000, 200]],
                    "vsize": 4096,
                    "source": "recorded",
                }
            ).encode(),
            "not within",
        ),
        (
            json.dumps(
                {"version": 1, "layers": [LAYER], "ranges": [[-1, 2]], "vsize": 4096, "source": "recorded"}
            ).encode(),
            "not within",
        ),
        (
            json.dumps(
                {"version": 1, "layers": [LAYER], "ranges": [], "vsize": 4096, "source": "guessed"}
            ).encode(),
            "guessed",
        ),
        (
            json.dumps(
                {
                    "version": 1,
                    "layers": [LAYER],
                    "ranges": [[0, 1]] * (MAX_RANGES + 1),
                    "vsize": 4096,
                    "source": "recorded",
                }
            ).encode(),
            "at most",
        ),
    ],
)
def test_a_malformed_trace_is_refused_saying_why(doc: bytes, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=None) as e:
        Trace.from_json(doc, "the trace")
    assert says in str(e.value) and "the trace" in str(e.value)


def test_an_oversized_trace_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidArgumentError, match="more than"):
        Trace.from_json(b" " * (4 * 1024 * 1024 + 1))
