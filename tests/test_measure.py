"""CPU: examples/_measure.frontier_us, each kernel's share of a graph replay's span (what
bench_e2e --profile reports per kernel class), on hand-made kernel events."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from _measure import frontier_us  # noqa: E402


def _ev(name, ts, dur):
    return {"name": name, "ts": ts, "dur": dur}


def _replay(t0):
    # a: 0-10; b starts early (a PDL wait) and ends at 25; c lies inside b; a gap of 5, then d
    return [_ev("a", t0, 10.0), _ev("b", t0 + 2, 23.0), _ev("c", t0 + 12, 5.0),
            _ev("d", t0 + 30, 4.0)]


def test_shares_add_up_to_the_span_and_exclude_waits():
    events = _replay(0.0) + _replay(100.0)
    f = frontier_us(events, replays=2)
    assert f == pytest.approx({"a": 10.0, "b": 15.0, "c": 0.0, "d": 9.0})
    assert sum(f.values()) == pytest.approx(34.0)          # span of one replay: 0 .. 34
    # raw kernel time counts b's early start (23 us) and c in full; the frontier does not
    assert f["b"] < 23.0 and f["c"] == 0.0


def test_replays_are_averaged_and_repeated_names_summed():
    slow = [_ev("a", 200.0, 10.0), _ev("a", 210.0, 10.0)]   # the same kernel twice: 20 us
    fast = [_ev("a", 300.0, 6.0), _ev("a", 306.0, 6.0)]     # 12 us
    assert frontier_us(slow + fast, replays=2) == pytest.approx({"a": 16.0})


def test_no_events():
    assert frontier_us([], replays=3) == {}
