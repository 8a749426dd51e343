"""CPU: the trace analysis of _timing on hand-made kernel events: frontier_us, each kernel's
share of a graph replay's span (what bench_e2e --profile reports per kernel class), the kernel
table and span of graph replays, the kernels inside a window, and the host-clock step marks."""
import os
import sys

import pytest
import torch

# the benchmark modules import each other as top-level modules (as when run as scripts);
# no conftest.py here: a second module named "conftest" would shadow tests/conftest.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import Marks, frontier_us, kernel_table, median, window_kernels  # noqa: E402


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


def test_kernel_table_rows_and_span():
    events = _replay(0.0) + _replay(100.0)
    rows, span = kernel_table(events, replays=2)
    assert [r[0] for r in rows] == ["b", "a", "c", "d"]            # by kernel time
    assert rows[0] == pytest.approx(("b", 1.0, 23.0, 15.0))
    assert span == pytest.approx(34.0)
    rows, span = kernel_table([], replays=2)
    assert rows == [] and span != span                             # NaN: nothing ran


def test_window_kernels_clips_and_unions():
    ev = [dict(name="x", ts=0.0, dur=10.0, cat="kernel"),          # 5 of it in [5, 30)
          dict(name="y", ts=8.0, dur=4.0, cat="kernel"),           # overlaps x by 2
          dict(name="x", ts=28.0, dur=10.0, cat="kernel"),         # 2 of it in the window
          dict(name="z", ts=40.0, dur=1.0, cat="kernel"),          # outside
          dict(name="step", ts=6.0, cat="user_annotation")]
    busy, classes, n = window_kernels(ev, 5.0, 30.0, lambda name: name)
    assert n == 3
    assert busy == pytest.approx(5.0 + 2.0 + 2.0)                  # 5-12 and 28-30
    assert classes == pytest.approx({"x": 7.0, "y": 4.0})


def test_median_and_host_marks():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 3.0
    m = Marks(torch.device("cpu"))
    for _ in range(3):
        m.mark()
    gaps = m.ms_between()
    assert len(gaps) == 2 and all(g >= 0 for g in gaps)
