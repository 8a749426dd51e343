"""GPU timing of one candidate.

- Inputs rotate over ``n_sets`` independent copies whose total size exceeds 2x the L2 cache
  (read from the device), so every call reads its data from DRAM, as decoding does.
- Default mode "graph": the calls are captured in a CUDA graph (``reps`` calls over the sets)
  and each replay is timed with CUDA events, so host launch overhead does not count (decoding
  replays graphs). The capture is checked: outputs are poisoned before a replay and must be
  rewritten. Falls back to mode "eager" (events around a loop of calls) if capture fails.
- Warm-up calls and replays first; then ``samples`` timed replays; median and spread
  (p10/p90, min/max) per call.
"""
from __future__ import annotations

import math
import statistics


def l2_bytes(device=None) -> int:
    import torch
    p = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(p, "L2_cache_size", 0) or 50 * 2 ** 20)


def rotation_sets(set_bytes: int, l2: int, max_sets: int = 64) -> int:
    """Input copies so that one pass over them moves more than 2 x L2."""
    if set_bytes <= 0:
        return 1
    return int(min(max_sets, max(1, math.ceil(2 * l2 / set_bytes))))


def copy_bandwidth_gbps(nbytes: int = 1 << 30, samples: int = 10) -> dict:
    """Device-to-device copy of ``nbytes``; GB/s counting bytes read plus written (the
    memory roofline the kernels' rates are compared with)."""
    import torch
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    med = statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return {"gbps": round(2 * n * 2 / med / 1e9, 1), "bytes": 2 * n * 2,
            "median_ms": round(med * 1e3, 4)}


def _poison(x):
    import torch
    if isinstance(x, (tuple, list)):
        for t in x:
            _poison(t)
    elif isinstance(x, torch.Tensor):
        if x.is_floating_point():
            x.fill_(float("nan"))
        else:
            x.fill_(-(2 ** 30))


def _written(x) -> bool:
    import torch
    if isinstance(x, (tuple, list)):
        return all(_written(t) for t in x)
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return bool(torch.isfinite(x).all())
        return not bool((x == -(2 ** 30)).any())
    return True


def _stats(per_call_us: list[float]) -> dict:
    xs = sorted(per_call_us)
    n = len(xs)

    def q(p):
        i = min(n - 1, max(0, int(round(p * (n - 1)))))
        return xs[i]
    return {"median_us": round(statistics.median(xs), 3), "p10_us": round(q(0.1), 3),
            "p90_us": round(q(0.9), 3), "min_us": round(xs[0], 3), "max_us": round(xs[-1], 3),
            "spread_pct": round(100 * (q(0.9) - q(0.1)) / max(statistics.median(xs), 1e-9), 2),
            "samples_us": [round(x, 3) for x in per_call_us]}


def time_calls(call, n_sets: int, *, samples: int = 15, warmup: int = 2,
               target_ms: float = 1.0, max_reps: int = 256, use_graph: bool = True,
               in_place: bool = False) -> dict:
    """Time ``call(i)`` (runs the candidate on input set i, returns its output)."""
    import torch
    for i in range(n_sets):                       # warm-up: compiles/loads, workspaces
        call(i)
    torch.cuda.synchronize()
    # one timed eager pass to size the replays
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    passes = max(1, warmup)
    s.record()
    for _ in range(passes):
        for i in range(n_sets):
            call(i)
    e.record()
    e.synchronize()
    eager_us = s.elapsed_time(e) * 1e3 / (passes * n_sets)
    reps = max(1, math.ceil(target_ms * 1e3 / max(eager_us, 1e-3)))
    reps = min(max_reps, max(n_sets, math.ceil(reps / n_sets) * n_sets))
    if use_graph:
        try:
            return _time_graph(call, n_sets, reps, samples, warmup, in_place) | {
                "eager_us": round(eager_us, 3)}
        except Exception as err:                  # noqa: BLE001 - fall back to eager
            torch.cuda.synchronize()
            fallback = f"{type(err).__name__}: {str(err)[:200]}"
        res = _time_eager(call, n_sets, reps, samples)
        res["graph_error"] = fallback
        return res
    return _time_eager(call, n_sets, reps, samples)


def _time_graph(call, n_sets, reps, samples, warmup, in_place):
    import torch
    g = torch.cuda.CUDAGraph()
    outs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_sets):                   # warm-up on the capture stream
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for j in range(reps):
            o = call(j % n_sets)
            if j < n_sets:
                outs.append(o)
    torch.cuda.synchronize()
    if not in_place:
        _poison(outs)
        g.replay()
        torch.cuda.synchronize()
        if not _written(outs):
            raise RuntimeError("graph replay did not write the outputs (kernels launched "
                               "outside the capture stream?)")
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        per_call.append(s.elapsed_time(e) * 1e3 / reps)
    del g, outs
    return _stats(per_call) | {"mode": "graph", "calls_per_sample": reps, "n_sets": n_sets}


def _time_eager(call, n_sets, reps, samples):
    import torch
    per_call = []
    for _ in range(samples):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for j in range(reps):
            call(j % n_sets)
        e.record()
        e.synchronize()
        per_call.append(s.elapsed_time(e) * 1e3 / reps)
    return _stats(per_call) | {"mode": "eager", "calls_per_sample": reps, "n_sets": n_sets}
