"""Time the TileLang block_summaries / update_block_summaries / select_blocks kernels.

Shapes: Qwen2.5-7B attention (28 query / 4 KV heads, head_dim 128), bf16, block 16, keep 10%,
at least 16 blocks, 1 local block. Every time is a CUDA-graph replay (no host overhead) of R
calls on R rotated copies of the inputs, so that the bytes touched per replay exceed the L2
cache (R * bytes >= 256 MB, at most 64 copies); the median over replays, divided by R.

    python benchmarks/bench_selection_kernels.py                  # full table (needs a GPU)
    python benchmarks/bench_selection_kernels.py --precompile     # CPU: fill the kernel cache
                                                                  # for sm_90a (tests + bench)

GB/s for select_blocks counts the kmin + kmax bytes of the valid blocks (what the kernel must
read); for block_summaries, the K bytes read. "sparse@roofline" is the time a sparse decode step
needs at 3.0 TB/s to read the K and V of the kept blocks (n * 16 tokens), the issue's yardstick
(select <= 0.5x of it); "sparse meas." is resa_tl's sparse_decode kernel when it is available.
The kernels launch through resa_tl.plan (bench_plans: the configs the library picks; the sweep
overrides the select config), as the ops do after their checks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _timing import graph_ms, kernel_times  # noqa: E402
from resa_tl import plan  # noqa: E402
from resa_tl.kernels import block_summaries as summ  # noqa: E402
from resa_tl.kernels import select_blocks as sel  # noqa: E402

HKV, G, D, BS, RATIO, MINB, LOCAL = 4, 7, 128, 16, 0.1, 16, 1
CONTEXTS = [16384, 65536, 131072, 262144]
BATCHES = [1, 4, 8]
# select config sweep (select_threads, histogram mode) per context
HISTS = ("match", "hybrid", "priv")
SWEEP = {16384: [(t, h) for t in (256, 1024) for h in HISTS],
         131072: [(t, h) for t in (512, 1024) for h in HISTS],
         262144: [(1024, h) for h in HISTS]}
ROOFLINE = 3.0e12


def _select_inputs(B, nb, K, R, dev, dt):
    """R rotated input sets of select_blocks (queries and kmin <= kmax summaries of nb blocks)
    and one int32 output [B, HKV, K]: together they exceed the L2 cache (see rotations)."""
    qs = [torch.randn(B, HKV * G, D, device=dev, dtype=dt) for _ in range(R)]
    sums = []
    for _ in range(R):
        lo = torch.randn(B, nb, HKV, D, device=dev, dtype=dt)
        sums.append((lo, lo + torch.rand_like(lo)))
    return qs, sums, torch.empty(B, HKV, K, dtype=torch.int32, device=dev)


def _select_cfgs(nb):
    from resa_tl import heuristics
    base = heuristics.selection_config(nb, HKV, D)
    cfgs = {base}
    for t, hist in SWEEP.get(nb * BS, []):
        cfgs.add(sel.SelectionConfig(score_threads=base.score_threads,
                                     score_rows_per_cta=base.score_rows_per_cta,
                                     select_threads=t, hist=hist))
    return base, sorted(cfgs, key=str)


def summaries_shape(mode, dt="bfloat16"):
    return summ.SummariesShape(HKV, D, BS, dt, "int32", mode)


def select_shape(nb, dt="bfloat16"):
    return sel.SelectShape(nb, HKV, G, D, BS, RATIO, MINB, LOCAL,
                           sel.default_max_selected(nb, RATIO, MINB), dt, "int32")


def bench_plans(ctx, B, dev):
    """The plans bench() launches at (ctx, B), configs as the library picks them: block
    summaries over the cache, updates of 1 and 33 positions, select_blocks."""
    return dict(summ=plan.block_summaries(summaries_shape("build"), B, ctx, dev),
                upd1=plan.block_summaries(summaries_shape("update"), B, 1, dev),
                upd33=plan.block_summaries(summaries_shape("update"), B, 33, dev),
                select=plan.select_blocks(select_shape(ctx // BS), B, dev))


def precompile(workers=1, contexts=CONTEXTS, batches=BATCHES):
    """Compile (into TILELANG_CACHE_DIR) every kernel of the GPU tests and of this benchmark,
    for sm_90a, without a GPU: kernels of explicit configs directly, the ones whose config the
    library picks (tuned schedule, else heuristic) through their plans under
    resa_tl.precompile.fake_hopper."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from resa_tl import heuristics
    import test_block_summaries_gpu as tb
    import test_select_blocks_gpu as tg
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int32: "int32",
            torch.int64: "int64"}
    jobs = []
    for hkv, d, bs, dt, it, mode in tb.summary_specs():
        jobs.append(("summ", summ.SummariesShape(hkv, d, bs, name[dt], name[it], mode),
                     heuristics.summaries_config(hkv, d)))
    for nb, hkv, g, d, bs, ratio, minb, local, k, dt, it, variant in tg.select_specs():
        jobs.append(("sel", sel.SelectShape(nb, hkv, g, d, bs, float(ratio), minb, local, k,
                                            name[dt], name[it]),
                     tg.variant_config(nb, hkv, d, variant)))
    for B, nb, hkv, g, d, bs, ratio, minb, local, k, dt, it, refresh, sink in tg.sink_specs():
        jobs.append(("sel-plan", sel.SelectShape(nb, hkv, g, d, bs, float(ratio), minb, local,
                                                 k, name[dt], name[it], refresh, sink), B))
    for ctx in sorted(set(contexts) | set(SWEEP)):       # the table's configs and the sweep's
        nb = ctx // BS
        for cfg in _select_cfgs(nb)[1]:
            jobs.append(("sel", select_shape(nb), cfg))
    for ctx in contexts:
        for B in batches:
            jobs.append(("bench", ctx, B))
    jobs = list(dict.fromkeys(jobs))
    if workers <= 1:
        for i, job in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {_compile_job(job)}", flush=True)
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for i, msg in enumerate(pool.map(_compile_job, jobs)):
            print(f"[{i + 1}/{len(jobs)}] {msg}", flush=True)


