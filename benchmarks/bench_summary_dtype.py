"""Time select_blocks (refresh variant, as the decode step launches it) with bf16 vs fp8
summaries and several scoring configs; L distinct summary sets per graph so they stream from
DRAM as in the e2e step. --precompile: compile the same kernels on the CPU.

    python benchmarks/bench_summary_dtype.py [--out summary_dtype.json]
    python benchmarks/bench_summary_dtype.py --precompile        # CPU: fill the kernel cache
"""
import argparse
import dataclasses
import itertools
import json
import sys

import torch

from resa_tl import heuristics, ops, plan, schedules
from resa_tl.kernels import select_blocks as sel

from _timing import graph_ms

SHAPES = [(32768, 8, 28), (262144, 8, 8)]          # context, batch, distinct summary sets
CFGS = {torch.bfloat16: [(512, 16)],
        torch.float8_e4m3fn: [(512, 32), (512, 64), (256, 32), (256, 16), (1024, 64)],
        torch.float8_e5m2: [(512, 32)]}
VARIANTS = [(sdt, c) for sdt, cs in CFGS.items() for c in cs]
Hkv, g, D, bs = 4, 7, 128, 16


def cfg_for(nb, tc):
    """The select config the library picks on sm_90a for bf16 summaries at batch 8 (the tuned
    schedule's entry, else the heuristic, as resa_tl.plan resolves it), with the scoring
    launch shape (score_threads, score_rows_per_cta) = ``tc``."""
    base = schedules.config_for(
        "select_blocks", heuristics.selection_config(nb, Hkv, D), arch="sm_90a",
        dtype="bfloat16", head_dim=D, g=g, hkv=Hkv, block_size=bs, num_blocks=nb, batch=8)
    return dataclasses.replace(base, score_threads=tc[0], score_rows_per_cta=tc[1])


def select_plan(q, kmin, lens, nb, tc):
    """The plan of select_blocks with the newest block's refresh, at config ``cfg_for``."""
    K = sel.default_max_selected(nb, 0.1, 16)
    return plan.select_blocks_like(q, kmin, lens, block_size=bs, sparse_ratio=0.1,
                                   min_blocks=16, local_blocks=1, max_selected=K, refresh=True,
                                   config=cfg_for(nb, tc))


def run(ctx, B, L, sdt, tc, precompile=False):
    """us per select_blocks call (median of CUDA-graph replays of L calls on L summary sets);
    ``precompile``: only resolve (compile) the plan, on meta tensors."""
    S = ctx + 4 * 33 + 1024
    nb = -(-S // bs)
    if precompile:
        m = dict(device="meta")
        q = torch.empty(B, Hkv * g, D, dtype=torch.bfloat16, **m)
        mn = torch.empty(B, nb, Hkv, D, dtype=sdt, **m)
        select_plan(q, mn, torch.empty(B, dtype=torch.int32, **m), nb, tc)
        return None
    dev = "cuda"
    k = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    sets = []
    for i in range(L):
        if i == 0:
            mn, mx = ops.block_summaries(k, lens, bs, summary_dtype=sdt)
        else:
            mn, mx = sets[0][0].clone(), sets[0][1].clone()
        sets.append((mn, mx))
    qs = [torch.randn(B, Hkv * g, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    p = select_plan(qs[0], sets[0][0], lens, nb, tc)
    out = torch.empty_like(p.out)
    calls = [lambda i=i: p.run(qs[i], sets[i][0], sets[i][1], lens, k, out) for i in range(L)]
    return graph_ms(calls) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.precompile:
        from resa_tl.precompile import fake_hopper
        with fake_hopper():
            for (ctx, B, L), (sdt, tc) in itertools.product(SHAPES, VARIANTS):
                run(ctx, B, L, sdt, tc, precompile=True)
        print("precompiled")
        sys.exit()
    rows = []
    for rep in range(2):
        for (ctx, B, L), (sdt, tc) in itertools.product(SHAPES, VARIANTS):
            us = run(ctx, B, L, sdt, tc)
            rows.append(dict(context=ctx, batch=B, summary=str(sdt)[6:], threads=tc[0],
                             rows_per_cta=tc[1], rep=rep, us=round(us, 2)))
            print(json.dumps(rows[-1]), flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)
    print(f"{'ctx':>7} {'summ':>14} {'TS':>5} {'RPC':>4} {'us rep0':>8} {'us rep1':>8}")
    for r in rows:
        if r["rep"] == 0:
            r1 = [x for x in rows if x["rep"] == 1 and all(
                x[k] == r[k] for k in ("context", "summary", "threads", "rows_per_cta"))]
            print(f"{r['context']:>7} {r['summary']:>14} {r['threads']:>5} "
                  f"{r['rows_per_cta']:>4} {r['us']:8.2f} "
                  f"{r1[0]['us'] if r1 else float('nan'):8.2f}")


if __name__ == "__main__":
    main()
