"""The one timing module of the benchmarks: CUDA-graph timing, CUDA-event (or host clock) step
marks, L2-cold timing, the copy bandwidth, the commit stamp, and profiler trace analysis.

Importing it needs neither a GPU nor triton nor matplotlib (each is imported where it is used).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time

import torch


# ------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------

def capture_graph(calls):
    """``calls`` (thunks) run once on a side stream (warm-up: compiles, workspaces), then
    captured as one CUDA graph, which is returned."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g


def graph_ms(calls, replays=1, samples=15):
    """Capture ``calls`` (thunks) as one CUDA graph (capture_graph); return the median over
    ``samples`` of the time of ``replays`` back-to-back replays, per call, in ms."""
    g = capture_graph(calls)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / (replays * len(calls)))
    del g
    return median(times)


def median(xs):
    """The median of a non-empty list (the upper one of an even count, as the benchmarks have
    always reported)."""
    xs = sorted(xs)
    return xs[len(xs) // 2]


# ------------------------------------------------------------------------------------------
# L2-cold timing (triton.testing.do_bench) and the copy bandwidth
# ------------------------------------------------------------------------------------------

def cold_l2_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of ``fn()`` by triton.testing.do_bench, which writes a 256 MB buffer before
    every timed call (the L2 flushed: inputs never start in L2) and times each call with CUDA
    events; ``warmup`` / ``rep`` are its budgets in ms. Needs triton (ships with CUDA torch)."""
    import triton
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_gbs(numel: int = 1 << 29, dtype=torch.float32, cold_l2: bool = False) -> float:
    """Read + write GB/s of a device-to-device torch copy of ``numel`` elements: by default
    2 GiB of fp32 (16-byte accesses) timed in a CUDA graph (graph_ms); ``cold_l2``: timed by
    :func:`cold_l2_ms`, the method of the kernels it is compared with there. On the H100 the
    graph copy gave 2.43 TB/s, below what attention kernels read at: see
    docs/performance.md."""
    x = torch.empty(numel, dtype=dtype, device="cuda").normal_()
    y = torch.empty_like(x)
    nbytes = 2 * x.element_size() * x.numel()
    if cold_l2:
        ms = cold_l2_ms(lambda: y.copy_(x))
    else:
        ms = graph_ms([lambda: y.copy_(x)], samples=5)
    del x, y
    return nbytes / ms / 1e6


# ------------------------------------------------------------------------------------------
# Step marks (CUDA events, no host sync)
# ------------------------------------------------------------------------------------------

class Marks:
    """Time stamps along a stream of work: a CUDA event recorded on the current stream (no
    host sync) per :meth:`mark` on CUDA, the host clock elsewhere; :meth:`ms_between` reads
    them (one sync)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def ms_between(self):
        """Milliseconds from each mark to the next."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


# ------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------

def git_commit():
    """RESA_TL_COMMIT where set (a tree copied to a lent GPU machine, whose .git, if any, may
    name another commit), else HEAD."""
    if os.environ.get("RESA_TL_COMMIT"):
        return os.environ["RESA_TL_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    except OSError:                                            # no git on the machine
        return "unknown"
    return out.stdout.strip() or "unknown"


# ------------------------------------------------------------------------------------------
# Profiler traces
# ------------------------------------------------------------------------------------------

def trace_events(prof, trace_path=None):
    """The Chrome-trace events of a finished torch.profiler run ("name", "cat", "ts", "dur",
    µs). ``trace_path``: keep the trace there (else a temporary file is removed)."""
    if trace_path:
        path = trace_path
    else:
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            return json.load(fh)["traceEvents"]
    finally:
        if not trace_path:
            os.remove(path)


def graph_kernel_table(calls, trace_path=None, replays=3):
    """Per-kernel GPU time of ``calls`` captured as one CUDA graph: profile ``replays`` replays
    with torch.profiler (CUPTI reports the kernels of graph replays) and return
    (rows, span_us): rows = [(kernel name, launches per replay, µs per replay, frontier µs per
    replay)] by time (frontier: see :func:`frontier_us`), and span_us = first kernel start to
    last kernel end of a replay, median (span minus the sum of kernel times is the time between
    kernels). ``trace_path``: keep the Chrome trace there."""
    from torch.profiler import ProfilerActivity, profile
    g = capture_graph(calls)
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
            torch.cuda.synchronize()          # replays apart: each one is its own span
    del g
    events = [e for e in trace_events(prof, trace_path) if e.get("cat") == "kernel"]
    return kernel_table(events, replays)


def kernel_table(events, replays: int):
    """:func:`graph_kernel_table`'s (rows, span_us) from the kernel events of ``replays``
    back-to-back replays of one graph."""
    events = sorted(events, key=lambda e: e["ts"])
    table: dict = {}
    for e in events:
        n, t = table.get(e["name"], (0, 0.0))
        table[e["name"]] = (n + 1, t + e["dur"])
    front = frontier_us(events, replays)
    rows = sorted(((k, n / replays, t / replays, front.get(k, 0.0))
                   for k, (n, t) in table.items()), key=lambda r: -r[2])
    per = len(events) // replays if replays else 0
    spans = [max(e["ts"] + e["dur"] for e in events[r * per:(r + 1) * per])
             - events[r * per]["ts"] for r in range(replays)] if per else [float("nan")]
    return rows, median(spans)


def frontier_us(events, replays: int) -> dict:
    """Each kernel's share of the span of a replay, by kernel name, µs per replay (mean).

    ``events``: the kernel events of ``replays`` back-to-back replays of one graph, sorted by
    start ("name", "ts", "dur" in µs, as in a Chrome trace). A kernel's share is how far its end
    moves the latest end seen so far (0 if it ends inside an earlier kernel). The shares of a
    replay add up to its span, whatever overlaps. Raw kernel time does not: with programmatic
    dependent launch a kernel starts early and waits for its predecessor, and that wait counts
    as kernel time. A gap before a kernel, its launch latency, counts toward that kernel."""
    per = len(events) // replays if replays else 0
    out: dict = {}
    for r in range(replays if per else 0):
        chunk = events[r * per:(r + 1) * per]
        front = chunk[0]["ts"]
        for e in chunk:
            end = e["ts"] + e["dur"]
            out[e["name"]] = out.get(e["name"], 0.0) + max(0.0, end - front) / replays
            front = max(front, end)
    return out


def window_kernels(events, t0: float, t1: float, group):
    """The CUDA kernels of a Chrome trace inside the window [t0, t1) (µs): each clipped to
    it. Returns (busy_us, {group(name): kernel µs}, kernels): busy time is the union of the
    clipped intervals (overlapping kernels, e.g. under PDL, count once there, but each in its
    own class); ``kernels`` is how many kernels reach into the window."""
    kernels = sorted((max(e["ts"], t0), min(e["ts"] + e["dur"], t1), e["name"]) for e in events
                     if e.get("cat") == "kernel" and e["ts"] < t1 and e["ts"] + e["dur"] > t0)
    busy, end = 0.0, t0
    for a, b, _ in kernels:                          # union of the (clipped) intervals
        a = max(a, end)
        if b > a:
            busy += b - a
            end = b
    classes: dict = {}
    for a, b, name in kernels:
        g = group(name)
        classes[g] = classes.get(g, 0.0) + (b - a)
    return busy, classes, len(kernels)


def kernel_times(fn, repeats: int = 5) -> dict:
    """Mean device time (µs) per launch of each kernel that eager ``fn()`` launches, by
    kernel name, from torch.profiler (one warm-up call, then ``repeats`` profiled calls)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return {ev.key: getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
            for ev in prof.key_averages()}
