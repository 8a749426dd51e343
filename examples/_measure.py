"""Shared by the example benchmarks: CUDA-graph timing, the copy bandwidth and the commit."""
from __future__ import annotations

import os
import subprocess

import torch


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
    times.sort()
    return times[len(times) // 2]


def copy_gbs():
    """Read + write GB/s of a 2 GiB device-to-device torch copy in a graph (fp32, 16-byte
    accesses). On the H100 this gave 2.43 TB/s, below what attention kernels read at: see
    docs/performance.md."""
    x = torch.randn(1 << 29, device="cuda")
    y = torch.empty_like(x)
    return 2 * 4 * x.numel() / graph_ms([lambda: y.copy_(x)], samples=5) / 1e6


def git_commit():
    """RESA_TL_COMMIT where set (a tree copied to a lent GPU machine, whose .git, if any, may
    name another commit), else HEAD."""
    if os.environ.get("RESA_TL_COMMIT"):
        return os.environ["RESA_TL_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def graph_kernel_table(calls, trace_path=None, replays=3):
    """Per-kernel GPU time of ``calls`` captured as one CUDA graph: profile ``replays`` replays
    with torch.profiler (CUPTI reports the kernels of graph replays) and return
    (rows, span_us): rows = [(kernel name, launches per replay, µs per replay, frontier µs per
    replay)] by time (frontier: see :func:`frontier_us`), and span_us = first kernel start to
    last kernel end of a replay, median (span minus the sum of kernel times is the time between
    kernels). ``trace_path``: keep the Chrome trace there."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    g = capture_graph(calls)
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
            torch.cuda.synchronize()          # replays apart: each one is its own span
    del g
    if trace_path:
        path = trace_path
    else:
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
    prof.export_chrome_trace(path)
    with open(path) as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("cat") == "kernel"]
    if not trace_path:
        os.remove(path)
    events.sort(key=lambda e: e["ts"])
    table: dict = {}
    for e in events:
        n, t = table.get(e["name"], (0, 0.0))
        table[e["name"]] = (n + 1, t + e["dur"])
    front = frontier_us(events, replays)
    rows = sorted(((k, n / replays, t / replays, front.get(k, 0.0))
                   for k, (n, t) in table.items()), key=lambda r: -r[2])
    per = len(events) // replays
    spans = sorted(max(e["ts"] + e["dur"] for e in events[r * per:(r + 1) * per])
                   - events[r * per]["ts"] for r in range(replays)) if per else [float("nan")]
    return rows, spans[len(spans) // 2]


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