def _compile_job(job):
    from resa_tl import heuristics
    from resa_tl.precompile import fake_hopper
    kind = job[0]
    t = time.time()
    if kind == "summ":
        summ.compile_kernel(job[1], job[2], "sm_90a", heuristics.use_pdl("sm_90a"))
    elif kind == "sel":
        sel.compile_kernel(job[1], job[2], "sm_90a", heuristics.use_pdl("sm_90a"))
    elif kind == "sel-plan":                         # the config the library picks for it
        with fake_hopper():
            plan.select_blocks(job[1], job[2], "meta")
    else:                                            # ("bench", ctx, B)
        with fake_hopper():
            bench_plans(job[1], job[2], "meta")
    return f"{kind} {job[1:]} {time.time() - t:.1f}s"


def rotations(nbytes, cap=64):
    return max(1, min(cap, -(-256 * 2 ** 20 // max(nbytes, 1))))


def kernel_breakdown(fn):
    """Per-kernel device time (us) of one eager call of select_blocks (_timing.kernel_times):
    "score" (the scoring kernel) and "select" (top-k)."""
    out = {}
    for key, us in kernel_times(fn).items():
        if "select_blocks" in key:
            out["score" if key.endswith("_kernel") else "select"] = us
    return out


def sparse_measured(B, ctx, idx, dt):
    from resa_tl import ops
    try:
        q = torch.randn(B, HKV * G, D, device="cuda", dtype=dt)
        k = torch.randn(B, ctx, HKV, D, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        sl = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        return graph_ms([lambda: ops.sparse_decode(q, k, v, idx, sl, block_size=BS,
                                                   softmax_scale=D ** -0.5)])
    except Exception as e:                                     # report, don't fail the bench
        print(f"  (sparse_decode not timed: {type(e).__name__}: {str(e)[:120]})")
        return None


def bench(args):
    dev = torch.device("cuda")
    dt = torch.bfloat16
    rows = []
    sparse_jobs = []
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    hdr = (f"{'ctx':>7} {'B':>2} | {'summ ms':>8} {'GB/s':>6} | {'upd1 us':>7} {'upd33 us':>8} | "
           f"{'select us':>9} {'GB/s':>6} {'score/sel us':>12} | {'torch ref us':>12} | "
           f"{'sparse@roof us':>14} {'sel/sparse':>10} {'sparse meas us':>14}")
    print(hdr)
    for ctx in args.contexts:
        for B in args.batches:
            nb = ctx // BS
            torch.manual_seed(0)
            sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            # -- block_summaries over the whole cache
            kbytes = B * ctx * HKV * D * 2
            R = rotations(kbytes, cap=max(1, min(16, int(20e9 // max(kbytes, 1)))))
            ks = [torch.randn(B, ctx, HKV, D, device=dev, dtype=dt) for _ in range(R)]
            outs = [(torch.empty(B, nb, HKV, D, device=dev, dtype=dt),
                     torch.empty(B, nb, HKV, D, device=dev, dtype=dt)) for _ in range(R)]
            plans = bench_plans(ctx, B, dev)
            t_sum = graph_ms([lambda k=k, o=o: plans["summ"].run(k, sl, *o)
                              for k, o in zip(ks, outs)])
            # -- update (decode step: 1 token; rectification chunk: 33 tokens)
            kmin, kmax = outs[0]
            start1 = torch.full((B,), ctx - 1, dtype=torch.int32, device=dev)
            start33 = torch.full((B,), ctx - 33 - 7, dtype=torch.int32, device=dev)
            t_u1 = graph_ms([lambda: plans["upd1"].run(ks[0], start1, kmin, kmax, 1)] * 20)
            t_u33 = graph_ms([lambda: plans["upd33"].run(ks[0], start33, kmin, kmax, 33)] * 20)
            del ks
            # -- select_blocks
            K = sel.default_max_selected(nb, RATIO, MINB)
            sbytes = 2 * B * nb * HKV * D * 2
            qs, sums, out = _select_inputs(B, nb, K, rotations(sbytes), dev, dt)
            R = len(qs)
            kw = dict(block_size=BS, sparse_ratio=RATIO, min_blocks=MINB, local_blocks=LOCAL,
                      max_selected=K)
            p_sel = plans["select"]
            t_sel = graph_ms([lambda q=q, s=s: p_sel.run(q, s[0], s[1], sl, None, out)
                              for q, s in zip(qs, sums)])
            bd = kernel_breakdown(lambda: p_sel.run(qs[0], *sums[0], sl, None, out))
            rr = min(R, 4)
            t_ref = graph_ms([lambda q=q, s=s: sel.select_blocks_reference(q, s[0], s[1], sl,
                                                                             **kw)
                                for q, s in list(zip(qs, sums))[:rr]], samples=10)
            n = sel.blocks_to_keep(nb, RATIO, MINB)
            t_sparse_roof = B * n * BS * HKV * D * 2 * 2 / ROOFLINE * 1e3
            t_sparse = None
            if args.sparse and ctx == 131072:
                sparse_jobs.append((len(rows), B, ctx, out.clone()))
            row = dict(ctx=ctx, B=B, summ_ms=t_sum, summ_gbs=kbytes / t_sum / 1e6,
                       upd1_us=t_u1 * 1e3, upd33_us=t_u33 * 1e3, select_us=t_sel * 1e3,
                       select_gbs=sbytes / t_sel / 1e6, score_us=bd.get("score"),
                       selk_us=bd.get("select"), torch_ref_us=t_ref * 1e3,
                       sparse_roof_us=t_sparse_roof * 1e3,
                       sparse_meas_us=None if t_sparse is None else t_sparse * 1e3)
            rows.append(row)
            bds = (f"{row['score_us'] or float('nan'):.1f}/{row['selk_us'] or float('nan'):.1f}")
            print(f"{ctx:>7} {B:>2} | {t_sum:8.3f} {row['summ_gbs']:6.0f} | "
                  f"{row['upd1_us']:7.1f} {row['upd33_us']:8.1f} | {row['select_us']:9.1f} "
                  f"{row['select_gbs']:6.0f} {bds:>12} | {row['torch_ref_us']:12.1f} | "
                  f"{row['sparse_roof_us']:14.1f} {row['select_us'] / row['sparse_roof_us']:10.2f}"
                  f" {'' if t_sparse is None else f'{t_sparse * 1e3:14.1f}'}", flush=True)
            del qs, sums
            torch.cuda.empty_cache()
    if args.sweep:
        print("# select config sweep (select_threads, hist): us per call")
        for ctx, B in [(c, b) for c in sorted(SWEEP) for b in (1, 8)]:
            nb = ctx // BS
            K = sel.default_max_selected(nb, RATIO, MINB)
            sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            sbytes = 2 * B * nb * HKV * D * 2
            qs, sums, out = _select_inputs(B, nb, K, rotations(sbytes), dev, dt)
            R = len(qs)
            line = []
            for cfg in _select_cfgs(nb)[1]:
                p = plan.select_blocks(select_shape(nb), B, dev, config=cfg)
                t = graph_ms([lambda q=q, s=s: p.run(q, s[0], s[1], sl, None, out)
                              for q, s in zip(qs, sums)])
                bd = kernel_breakdown(lambda: p.run(qs[0], sums[0][0], sums[0][1], sl, None,
                                                    out))
                line.append(f"({cfg.select_threads},{cfg.hist})={t * 1e3:.1f}"
                            f"[sel {bd.get('select', float('nan')):.1f}]")
                rows.append(dict(sweep=True, ctx=ctx, B=B, threads=cfg.select_threads,
                                 hist=cfg.hist, us=t * 1e3, select_kernel_us=bd.get("select")))
            print(f"ctx={ctx} B={B}: " + "  ".join(line), flush=True)
            del qs, sums
    for i, B, ctx, idx in sparse_jobs:             # last: another helper's kernel, may be WIP
        t = sparse_measured(B, ctx, idx, dt)
        if t is not None:
            rows[i]["sparse_meas_us"] = t * 1e3
            print(f"sparse_decode (resa_tl, measured) ctx={ctx} B={B}: {t * 1e3:.1f} us; "
                  f"select/sparse = {rows[i]['select_us'] / (t * 1e3):.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=CONTEXTS)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=BATCHES)
    ap.add_argument("--no-sweep", dest="sweep", action="store_false")
    ap.add_argument("--no-sparse", dest="sparse", action="store_false")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.precompile:
        precompile(args.jobs, args.contexts, args.batches)
    else:
        bench(args)


if __name__ == "__main__":
    main()
